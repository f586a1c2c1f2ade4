"""CP decomposition of Conv2d kernels (Lebedev et al., ICLR 2015): ``Conv(I -> O, kh x kw)``
becomes ``Conv 1x1 (I -> R)`` -> depthwise ``kh x 1`` -> depthwise ``1 x kw`` -> ``Conv 1x1 (R -> O)``.
The CP factors come from TensorLy's ``parafac`` (ALS) on the PyTorch backend."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from torchshrink.core.config import check_range, register
from torchshrink.core.select import Select
from torchshrink.lowrank.common import LowRankConfig, mark
from torchshrink.lowrank.rank import check_rank, energy_rank, fast_svd, round_rank, vbmf_rank
from torchshrink.lowrank.tucker import replace_convs, tensorly, unfold


def cp_upper(conv: nn.Conv2d) -> int:
    c_out, c_in, kh, kw = conv.weight.shape
    return min(c_out * c_in, c_out * kh * kw, c_in * kh * kw)


def cp_macs(conv: nn.Conv2d, rank: int, q: float) -> float:
    """MACs per output pixel of the CP form (q = input pixels per output pixel)."""
    c_out, c_in, kh, kw = conv.weight.shape
    return rank * (c_in * q + kh * conv.stride[1] + kw + c_out)


def cp_rank(conv: nn.Conv2d, cfg: LowRankConfig, name: str, q: float) -> tuple[int]:
    c_out, c_in, kh, kw = conv.weight.shape
    upper = cp_upper(conv)
    if cfg.method == "rank":
        check_rank(cfg.rank, upper, f"layer {name!r} ({c_out}x{c_in}x{kh}x{kw} conv, CP)")
        return (cfg.rank,)
    if cfg.method == "ratio":
        per_rank = cp_macs(conv, 1, q)
        return (round_rank(cfg.ratio * c_out * c_in * kh * kw / per_rank, cfg.rank_multiple, upper),)
    w = conv.weight.detach().double()
    if cfg.method == "energy":
        r = max(energy_rank(fast_svd(unfold(w, m))[1], cfg.energy) for m in (0, 1))
    else:
        r = max(vbmf_rank(unfold(w, m)) for m in (0, 1))
    return (round_rank(r, cfg.rank_multiple, upper),)


def cp_factors(weight: torch.Tensor, rank: int, n_iter: int = 100, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(A_out * weights [O, R], A_in [I, R], A_h [kh, R], A_w [kw, R])`` by TensorLy CP-ALS."""
    tl = tensorly()
    from tensorly.decomposition import parafac

    w = weight.detach().double()
    init = "svd" if rank <= min(w.shape) else "random"
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp = parafac(w, rank=rank, init=init, n_iter_max=n_iter, tol=1e-9, random_state=seed)
    a_out, a_in, a_h, a_w = cp.factors
    return a_out * cp.weights[None, :], a_in, a_h, a_w


def factorize_cp(conv: nn.Conv2d, rank: int, n_iter: int = 100) -> nn.Sequential:
    dt, dev = conv.weight.dtype, conv.weight.device
    c_out, c_in, kh, kw = conv.weight.shape
    a_out, a_in, a_h, a_w = (t.to(dt) for t in cp_factors(conv.weight, rank, n_iter))
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    mode = conv.padding_mode
    layers = [
        nn.Conv2d(c_in, rank, 1, bias=False, device=dev, dtype=dt),
        nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=rank,
                  bias=False, padding_mode=mode, device=dev, dtype=dt),
        nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=rank,
                  bias=False, padding_mode=mode, device=dev, dtype=dt),
        nn.Conv2d(rank, c_out, 1, bias=conv.bias is not None, device=dev, dtype=dt),
    ]
    with torch.no_grad():
        layers[0].weight.copy_(a_in.T.reshape(rank, c_in, 1, 1))
        layers[1].weight.copy_(a_h.T.reshape(rank, 1, kh, 1))
        layers[2].weight.copy_(a_w.T.reshape(rank, 1, 1, kw))
        layers[3].weight.copy_(a_out.reshape(c_out, rank, 1, 1))
        if conv.bias is not None:
            layers[3].bias.copy_(conv.bias)
    return mark(nn.Sequential(*layers), "cp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CPConfig(LowRankConfig):
    """CP decomposition of Conv2d layers. ``ratio`` is the layer's MAC ratio; ``rank`` the CP
    rank (at most the generic bound min(O*I, O*k*k, I*k*k)); ``energy`` / ``vbmf`` take the larger
    of the two channel-mode estimates."""

    kind = "cp"
    n_iter: int = 100

    def validate(self) -> None:
        super().validate()
        check_range("cp.n_iter", self.n_iter, 1, 100_000)


def apply_cp(model: nn.Module, config: CPConfig, *, select: Select | None = None, data: Any = None,
             **kwargs: Any) -> nn.Module:
    def cost(conv: nn.Conv2d, s: tuple[int], q: float) -> tuple[float, float]:
        return cp_macs(conv, s[0], q), float(conv.weight[0].numel() * conv.out_channels)

    return replace_convs(model, config, select, data, "cp", cp_rank, lambda conv, s: factorize_cp(conv, s[0], config.n_iter), cost)


register(CPConfig, apply_cp)
