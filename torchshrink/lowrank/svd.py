"""Truncated SVD of Linear layers: ``Linear(n -> m)`` becomes ``Linear(n -> r, no bias)`` then
``Linear(r -> m)`` inside an ``nn.Sequential`` (plain modules, so save/load rebuilds it).

By default the SVD of the weight is truncated (best rank-r approximation in Frobenius norm: the
error is the dropped singular values' energy). With ``data_aware`` the truncation minimizes the
layer's output error on the calibration inputs X instead: SVD of W L with X^T X = L L^T
(the whitening idea of SVD-LLM, Wang et al. 2024).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core.config import register
from torchshrink.core.errors import ConfigError, DataError
from torchshrink.core.select import Select, config_for, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.lowrank.common import (
    LowRankConfig,
    check_type,
    first_inputs,
    io_shapes,
    mark,
    note_done,
    note_skip,
    real_rows,
    run_calibration,
    speedup,
)
from torchshrink.lowrank.rank import Option, allocate, check_rank, energy_rank, fast_svd, round_rank, vbmf_rank


def svd_factors(
    weight: torch.Tensor, rank: int, chol: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, n], B [m, r])`` with ``B @ A`` the rank-r approximation of ``weight [m, n]``
    (the singular values split evenly between the two factors)."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    target = w @ chol if chol is not None else w
    u, s, vh = fast_svd(target)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    if chol is not None:  # A = sqrt(S) V^T L^-1
        a = torch.linalg.solve_triangular(chol.T, a.T, upper=True).T
    b = u[:, :rank] * root[None, :]
    return a.to(weight.dtype), b.to(weight.dtype)


def singular_values(weight: torch.Tensor, chol: torch.Tensor | None = None) -> torch.Tensor:
    w = weight.detach().double().reshape(weight.shape[0], -1)
    return fast_svd(w @ chol if chol is not None else w)[1]


def linear_rank(weight: torch.Tensor, cfg: LowRankConfig, name: str, chol: torch.Tensor | None = None) -> int:
    """The rank ``cfg`` asks for on a ``[m, n]`` weight (checked against min(m, n))."""
    m, n = weight.shape[0], weight[0].numel()
    upper = min(m, n)
    if cfg.method == "rank":
        check_rank(cfg.rank, upper, f"layer {name!r} ({m}x{n})")
        return cfg.rank
    if cfg.method == "ratio":
        return round_rank(cfg.ratio * m * n / (m + n), cfg.rank_multiple, upper)
    if cfg.method == "energy":
        return round_rank(energy_rank(singular_values(weight, chol), cfg.energy), cfg.rank_multiple, upper)
    w = weight.detach().double().reshape(m, -1)
    return round_rank(vbmf_rank(w @ chol if chol is not None else w), cfg.rank_multiple, upper)


def linear_options(weight: torch.Tensor, positions: int, steps: int, multiple: int,
                   chol: torch.Tensor | None = None) -> list[Option]:
    """A ladder of ``steps`` ranks of a ``[m, n]`` weight, by decreasing cost: each rung's cost is
    ``r (m + n) positions`` (MACs; ``positions=1``: weights) and its error the relative squared
    error of the truncation (of ``W L`` when the input Cholesky factor ``chol`` is given, i.e. the
    relative output error on the calibration inputs). Only rungs cheaper than the dense layer."""
    m, n = weight.shape[0], weight[0].numel()
    s2 = singular_values(weight, chol).pow(2)
    rel = 1.0 - torch.cumsum(s2, 0) / float(s2.sum() or 1.0)
    opts: dict[int, Option] = {}
    for j in range(steps, 0, -1):
        r = round_rank(min(m, n) * j / steps, multiple, min(m, n))
        opts[r] = Option((r,), r * (m + n) * positions, float(rel[r - 1]))
    return [o for o in sorted(opts.values(), key=lambda o: -o.macs) if o.macs < m * n * positions]


def global_ranks(layers: list[tuple[str, nn.Linear]], ratio: float, multiple: int,
                 chols: dict[str, torch.Tensor], steps: int = 64) -> dict[str, int | None]:
    """Ranks that keep ``ratio`` of the layers' total weights, spending the cut where the relative
    (whitened, when ``chols`` has the layer) error grows least per weight saved
    (:func:`torchshrink.lowrank.rank.allocate`). ``None``: the layer stays dense."""
    opts = {n: linear_options(lin.weight, 1, steps, multiple, chols.get(n)) for n, lin in layers}
    dense = {n: lin.weight.numel() for n, lin in layers}
    budget = int(ratio * sum(dense.values()))
    chosen = allocate({n: o for n, o in opts.items() if o}, {n: dense[n] for n in dense if opts[n]},
                      budget - sum(dense[n] for n in dense if not opts[n]))
    return {n: (chosen[n].setting[0] if chosen.get(n) is not None else None) for n in dense}


def factorize_linear(linear: nn.Linear, rank: int, chol: torch.Tensor | None = None) -> nn.Sequential:
    """``Linear`` -> ``Sequential(Linear(n, r, bias=False), Linear(r, m))`` at rank ``rank``."""
    a, b = svd_factors(linear.weight, rank, chol)
    first = nn.Linear(linear.in_features, rank, bias=False, device=a.device, dtype=a.dtype)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, device=a.device, dtype=a.dtype)
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(b)
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
    return mark(nn.Sequential(first, second), "svd")


def fused_linear(linear: nn.Linear, rank: int, chol: torch.Tensor | None = None) -> nn.Linear:
    """One dense ``Linear`` holding the rank-r approximation (the path when factors don't pay)."""
    a, b = svd_factors(linear.weight, rank, chol)
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=a.device, dtype=a.dtype)
    with torch.no_grad():
        out.weight.copy_(b @ a)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def input_cholesky(model: nn.Module, names: list[str], data: Any, damp: float = 1e-4) -> dict[str, torch.Tensor]:
    """Lower Cholesky factor of each named Linear's input second moment X^T X / N on ``data``
    (padded token positions of tokenized batches left out: they are not real inputs)."""
    if not data:
        raise DataError("svd with data_aware=True needs calibration batches (data=[...]); none were given")
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    state: dict[str, Any] = {}

    def hook(m: nn.Module, args: tuple, out: torch.Tensor, n: str) -> None:
        x = real_rows(args[0].detach(), state.get("mask")).double()
        acc[n] = acc.get(n, 0) + x.T @ x
        count[n] = count.get(n, 0) + x.shape[0]

    run_calibration(model, data, {n: (lambda m, a, o, n=n: hook(m, a, o, n)) for n in names}, state)
    out = {}
    for n in names:
        if n not in acc:
            raise DataError(f"layer {n!r} was not reached by the calibration data; it cannot be fitted data-aware")
        c = acc[n] / count[n]
        c = c + damp * float(c.diagonal().mean().clamp_min(1e-12)) * torch.eye(c.shape[0], dtype=c.dtype)
        out[n] = torch.linalg.cholesky(c)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVDConfig(LowRankConfig):
    """Truncated SVD of Linear layers (see :class:`LowRankConfig` for rank selection).

    ``allocation="global"`` (with ``method="ratio"``): the selected layers together keep ``ratio``
    of their weights, with per-layer ranks chosen by the measured relative error (whitened with
    ``data_aware``) instead of every layer keeping ``ratio`` of its own; a layer may stay dense.
    The relative error is a sum over output features: where a few features carry most of the
    output energy (transformer FFN outputs), it can look small at a very low rank -- on MiniLM's
    FFNs it cut output layers to rank 6, so compare with ``allocation="layer"`` on held-out data."""

    kind = "svd"
    data_aware: bool = False
    allocation: Literal["layer", "global"] = "layer"

    def validate(self) -> None:
        super().validate()
        if self.allocation == "global" and self.method != "ratio":
            raise ConfigError(f"svd.allocation='global' spends a weight ratio across layers; it needs method='ratio', "
                              f"not {self.method!r} (or use allocation='layer')")


def apply_svd(model: nn.Module, config: SVDConfig, *, select: Select | None = None, data: Any = None,
              **kwargs: Any) -> nn.Module:
    layers = select_modules(model, select, ("Linear",), replaces=True)
    for name, module in layers:
        check_type(name, module, (nn.Linear,), "svd")
    names = [n for n, _ in layers]
    chols = input_cholesky(model, names, data) if config.data_aware else {}
    shapes = io_shapes(model, names, first_inputs(model, data)) if config.check_latency else {}
    ranks = global_ranks(layers, config.ratio, config.rank_multiple, chols) if config.allocation == "global" else {}
    for name, lin in layers:
        cfg = config_for(name, config, select)
        chol = chols.get(name)
        if name in ranks and ranks[name] is None:
            note_skip(model, name, "left dense by the global allocation (cheapest error elsewhere)")
            continue
        rank = ranks.get(name) or linear_rank(lin.weight, cfg, name, chol)
        m, n = lin.out_features, lin.in_features
        new_params = rank * (m + n)
        reason = None
        if new_params >= m * n:
            reason = f"factorized form is larger: rank {rank} needs {new_params} weights vs {m * n}"
        new = factorize_linear(lin, rank, chol)
        if reason is None and cfg.check_latency:
            sp = speedup(lin, new, shapes.get(name, ((1, n), None))[0])
            if sp < 1.0:
                reason = f"factorized form is slower on this machine ({sp:.2f}x at batch 1)"
        if reason is not None:
            if cfg.no_gain == "fuse":
                set_module(model, name, fused_linear(lin, rank, chol))
                reason += "; kept one dense layer holding the rank-r approximation"
            note_skip(model, name, reason)
            continue
        set_module(model, name, new)
        note_done(model, name, method="svd", rank=rank, weights_before=m * n, weights_after=new_params)
    return model


register(SVDConfig, apply_svd)
