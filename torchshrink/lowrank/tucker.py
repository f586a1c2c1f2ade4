"""Tucker-2 of Conv2d kernels (Kim et al., ICLR 2016): ``Conv(I -> O, k x k)`` becomes
``Conv 1x1 (I -> r_in)`` -> ``Conv k x k (r_in -> r_out)`` -> ``Conv 1x1 (r_out -> O)``.
The decomposition (HOOI initialized by HOSVD) is TensorLy's ``partial_tucker`` on the PyTorch
backend; TensorLy is imported lazily (extra ``lowrank``). A 1x1 conv is factorized by SVD
into two 1x1 convs instead.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.config import register
from torchshrink.core.errors import TorchshrinkError
from torchshrink.core.select import Select, config_for, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.lowrank.common import (
    LowRankConfig,
    check_type,
    conv_skip_reason,
    first_inputs,
    io_shapes,
    mark,
    note_done,
    note_skip,
    speedup,
)
from torchshrink.lowrank.rank import check_rank, energy_rank, fast_svd, round_rank, vbmf_rank
from torchshrink.lowrank.svd import svd_factors


def tensorly() -> Any:
    try:
        import tensorly as tl
    except ImportError:
        raise TorchshrinkError("Tucker-2 and CP need TensorLy: pip install 'torchshrink[lowrank]'") from None
    return tl


def unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def spatial_ratio(conv: nn.Conv2d, shapes: tuple | None) -> float:
    """Input pixels per output pixel (from measured shapes, else from the stride)."""
    if shapes is not None:
        (i, o) = shapes
        return (i[-1] * i[-2]) / max(o[-1] * o[-2], 1)
    return float(conv.stride[0] * conv.stride[1])


def tucker2_macs(c_in: int, c_out: int, k2: int, r_in: int, r_out: int, q: float) -> float:
    """MACs per output pixel of the Tucker-2 form (q = input pixels per output pixel)."""
    return c_in * r_in * q + r_in * r_out * k2 + r_out * c_out


def svd1x1_macs(c_in: int, c_out: int, r: int) -> float:
    return r * (c_in + c_out)


def feasible_ranks(r_out: int, r_in: int, c_out: int, c_in: int, k2: int) -> tuple[int, int]:
    """Tucker-2 ranks a kernel can have: each at most its channels, and each at most the other times
    the kernel area (the core's unfolding bounds it; e.g. an RGB conv's r_in <= 3 caps r_out at 27)."""
    r_in = max(1, min(r_in, c_in))
    r_out = max(1, min(r_out, c_out, r_in * k2))
    return r_out, min(r_in, r_out * k2)


def tucker2_ranks(conv: nn.Conv2d, cfg: LowRankConfig, name: str, q: float) -> tuple[int, int]:
    """``(r_out, r_in)`` for a conv as ``cfg`` asks (a 1x1 conv gets ``(r, r)``)."""
    r_out, r_in = _tucker2_ranks(conv, cfg, name, q)
    if conv.weight.shape[2] * conv.weight.shape[3] == 1:
        return r_out, r_in
    return feasible_ranks(r_out, r_in, conv.out_channels, conv.in_channels, conv.weight.shape[2] * conv.weight.shape[3])


def _tucker2_ranks(conv: nn.Conv2d, cfg: LowRankConfig, name: str, q: float) -> tuple[int, int]:
    w = conv.weight.detach()
    c_out, c_in = w.shape[0], w.shape[1]
    k2 = w.shape[2] * w.shape[3]
    if k2 == 1:
        upper = min(c_out, c_in)
        if cfg.method == "rank":
            check_rank(cfg.rank, upper, f"layer {name!r} ({c_out}x{c_in} 1x1 conv)")
            return cfg.rank, cfg.rank
        if cfg.method == "ratio":
            r = round_rank(cfg.ratio * c_in * c_out / (c_in + c_out), cfg.rank_multiple, upper)
        elif cfg.method == "energy":
            r = round_rank(energy_rank(fast_svd(w.reshape(c_out, -1))[1], cfg.energy),
                           cfg.rank_multiple, upper)
        else:
            r = round_rank(vbmf_rank(w.reshape(c_out, -1)), cfg.rank_multiple, upper)
        return r, r
    if cfg.method == "rank":
        check_rank(cfg.rank, min(c_out, c_in), f"layer {name!r} ({c_out}x{c_in}x{w.shape[2]}x{w.shape[3]} conv)")
        return cfg.rank, cfg.rank
    if cfg.method == "ratio":
        # r_in = beta * I, r_out = beta * O; solve MACs(beta) = ratio * dense for beta
        a, b, c = c_in * c_out * k2, c_in * c_in * q + c_out * c_out, -cfg.ratio * c_in * c_out * k2
        beta = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        return round_rank(beta * c_out, cfg.rank_multiple, c_out), round_rank(beta * c_in, cfg.rank_multiple, c_in)
    ranks = []
    for mode, size in ((0, c_out), (1, c_in)):
        mat = unfold(w.double(), mode)
        if cfg.method == "energy":
            r = energy_rank(fast_svd(mat)[1], cfg.energy)
        else:
            r = vbmf_rank(mat)
        ranks.append(round_rank(r, cfg.rank_multiple, size))
    return ranks[0], ranks[1]


def tucker2_factors(weight: torch.Tensor, r_out: int, r_in: int, n_iter: int = 2,
                    solver: str = "gram") -> tuple[torch.Tensor, ...]:
    """``(U_out [O, r_out], core [r_out, r_in, kh, kw], U_in [I, r_in])``: HOOI initialized by HOSVD.

    ``solver="tensorly"`` runs TensorLy's ``partial_tucker``; the default ``gram`` does the same
    iterations with Gram-matrix eigendecompositions, because on the 2-core benchmark machine
    TensorLy took 361 s for one 512x512x3x3 ResNet-18 kernel (its SVDs dominate) against seconds."""
    w = weight.detach().double()
    if solver == "tensorly":
        tl = tensorly()
        from tensorly.decomposition import partial_tucker

        with tl.backend_context("pytorch"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (core, factors), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=n_iter)
        return factors[0], core, factors[1]
    u_out = fast_svd(unfold(w, 0))[0][:, :r_out]
    u_in = fast_svd(unfold(w, 1))[0][:, :r_in]
    for _ in range(n_iter):  # HOOI sweeps
        u_out = fast_svd(unfold(torch.einsum("oikl,is->oskl", w, u_in), 0))[0][:, :r_out]
        u_in = fast_svd(unfold(torch.einsum("oikl,or->rikl", w, u_out), 1))[0][:, :r_in]
    core = torch.einsum("rikl,is->rskl", torch.einsum("or,oikl->rikl", u_out, w), u_in)
    return u_out, core, u_in


def _conv(c_in: int, c_out: int, conv: nn.Conv2d, *, spatial: bool, bias: bool, weight: torch.Tensor) -> nn.Conv2d:
    kw: dict[str, Any] = {}
    if spatial:
        kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)
    out = nn.Conv2d(c_in, c_out, tuple(weight.shape[2:]), bias=bias, device=conv.weight.device,
                    dtype=conv.weight.dtype, **kw)
    with torch.no_grad():
        out.weight.copy_(weight)
    return out


def factorize_tucker2(conv: nn.Conv2d, r_out: int, r_in: int, solver: str = "gram") -> nn.Sequential:
    """The Tucker-2 (or, for 1x1 kernels, SVD) replacement of ``conv``."""
    w = conv.weight
    c_out, c_in = w.shape[0], w.shape[1]
    has_bias = conv.bias is not None
    if w.shape[2] * w.shape[3] == 1:
        a, b = svd_factors(w, r_out)
        seq = nn.Sequential(
            _conv(c_in, r_out, conv, spatial=True, bias=False, weight=a.reshape(r_out, c_in, 1, 1)),
            _conv(r_out, c_out, conv, spatial=False, bias=has_bias, weight=b.reshape(c_out, r_out, 1, 1)),
        )
        kind = "svd1x1"
    else:
        r_out, r_in = feasible_ranks(r_out, r_in, c_out, c_in, w.shape[2] * w.shape[3])
        u_out, core, u_in = (t.to(w.dtype) for t in tucker2_factors(w, r_out, r_in, solver=solver))
        seq = nn.Sequential(
            _conv(c_in, r_in, conv, spatial=False, bias=False, weight=u_in.T.reshape(r_in, c_in, 1, 1)),
            _conv(r_in, r_out, conv, spatial=True, bias=False, weight=core),
            _conv(r_out, c_out, conv, spatial=False, bias=has_bias, weight=u_out.reshape(c_out, r_out, 1, 1)),
        )
        kind = "tucker2"
    if has_bias:
        with torch.no_grad():
            seq[-1].bias.copy_(conv.bias)
    return mark(seq, kind)


def dense_weight(seq: nn.Sequential) -> torch.Tensor:
    """The kernel of a linear chain of convs made by this package, as one conv weight."""
    kind = state.get(seq, "lowrank", "")
    ws = [m.weight.detach().double() for m in seq]
    if kind == "svd1x1":
        return torch.einsum("or,ri->oi", ws[1][:, :, 0, 0], ws[0][:, :, 0, 0])[:, :, None, None]
    if kind == "tucker2":
        return torch.einsum("or,rskl,si->oikl", ws[2][:, :, 0, 0], ws[1], ws[0][:, :, 0, 0])
    if kind == "cp":
        return torch.einsum("or,rk,rl,ri->oikl", ws[3][:, :, 0, 0], ws[1][:, 0, :, 0], ws[2][:, 0, 0, :], ws[0][:, :, 0, 0])
    if kind == "separable":
        groups = seq[0].groups
        mult = ws[0].shape[0] // groups
        dw = ws[0].reshape(groups, mult, *ws[0].shape[2:])
        pw = ws[1][:, :, 0, 0].reshape(ws[1].shape[0], groups, mult)
        return torch.einsum("oim,imkl->oikl", pw, dw)
    raise TorchshrinkError(f"not a factorized conv made by torchshrink (kind {kind!r})")


def fused_conv(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    """A dense conv shaped like ``conv`` holding ``weight`` (the path when factors don't pay)."""
    out = _conv(conv.in_channels, conv.out_channels, conv, spatial=True, bias=conv.bias is not None,
                weight=weight.to(conv.weight.dtype))
    if conv.bias is not None:
        with torch.no_grad():
            out.bias.copy_(conv.bias)
    return out


def replace_convs(model: nn.Module, config: LowRankConfig, select: Select | None, data: Any, kind: str,
                  plan: Any, build: Any, dense_macs: Any) -> nn.Module:
    """Shared loop of the conv techniques: ``plan(conv, cfg, name, q) -> setting``,
    ``build(conv, setting) -> Sequential``, ``dense_macs(conv, setting, q) -> (new, old)`` per pixel."""
    layers = select_modules(model, select, ("Conv2d",), replaces=True)
    for name, module in layers:
        check_type(name, module, (nn.Conv2d,), kind)
    names = [n for n, _ in layers]
    shapes = io_shapes(model, names, first_inputs(model, data))
    if config.check_latency and not shapes:
        raise TorchshrinkError(f"{kind} with check_latency needs example inputs (data=[...]) to time each layer")
    for name, conv in layers:
        cfg = config_for(name, config, select)
        why = conv_skip_reason(conv)
        if why is not None:
            note_skip(model, name, why)
            continue
        q = spatial_ratio(conv, shapes.get(name))
        setting = plan(conv, cfg, name, q)
        new_cost, old_cost = dense_macs(conv, setting, q)
        new = build(conv, setting)
        reason = None
        if new_cost >= old_cost:
            reason = f"factorized form is larger: {new_cost:.0f} vs {old_cost:.0f} MACs per output pixel"
        elif cfg.check_latency:
            sp = speedup(conv, new, shapes[name][0])
            if sp < 1.0:
                reason = f"factorized form is slower on this machine ({sp:.2f}x at batch 1)"
        if reason is not None:
            if cfg.no_gain == "fuse":
                set_module(model, name, fused_conv(conv, dense_weight(new)))
                reason += "; kept one dense conv holding the low-rank approximation"
            note_skip(model, name, reason)
            continue
        set_module(model, name, new)
        note_done(model, name, method=state.get(new, "lowrank"), setting=list(setting),
                  macs_ratio=round(new_cost / old_cost, 4))
    return model


def _tucker_cost(conv: nn.Conv2d, ranks: tuple[int, int], q: float) -> tuple[float, float]:
    c_out, c_in, kh, kw = conv.weight.shape
    if kh * kw == 1:
        return svd1x1_macs(c_in, c_out, ranks[0]), float(c_in * c_out)
    return tucker2_macs(c_in, c_out, kh * kw, ranks[1], ranks[0], q), float(c_in * c_out * kh * kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tucker2Config(LowRankConfig):
    """Tucker-2 of Conv2d layers (1x1 convs: SVD). ``ratio`` is the layer's MAC ratio;
    ``rank`` sets both the input and the output rank. ``solver``: ``gram`` (HOOI through Gram
    eigendecompositions, fast) or ``tensorly`` (TensorLy's ``partial_tucker``)."""

    kind = "tucker2"
    solver: Literal["gram", "tensorly"] = "gram"


def apply_tucker2(model: nn.Module, config: Tucker2Config, *, select: Select | None = None, data: Any = None,
                  **kwargs: Any) -> nn.Module:
    return replace_convs(model, config, select, data, "tucker2", tucker2_ranks,
                         lambda conv, s: factorize_tucker2(conv, s[0], s[1], config.solver), _tucker_cost)


register(Tucker2Config, apply_tucker2)
