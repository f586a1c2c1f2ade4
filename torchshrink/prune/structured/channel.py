"""``channel-prune``: remove conv filters / Linear neurons (and every tensor coupled to them) with
a traced dependency graph, to a channel ratio or to a MACs / params budget."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.data import Batch, as_batches
from torchshrink.core.errors import ConfigError, DataError, UnsupportedLayerError
from torchshrink.core.report import current
from torchshrink.core.select import Select, config_for, name_matches, select_modules
from torchshrink.prune.structured.groups import Group, build_groups, mask_groups, prune_groups
from torchshrink.prune.structured.importance import CRITERIA, group_scores, taylor_grads
from torchshrink.prune.structured.latency import group_time_per_mac
from torchshrink.prune.structured.trace import Graph, call_model, trace
from torchshrink.prune.structured.verify import problem, reference, run_outputs

log = logging.getLogger(__name__)
DEFAULT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelPruneConfig(Config):
    """Structured channel pruning.

    - ``amount``: fraction to remove; of each group's channels (``target='channels'``), or of the
      model's MACs / parameters (``target='macs' | 'params'``, found by bisection on the ratio).
    - ``importance``: l1 | l2 | bn_scale | taylor | random; ``reduction`` over a group's tensors.
    - ``scope``: ``local`` (every group loses the same fraction) or ``global`` (one ranking of
      size-normalised scores across groups; no group loses more than ``max_ratio``).
    - ``round_to``: kept channel counts are multiples of this (kernel-friendly shapes).
    - ``ignore``: layer name patterns (glob or ``re:``) whose tensors are never touched.
    - ``allocation``: how the cut is spread over groups. ``importance``: by scores alone.
      ``latency``: groups whose channels cost more *measured* time per MAC on this machine (see
      ``latency.py``) are cut harder: local ratios are multiplied by that relative cost to the power
      ``latency_power`` (capped by ``max_ratio``), global scores are divided by it. Importance still
      picks the channels inside each group; a MACs / params target is still met (at or under it).
    - ``exact_only``: skip groups normalised by a LayerNorm / GroupNorm(1) (pruning those changes
      the normalisation statistics, so the result is not output-exact).
    """

    kind = "channel-prune"
    family = "prune"

    amount: float = 0.3
    target: Literal["channels", "macs", "params"] = "channels"
    importance: Literal["l1", "l2", "bn_scale", "taylor", "random"] = "l1"
    reduction: Literal["mean", "max", "sum"] = "mean"
    scope: Literal["local", "global"] = "local"
    round_to: int = 1
    max_ratio: float = 0.9
    ignore: tuple[str, ...] = ()
    exact_only: bool = False
    allocation: Literal["importance", "latency"] = "importance"
    latency_power: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        check_range("channel-prune.amount", self.amount, 0.0, 1.0, hi_open=True)
        check_range("channel-prune.max_ratio", self.max_ratio, 0.0, 1.0, hi_open=True)
        check_range("channel-prune.round_to", self.round_to, 1, 4096)
        check_range("channel-prune.latency_power", self.latency_power, 0.0, 8.0)
        if self.importance not in CRITERIA:
            raise ConfigError(f"channel-prune.importance={self.importance!r}; allowed: {', '.join(CRITERIA)}")


def first_batch(model: nn.Module, data: Any) -> Any:
    """An example batch to trace with: the inputs of the first calibration batch (read by the data
    contract, so ``(input_ids, attention_mask)`` stays two inputs), or the model's known input. A batch
    of positional tensors comes back as a tensor / tuple, of keyword tensors as a dict, else a Batch."""
    if data is not None and not (isinstance(data, list | tuple) and not data):
        b = next(as_batches(data, limit=1), None)
        if b is not None:
            if not b.kwargs:
                return b.inputs[0] if len(b.inputs) == 1 else tuple(b.inputs)
            if not b.inputs:
                return dict(b.kwargs)
            return Batch(b.inputs, None, b.kwargs)
    from torchshrink.core.errors import ModelLoadError
    from torchshrink.models import example_inputs

    try:
        return example_inputs(model)
    except ModelLoadError:
        raise DataError(
            f"structured pruning runs {type(model).__name__} once to trace it; pass data=[example_batch] "
            "(a tensor, a tuple of tensors or a dict of keyword inputs)"
        ) from None


def batch_macs(model: nn.Module, batch: Any) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        call_model(model, batch)
    return counter.get_total_flops() // 2


@dataclasses.dataclass
class Plan:
    """A traced model's prunable groups, their scores, and the groups left unpruned (with why)."""

    graph: Graph
    groups: list[Group]
    scores: dict[int, torch.Tensor]
    skipped: list[tuple[list[str], str]]
    ratios: dict[int, float]
    weights: dict[int, float] = dataclasses.field(default_factory=dict)  # latency allocation, 1.0 = neutral

    def weight(self, root: int, cfg: ChannelPruneConfig) -> float:
        return self.weights.get(root, 1.0) ** cfg.latency_power

    def keep(self, ratio: float, cfg: ChannelPruneConfig) -> dict[int, torch.Tensor]:
        if cfg.scope == "global":
            return _global_keep(self, ratio, cfg)
        out = {}
        for gr in self.groups:
            r = min(cfg.max_ratio, self.ratios.get(gr.root, ratio) * self.weight(gr.root, cfg)) if ratio > 0 else 0.0
            n_keep = _rounded(gr.size, gr.size - math.floor(gr.size * r), cfg.round_to)
            if n_keep < gr.size:
                out[gr.root] = torch.sort(torch.topk(self.scores[gr.root], n_keep).indices).values
        return out

    def apply(self, model: nn.Module, keep: dict[int, torch.Tensor]) -> list[str]:
        return prune_groups(model, self.graph, self.groups, keep)


def _rounded(n: int, n_keep: int, round_to: int) -> int:
    n_keep = max(n_keep, 1)
    if round_to > 1:
        n_keep = max(round_to, math.ceil(n_keep / round_to) * round_to)
    return min(n, n_keep)


def _global_keep(plan: Plan, ratio: float, cfg: ChannelPruneConfig) -> dict[int, torch.Tensor]:
    normed = {r: s / s.mean().clamp_min(1e-12) / plan.weight(r, cfg) for r, s in plan.scores.items()}
    allv = torch.cat(list(normed.values()))
    if allv.numel() == 0 or ratio <= 0:
        return {}
    thr = torch.quantile(allv.float(), min(ratio, 1.0))
    out = {}
    for gr in plan.groups:
        s = normed[gr.root]
        n_keep = int((s > thr).sum())
        n_keep = max(n_keep, math.ceil(gr.size * (1 - cfg.max_ratio)))
        n_keep = _rounded(gr.size, n_keep, cfg.round_to)
        if n_keep < gr.size:
            out[gr.root] = torch.sort(torch.topk(plan.scores[gr.root], n_keep).indices).values
    return out


def make_plan(model: nn.Module, cfg: ChannelPruneConfig, select: Select | None, data: Any) -> Plan:
    batch = first_batch(model, data)
    g = trace(model, batch)
    groups, skipped = build_groups(g)
    chosen = {n for n, _ in select_modules(model, select, DEFAULT_TYPES, allow_empty=True)}
    ignore = (*cfg.ignore, *(select.exclude if select else ()))
    eligible, ratios = [], {}
    for gr in groups:
        bad = [m for m in gr.modules if any(name_matches(m, p) for p in ignore)]
        if bad:
            skipped.append((gr.producers, f"ignored layer {bad[0]}"))
        elif not all(p in chosen for p in gr.producers):
            skipped.append((gr.producers, "producer not selected"))
        elif cfg.exact_only and gr.mixing:
            skipped.append((gr.producers, "normalised by LayerNorm/GroupNorm (exact_only)"))
        else:
            eligible.append(gr)
            ratios[gr.root] = config_for(gr.producers[0], cfg, select).amount
    if not eligible:
        ops = "; ".join(sorted(set(g.blocked_ops))[:5]) or "none"
        raise UnsupportedLayerError(
            f"no prunable channel group in {type(model).__name__}: "
            f"{'; '.join(f'{p[:2]}: {r}' for p, r in skipped[:5]) or 'no conv/linear/embedding layer was traced'}"
            f" (ops the tracer could not follow: {ops})"
        )
    grads = taylor_grads(model, data) if cfg.importance == "taylor" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    scores = {gr.root: group_scores(model, g, gr, cfg.importance, cfg.reduction, grads=grads, generator=gen)
              for gr in eligible}
    weights: dict[int, float] = {}
    if cfg.allocation == "latency":
        raw = group_time_per_mac(model, g, eligible, batch)
        gmean = math.exp(sum(math.log(max(v, 1e-9)) for v in raw.values()) / max(len(raw), 1))
        weights = {r: v / gmean for r, v in raw.items()}
    return Plan(g, eligible, scores, skipped, ratios, weights)


def _size_of(model: nn.Module, batch: Any, target: str) -> int:
    if target == "params":
        return sum(p.numel() for p in model.parameters())
    return batch_macs(model, batch)


class _TrialBroke(Exception):
    """A pruned copy tried while looking for the target ratio did not run: some group breaks the model."""

    def __init__(self, ratio: float, why: str) -> None:
        super().__init__(why)
        self.ratio = ratio


def _target_ratio(model: nn.Module, plan: Plan, config: ChannelPruneConfig, batch: Any) -> float:
    """The channel ratio that meets a MACs / params target (bisection on pruned copies). A copy that does
    not run (a reshape sized from another tensor's channels, say) raises :class:`_TrialBroke`, so the caller
    rolls back the groups that break it first."""
    base = _size_of(model, batch, config.target)
    goal = base * (1 - config.amount)
    plan.ratios = {}
    lo, hi, best = 0.0, config.max_ratio, None
    for _ in range(12):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        plan.apply(trial, plan.keep(mid, config))
        try:
            size = _size_of(trial, batch, config.target)
        except Exception as e:  # the model's own code failing on pruned shapes: any type
            raise _TrialBroke(mid, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
        if size <= goal:
            hi, best = mid, mid
        else:
            lo = mid
        if best is not None and abs(size - goal) / base < 0.005:
            break
    if best is None:
        log.warning("channel-prune: %s target %.2f not reachable; pruning at max_ratio=%.2f",
                    config.target, config.amount, config.max_ratio)
        best = config.max_ratio
    return best


def check_keep(model: nn.Module, plan: Plan, keep: dict[int, torch.Tensor], refs: list) -> str | None:
    """Prune a copy of ``model`` to ``keep`` and say what is wrong with it (None: nothing). Groups no
    norm mixes must also reproduce the masked original (the same channels zeroed) to float rounding."""
    mixing = {gr.root for gr in plan.groups if gr.mixing}
    exact = {r: k for r, k in keep.items() if r not in mixing}
    trial = copy.deepcopy(model)
    masked = None
    if exact and len(exact) == len(keep):  # masking first, then pruning, gives the same pruned model
        mask_groups(trial, plan.graph, plan.groups, keep)
        masked = run_outputs(trial, refs)
    plan.apply(trial, keep)
    why = problem(trial, refs, masked)
    if why is None and exact and len(exact) < len(keep):
        trial = copy.deepcopy(model)
        mask_groups(trial, plan.graph, plan.groups, exact)
        masked = run_outputs(trial, refs)
        plan.apply(trial, exact)
        why = problem(trial, refs, masked)
    return why


def _broken_groups(model: nn.Module, plan: Plan, keep: dict[int, torch.Tensor], refs: list) -> list[tuple[int, str]]:
    """The groups that break the model on their own (bisection over the pruned groups)."""
    def search(roots: list[int]) -> list[tuple[int, str]]:
        why = check_keep(model, plan, {r: keep[r] for r in roots}, refs)
        if why is None:
            return []
        if len(roots) == 1:
            return [(roots[0], why)]
        half = len(roots) // 2
        return search(roots[:half]) + search(roots[half:])

    return search(sorted(keep))


def prune_channels(model: nn.Module, config: ChannelPruneConfig, *, select: Select | None = None,
                   data: Any = None, **_: Any) -> nn.Module:
    """Handler of ``channel-prune`` (the model is already a copy). The pruned model is checked against
    the masked original; a group that breaks it is rolled back (reported with the reason)."""
    batch = first_batch(model, data)
    refs = reference(model, batch)
    plan = make_plan(model, config, select, data)
    rolled: list[tuple[list[str], str]] = []
    for _attempt in range(3):
        broke = None
        try:
            ratio = config.amount if config.target == "channels" else _target_ratio(model, plan, config, batch)
        except _TrialBroke as e:  # find the groups that broke that trial, roll them back, then size again
            ratio, broke = e.ratio, str(e)
        keep = plan.keep(ratio, config)
        why = check_keep(model, plan, keep, refs) if keep and refs else None
        if why is None and broke is not None:
            raise UnsupportedLayerError(f"channel-prune refused: a pruned copy at channel ratio {ratio:.2f} failed "
                                        f"({broke}) and no group could be found that causes it")
        if why is None:
            break
        bad = _broken_groups(model, plan, keep, refs)
        by_root = {gr.root: gr for gr in plan.groups}
        if not bad or len(bad) == len(keep):
            raise UnsupportedLayerError(
                f"channel-prune refused: the pruned model was checked on the trace batch and {why}; no group "
                f"could be kept (first: {', '.join(by_root[sorted(keep)[0]].producers[:2])}); leave those layers "
                "out with select / ignore")
        for r, reason in bad:
            rolled.append((by_root[r].producers, reason))
            log.warning("channel-prune: rolled back %s: %s", ", ".join(by_root[r].producers[:3]), reason)
        broken = {r for r, _ in bad}
        plan.groups = [gr for gr in plan.groups if gr.root not in broken]
        plan.scores = {r: v for r, v in plan.scores.items() if r not in broken}
    else:
        raise UnsupportedLayerError(f"channel-prune refused: the pruned model still fails after rolling back "
                                    f"{len(rolled)} group(s): {why}")
    changed = plan.apply(model, keep)
    plan.skipped.extend((p, f"rolled back: {r}") for p, r in rolled)
    report = {
        "pruned_groups": len(keep),
        "ratio": ratio,
        "changed_modules": changed,
        "rolled_back": [{"layers": p, "reason": r} for p, r in rolled],
        "unpruned": [{"layers": p, "reason": r} for p, r in plan.skipped],
        "latency_weights": {",".join(gr.producers): round(plan.weights[gr.root], 3)
                            for gr in plan.groups if gr.root in plan.weights},
    }
    for p, r in plan.skipped:
        log.info("channel-prune: left unpruned %s (%s)", ", ".join(p) or "?", r)
    current(model).notes.update(report)
    return model


register(ChannelPruneConfig, prune_channels)
