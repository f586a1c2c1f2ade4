"""Activation-aware weight scaling (AWQ; Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration"). Input channels that carry large activations matter most; scaling
those weight columns up by ``s`` (and the input down by ``s``, folded into the op that produces it) makes
their rounding error relatively smaller. The float model computes exactly the same; only the quantized
one changes. ``s = mean|x|^alpha`` (normalized), alpha searched on a grid per group of Linears sharing
one input, minimizing the quantized group's output error on calibration inputs.

Groups of a Llama-family decoder layer (found by name; a layer without them is left unscaled):
``input_layernorm -> q/k/v``, ``v_proj -> o_proj`` (only where there is one KV head per query head),
``post_attention_layernorm -> gate/up``, ``up_proj -> down_proj``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchshrink.llm.wquant import Grid, rtn

ALPHAS = [i / 20 for i in range(20)]
MAX_ROWS = 4096  # calibration tokens kept per group for the search


@dataclasses.dataclass
class ScaleGroup:
    name: str
    prev: nn.Module  # the op whose output feeds the linears: a norm (weight) or a Linear (rows)
    linears: list[nn.Linear]


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    out = []
    ln1, ln2 = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
    q, k, v, o = (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if ln1 is not None and hasattr(ln1, "weight") and all(isinstance(m, nn.Linear) for m in (q, k, v)):
        out.append(ScaleGroup("qkv", ln1, [q, k, v]))
    if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and v.out_features == o.in_features:
        out.append(ScaleGroup("o", v, [o]))
    if ln2 is not None and hasattr(ln2, "weight") and all(isinstance(m, nn.Linear) for m in (gate, up)):
        out.append(ScaleGroup("gate_up", ln2, [gate, up]))
    if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
        out.append(ScaleGroup("down", up, [down]))
    return out


def _loss(x: torch.Tensor, linears: list[nn.Linear], s: torch.Tensor, grid: Grid, refs: list[torch.Tensor]) -> float:
    total = 0.0
    for lin, ref in zip(linears, refs, strict=True):
        wq = rtn(lin.weight.detach().float() * s, grid).dequantized() / s
        total += float((x @ wq.T - ref).pow(2).sum())
    return total


@torch.no_grad()
def search_and_scale(group: ScaleGroup, x: torch.Tensor, grid: Grid) -> float:
    """Find alpha for ``group`` on inputs ``x`` [tokens, in], fold the scales in, return alpha (0: none)."""
    x = x.float()
    s_x = x.abs().mean(0).clamp_min(1e-8)
    refs = [x @ lin.weight.detach().float().T for lin in group.linears]
    best, best_alpha, best_s = None, 0.0, None
    for alpha in ALPHAS:
        s = s_x.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp_min(1e-4)
        loss = _loss(x, group.linears, s, grid, refs)  # x @ (Q(W s) / s)^T == (x / s) @ Q(W s)^T
        if best is None or loss < best:
            best, best_alpha, best_s = loss, alpha, s
    if best_alpha == 0.0 or best_s is None:
        return 0.0
    s = best_s
    prev = group.prev
    if isinstance(prev, nn.Linear):  # its output rows feed the group
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # a norm: y = norm(x) * weight (+ bias)
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for lin in group.linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))
    return best_alpha


def awq_layer(layer: nn.Module, inps: list[torch.Tensor], run: Callable[[nn.Module, torch.Tensor], Any],
              grid: Grid) -> dict[str, float]:
    """Scale every group of one decoder layer in turn (each search sees the inputs after the previous
    groups' scaling); returns alpha per group. The float layer must compute what it did before (checked
    on the first calibration input); a layer whose norms do not scale that way (e.g. Gemma's
    ``1 + weight``) is restored and left unscaled (empty result)."""
    alphas = {}
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        before = run(layer, inps[0]).float()
    for group in scale_groups(layer):
        rows: list[torch.Tensor] = []

        def hook(mod: nn.Module, args: tuple, rows: list = rows) -> None:
            if sum(r.shape[0] for r in rows) < MAX_ROWS:
                rows.append(args[0].detach().reshape(-1, args[0].shape[-1]))

        h = group.linears[0].register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                for x in inps:
                    run(layer, x)
                    if sum(r.shape[0] for r in rows) >= MAX_ROWS:
                        break
        finally:
            h.remove()
        alphas[group.name] = search_and_scale(group, torch.cat(rows)[:MAX_ROWS], grid)
    with torch.no_grad():
        after = run(layer, inps[0]).float()
    if float((after - before).abs().max()) > 1e-3 * max(float(before.abs().max()), 1e-6):
        layer.load_state_dict(saved)
        return {}
    return alphas
