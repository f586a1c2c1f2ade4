"""Latency-aware allocation: how much measured time each group's channels cost per MAC.

On a CPU, a MAC does not cost the same everywhere: 1x1 convolutions on large feature maps and
late layers with big weights and tiny maps (weight-memory bound at batch 1) take more time per
MAC than a 3x3 convolution in the middle of the net, and BatchNorm / activation time follows
the activation size, not the MACs. Cutting the same number of MACs where time per MAC is highest
removes more time. The idea of spending a pruning budget by measured latency is from HALP (Shen et
al. 2022, "Structural Pruning via Latency-Saliency Knapsack"); here it only scales how hard each
group is cut, importance still picks the channels inside a group.

The cost model times every leaf module of the model on the example batch (forward hooks, median
over runs) and pools the times of modules with the same signature (type, tensor shapes, stride,
input shape) so that repeated blocks share one, less noisy, figure. MACs per module come from
``torchshrink.measure.count_macs`` (torch.utils.flop_counter).
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
from typing import Any

import torch
from torch import nn

from torchshrink.measure.counts import count_macs
from torchshrink.prune.structured.groups import Group
from torchshrink.prune.structured.trace import Graph, call_model

log = logging.getLogger(__name__)


def _signature(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
    params = tuple(tuple(p.shape) for p in mod.parameters(recurse=False))
    extra = tuple(getattr(mod, a, None) for a in ("stride", "padding", "dilation", "groups"))
    return (type(mod).__name__, shapes, params, extra)


def module_times(model: nn.Module, batch: Any, *, runs: int = 8, warmup: int = 2) -> dict[str, float]:
    """Seconds per forward of every leaf module (median over ``runs``), pooled over modules with the
    same signature. A module called several times per forward gets the sum of its calls."""
    starts: dict[int, float] = {}
    per_run: dict[str, float] = collections.defaultdict(float)
    samples: dict[str, list[float]] = collections.defaultdict(list)
    sigs: dict[str, tuple[Any, ...]] = {}
    hooks = []

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        starts[id(mod)] = time.perf_counter()

    def post(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            per_run[name] += time.perf_counter() - starts[id(mod)]
            sigs.setdefault(name, _signature(mod, args))
        return hook

    for name, mod in model.named_modules():
        if name and next(mod.children(), None) is None:
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post(name))]
    try:
        with torch.inference_mode():
            for i in range(warmup + runs):
                per_run.clear()
                call_model(model, batch)
                if i >= warmup:
                    for n, t in per_run.items():
                        samples[n].append(t)
    finally:
        for h in hooks:
            h.remove()
    med = {n: statistics.median(v) for n, v in samples.items()}
    pooled: dict[tuple[Any, ...], list[float]] = collections.defaultdict(list)
    for n, t in med.items():
        pooled[sigs[n]].append(t)
    return {n: statistics.median(pooled[sigs[n]]) for n in med}


def module_macs(model: nn.Module, batch: Any) -> dict[str, int]:
    """MACs per module (by qualified name), from the shared counter in :mod:`torchshrink.measure`."""
    from torchshrink.core.data import Batch

    inputs = batch if isinstance(batch, dict | list | tuple) else (batch,)
    if isinstance(batch, Batch):  # positional and keyword inputs: count through a closure
        inputs = (batch,)
        model = _Bound(model)
    per = count_macs(model, inputs, per_module=True)
    assert isinstance(per, dict)
    if isinstance(model, _Bound):
        per = {n.removeprefix("model."): v for n, v in per.items() if n.startswith("model.")}
    return {n: v for n, v in per.items() if n}  # submodules only, not the root's total


def group_time_per_mac(
    model: nn.Module, g: Graph, groups: list[Group], batch: Any, *, runs: int = 8
) -> dict[int, float]:
    """For each group (by root): measured seconds its channels cost per MAC they cost, divided by
    the same figure for the whole model (so 1.0 is average; higher means cutting there saves more
    time per MAC). Groups whose modules do no MACs get 1.0."""
    times = module_times(model, batch, runs=runs)
    macs = module_macs(model, batch)
    total_t, total_m = sum(times.values()), sum(macs.get(n, 0) for n in times)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    out: dict[int, float] = {}
    for gr in groups:
        top_dim: dict[str, int] = {}
        for mem in gr.members:
            if mem.name in tensors:
                mod = mem.name.rpartition(".")[0]
                top_dim[mod] = max(top_dim.get(mod, 0), tensors[mem.name].dim())
        t_sum = m_sum = 0.0
        seen: set[tuple[str, int]] = set()
        for mem in gr.members:
            mod = mem.name.rpartition(".")[0]
            t = tensors.get(mem.name)
            # a bias follows its weight's output dim: count each (module, dim) of the fullest tensor once
            if t is None or t.dim() < top_dim[mod] or (mod, mem.dim) in seen:
                continue
            seen.add((mod, mem.dim))
            per_channel = gr.indices(g, mem, torch.arange(gr.size)).numel() / gr.size
            frac = min(1.0, per_channel / max(t.shape[mem.dim], 1))
            t_sum += times.get(mod, 0.0) * frac
            m_sum += macs.get(mod, 0) * frac
        out[gr.root] = (t_sum / m_sum) / (total_t / total_m) if m_sum > 0 and total_m > 0 and total_t > 0 else 1.0
    log.debug("latency weights: %s", {gr.producers[0]: round(out[gr.root], 2) for gr in groups if gr.producers})
    return out


class _Bound(nn.Module):
    """Runs a model on a Batch given as its one input (for the MACs counter, which passes *inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Any:
        return batch(self.model)
