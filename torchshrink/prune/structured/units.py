"""Configs and handlers: ``head-prune``, ``ffn-prune``, ``layer-drop``; and ``from_pretrained``
for pruned Hugging Face models whose classes derive head size from the config."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.core.report import current
from torchshrink.core.select import Select, name_matches
from torchshrink.core.surgery import set_module
from torchshrink.prune.structured.activations import (
    DATA_AWARE,
    InputStats,
    compensate,
    feature_scores,
    input_stats,
    resolve,
    zero_inputs,
)
from torchshrink.prune.structured.channel import first_batch
from torchshrink.prune.structured.flow import layer_attentions, layer_ffns
from torchshrink.prune.structured.trace import call_model
from torchshrink.prune.structured.transformer import (
    ffn_scores,
    find_stacks,
    head_scores,
    hf_configs,
    out_features,
    prune_heads,
    record_structure,
    select_dim,
    set_stack_config,
)
from torchshrink.prune.structured.verify import probe_batch, reference, run_outputs, verify

log = logging.getLogger(__name__)


def _layer_selected(prefix: str, i: int, select: Select | None) -> bool:
    if select is None or not (select.include or select.exclude):
        return True
    name = f"{prefix}.{i}" if prefix else str(i)
    if select.include and not any(name_matches(name, p) for p in select.include):
        return False
    return not any(name_matches(name, p) for p in select.exclude)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadPruneConfig(Config):
    """Remove ``amount`` of the attention heads of every selected layer (the same count per layer,
    so the HF config can describe the result). With grouped-query attention every KV group keeps
    the same number of query heads, so each head still reads its own KV head. ``importance``: see
    :mod:`~torchshrink.prune.structured.activations` (``auto``: data-aware ``fluctuation`` with
    calibration data, which measured best on MiniLM, benchmarks/prune_structured.py; ``l1`` without)."""

    kind = "head-prune"
    family = "prune"
    amount: float = 0.5
    importance: Literal["auto", "l1", "l2", "random", "activation", "fluctuation"] = "auto"
    seed: int = 0

    def validate(self) -> None:
        check_range("head-prune.amount", self.amount, 0.0, 1.0, hi_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FfnPruneConfig(Config):
    """Remove ``amount`` of the FFN intermediate neurons of every selected layer; kept counts are
    multiples of ``round_to``. ``importance`` as for :class:`HeadPruneConfig`."""

    kind = "ffn-prune"
    family = "prune"
    amount: float = 0.5
    importance: Literal["auto", "l1", "l2", "random", "activation", "fluctuation"] = "auto"
    round_to: int = 1
    seed: int = 0

    def validate(self) -> None:
        check_range("ffn-prune.amount", self.amount, 0.0, 1.0, hi_open=True)
        check_range("ffn-prune.round_to", self.round_to, 1, 4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerDropConfig(Config):
    """Drop whole transformer layers / residual blocks: the ``layers`` given, or else ``amount`` of
    them with the least Block Influence (1 - cosine between a block's input and output on the
    calibration batch; Men et al. 2024, ShortGPT)."""

    kind = "layer-drop"
    family = "prune"
    amount: float = 0.25
    layers: tuple[int, ...] = ()

    def validate(self) -> None:
        check_range("layer-drop.amount", self.amount, 0.0, 1.0, hi_open=True)
        if any(i < 0 for i in self.layers):
            raise ConfigError(f"layer-drop.layers={list(self.layers)} must be layer indices >= 0")


def _heads_to_keep(scores: torch.Tensor, heads: int, kv: int, amount: float) -> torch.Tensor:
    kv = 1 if kv == heads else kv  # plain multi-head attention: one pool of heads
    per = heads // kv
    n_keep = max(1, per - math.floor(per * amount))
    keep = [g * per + torch.topk(scores[g * per:(g + 1) * per], n_keep).indices for g in range(kv)]
    return torch.sort(torch.cat(keep)).values


def _unit_scores(stats: dict[int, InputStats], consumers: list[nn.Module], criterion: str, n_units: int) -> torch.Tensor:
    """Data-aware score per unit: its consumers' input-feature scores summed over the unit's features."""
    total = sum(feature_scores(m, stats[id(m)], criterion) for m in consumers)
    return total.reshape(n_units, -1).sum(1)


def _removal_checked(model: nn.Module, refs: list, kind: str, cuts: list[tuple[nn.Module, torch.Tensor]],
                     stats: dict[int, InputStats] | None, prune: Any) -> None:
    """Compensate (fluctuation), take the masked original's outputs (consumer inputs ``cuts`` zeroed),
    run ``prune()`` and check the pruned model against them."""
    if stats is not None:
        for m, removed in cuts:
            compensate(m, stats[id(m)], removed)
    masked = None
    if refs and cuts:
        names = {id(m): n for n, m in model.named_modules()}
        twin = copy.deepcopy(model)
        for m, removed in cuts:
            zero_inputs(twin.get_submodule(names[id(m)]), removed)
        masked = run_outputs(twin, refs)
        del twin
    prune()
    verify(model, refs, kind, masked=masked)


def _dropped(n: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def _selected_layers(model: nn.Module, select: Select | None, kind: str) -> list[tuple[str, list[nn.Module]]]:
    """(stack name, its selected layers) for every stack of transformer layers."""
    out = [(prefix, [b for i, b in enumerate(layers) if _layer_selected(prefix, i, select)])
           for prefix, layers in find_stacks(model)]
    out = [(p, ls) for p, ls in out if ls]
    if not out:
        raise UnsupportedLayerError(f"{kind}: the selection matched no transformer layer of {type(model).__name__}")
    return out


def _whole(select: Select | None) -> bool:
    return select is None or not (select.include or select.exclude)


def _head_table(att: Any) -> bool:
    return any(isinstance(c, nn.Embedding) and c.embedding_dim == att.heads for c in att.module.children())


def head_prune(model: nn.Module, config: HeadPruneConfig, *, select: Select | None = None, data: Any = None,
               **_: Any) -> nn.Module:
    batch = probe_batch(model, data)
    refs = reference(model, batch)
    gen = torch.Generator().manual_seed(config.seed)
    criterion = resolve(config.importance, data)
    per_layer = [(prefix, layer_attentions(model, layers, batch))
                 for prefix, layers in _selected_layers(model, select, "head-prune")]
    atts = [a for _, layers in per_layer for ats in layers for a in ats]
    stats = input_stats(model, [a.o for a in atts], data) if criterion in DATA_AWARE else None
    scores = {id(a): (_unit_scores(stats, [a.o], criterion, a.heads) if stats is not None
                      else head_scores(a, criterion, gen)) for a in atts}
    for _, layers in per_layer:  # a per-head table one layer computes and all read (T5's relative position
        if any(_head_table(a) for ats in layers for a in ats):  # bias): every layer keeps the same heads
            for j in range(min(len(ats) for ats in layers)):
                total = sum(scores[id(ats[j])] for ats in layers)
                for ats in layers:
                    scores[id(ats[j])] = total
    plan, cuts = [], []
    for att in atts:
        keep = _heads_to_keep(scores[id(att)], att.heads, att.kv_heads, config.amount)
        if len(keep) < att.heads:
            plan.append((att, keep))
            cols = _dropped(att.heads, keep)
            cuts.append((att.o, (cols[:, None] * att.head_dim + torch.arange(att.head_dim)[None, :]).reshape(-1)))
    old = {prefix: layers[0][0].heads for prefix, layers in per_layer}

    def prune() -> None:
        for att, keep in plan:
            prune_heads(att, keep)

    _removal_checked(model, refs, "head-prune", cuts, stats if criterion == "fluctuation" else None, prune)
    if _whole(select):
        set_stack_config(model, "heads", [(prefix, old[prefix], layers[0][0].heads) for prefix, layers in per_layer])
    record_structure(model)
    current(model).notes.update({"importance": criterion})
    return model


def ffn_prune(model: nn.Module, config: FfnPruneConfig, *, select: Select | None = None, data: Any = None,
              **_: Any) -> nn.Module:
    batch = probe_batch(model, data)
    refs = reference(model, batch)
    gen = torch.Generator().manual_seed(config.seed)
    criterion = resolve(config.importance, data)
    units = [(prefix, ups, downs) for prefix, layers in _selected_layers(model, select, "ffn-prune")
             for ups, downs in layer_ffns(model, prefix, layers, batch)]
    stats = input_stats(model, [d for _, _, downs in units for d in downs], data) if criterion in DATA_AWARE else None
    plan, cuts = [], []
    for prefix, ups, downs in units:
        n = out_features(ups[0])
        n_keep = max(1, n - math.floor(n * config.amount))
        if config.round_to > 1:
            n_keep = min(n, max(config.round_to, math.ceil(n_keep / config.round_to) * config.round_to))
        scores = (_unit_scores(stats, downs, criterion, n) if stats is not None
                  else ffn_scores(ups, downs, criterion, gen))
        keep = torch.sort(torch.topk(scores, n_keep).indices).values
        plan.append((prefix, n, ups, downs, keep))
        cuts.extend((d, _dropped(n, keep)) for d in downs)

    def prune() -> None:
        for _, _, ups, downs, keep in plan:
            for m in ups:
                select_dim(m, "out", keep)
            for m in downs:
                select_dim(m, "in", keep)

    _removal_checked(model, refs, "ffn-prune", cuts, stats if criterion == "fluctuation" else None, prune)
    if _whole(select):
        firsts = {}
        for prefix, n, _, _, keep in plan:
            firsts.setdefault(prefix, (prefix, n, len(keep)))
        set_stack_config(model, "ffn", list(firsts.values()))
    record_structure(model)
    current(model).notes.update({"importance": criterion})
    return model


def _block_influence(model: nn.Module, blocks: list[tuple[str, nn.Module]], batch: Any) -> dict[str, float]:
    scores: dict[str, float] = {}
    hooks = []

    def make(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            y = out[0] if isinstance(out, tuple) else out
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape:
                cos = F.cosine_similarity(x.flatten(2) if x.dim() > 3 else x, y.flatten(2) if y.dim() > 3 else y, dim=-1)
                scores[name] = float(1 - cos.mean())
        return hook

    for n, b in blocks:
        hooks.append(b.register_forward_hook(make(n), with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return scores


def _residual_blocks(model: nn.Module, batch: Any) -> list[tuple[str, nn.Module]]:
    """Blocks inside Sequentials whose output has the input's shape (droppable to Identity)."""
    cands = [(f"{pn}.{cn}" if pn else cn, c) for pn, p in model.named_modules() if isinstance(p, nn.Sequential)
             for cn, c in p.named_children() if any(True for _ in c.parameters()) and len(list(c.children())) > 1]
    scores = _block_influence(model, cands, batch)
    return [(n, b) for n, b in cands if n in scores]


def _odd_layers(layers: nn.ModuleList) -> dict[int, str]:
    """Layers holding parameters the stack's other layers lack (T5's first block owns the relative
    position table the others read): dropping one would change what the others compute."""
    keys = [frozenset(n for n, _ in b.named_parameters()) for b in layers]
    common = max(set(keys), key=keys.count)
    return {i: sorted(k - common)[0] for i, k in enumerate(keys) if k - common}


def _drop_hf(model: nn.Module, config: LayerDropConfig, stacks: list[tuple[str, nn.ModuleList]],
             select: Select | None, data: Any) -> list[str]:
    if config.layers and len(stacks) > 1:
        raise ConfigError(f"layer-drop.layers: {type(model).__name__} has {len(stacks)} layer stacks "
                          f"({', '.join(f'{p} ({len(ls)})' for p, ls in stacks)}); choose with select and amount instead")
    cands, fixed = {}, {}
    for prefix, layers in stacks:
        odd = _odd_layers(layers)
        fixed.update({f"{prefix}.{i}": why for i, why in odd.items()})
        cands[prefix] = [(f"{prefix}.{i}", b) for i, b in enumerate(layers) if _layer_selected(prefix, i, select) and i not in odd]
    if config.layers:
        prefix, layers = stacks[0]
        names = [f"{prefix}.{i}" for i in config.layers if i < len(layers)]
        if len(names) != len(config.layers):
            raise ConfigError(f"layer-drop.layers={list(config.layers)}: the model has {len(layers)} layers")
        bad = [n for n in names if n in fixed]
        if bad:
            raise ConfigError(f"layer-drop.layers: {bad[0]} holds {fixed[bad[0]]}, which the other layers use; it cannot be dropped")
    else:
        want = {prefix: math.floor(len(layers) * config.amount) for prefix, layers in stacks}
        if config.amount > 0 and not any(want.values()):
            n = max(len(ls) for _, ls in stacks)
            raise UnsupportedLayerError(
                f"layer-drop: amount {config.amount} of {n} droppable layer(s) removes none (a model whose "
                "layers are one shared group, e.g. ALBERT, cannot lose layers this way); raise amount or name `layers`")
        blocks = [nb for prefix in cands for nb in cands[prefix]]
        bi = _block_influence(model, blocks, first_batch(model, data)) if blocks else {}
        names = []
        for prefix, _ in stacks:
            ranked = sorted((n for n, _ in cands[prefix] if n in bi), key=bi.get)
            names += ranked[:want[prefix]]
    changes = []
    for prefix, layers in stacks:
        drop = {int(n.rsplit(".", 1)[1]) for n in names if n.rpartition(".")[0] == prefix}
        if not drop:
            continue
        kept = [b for i, b in enumerate(layers) if i not in drop]
        if not kept:
            raise ConfigError(f"layer-drop would remove every layer of {prefix}; keep at least one")
        for j, b in enumerate(kept):
            for m in b.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = j
        set_module(model, prefix, nn.ModuleList(kept))
        changes.append((prefix, len(layers), len(kept)))
        for cfg in hf_configs(model):
            lt = getattr(cfg, "layer_types", None)
            if len(stacks) == 1 and isinstance(lt, list) and len(lt) == len(layers):
                cfg.layer_types = [t for i, t in enumerate(lt) if i not in drop]
    set_stack_config(model, "layers", changes)
    record_structure(model)
    return names


def layer_drop(model: nn.Module, config: LayerDropConfig, *, select: Select | None = None, data: Any = None,
               **_: Any) -> nn.Module:
    refs = reference(model, probe_batch(model, data))
    try:
        stacks = find_stacks(model)
    except UnsupportedLayerError:
        stacks = []
    if stacks:
        names = _drop_hf(model, config, stacks, select, data)
    else:
        blocks = _residual_blocks(model, first_batch(model, data))
        blocks = [(n, b) for n, b in blocks if select is None or not select.exclude
                  or not any(name_matches(n, p) for p in select.exclude)]
        if not blocks:
            raise UnsupportedLayerError(f"layer-drop: no droppable layer or same-shape residual block in {type(model).__name__}")
        if config.layers:
            if any(i >= len(blocks) for i in config.layers):
                raise ConfigError(f"layer-drop.layers={list(config.layers)}: the model has {len(blocks)} droppable layers")
            names = [blocks[i][0] for i in config.layers]
        else:
            n_drop = math.floor(len(blocks) * config.amount)
            if config.amount > 0 and n_drop == 0:
                raise UnsupportedLayerError(
                    f"layer-drop: amount {config.amount} of {len(blocks)} droppable block(s) removes none; raise amount "
                    "or name `layers`")
            bi = _block_influence(model, blocks, first_batch(model, data))
            names = sorted(bi, key=bi.get)[:n_drop]
        for n in names:
            set_module(model, n, nn.Identity())
    current(model).changed.update({n: "dropped" for n in sorted(names)})
    verify(model, refs, "layer-drop")
    return model


register(HeadPruneConfig, head_prune)
register(FfnPruneConfig, ffn_prune)
register(LayerDropConfig, layer_drop)
