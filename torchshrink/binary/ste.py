"""Binary and ternary quantizers with straight-through gradient estimators.

Sources (ideas only):
- sign with clipped identity ("STE", hardtanh gradient): Courbariaux et al., BinaryConnect (2015)
  and Hubara et al., Binarized Neural Networks (2016).
- ApproxSign: Liu et al., Bi-Real Net (2018): the gradient of a piecewise quadratic, 2 - 2|x|.
- magnitude-aware sign: Bi-Real Net: ``mean|W| * sign(W)`` with the gradient flowing through the
  mean as well as through the sign.
- TWN ternary: Li & Liu, Ternary Weight Networks (2016): threshold 0.7 * mean|W|, scale the mean
  of the surviving magnitudes.
- TTQ: Zhu et al., Trained Ternary Quantization (2017): threshold t * max|W|, learned positive and
  negative scales.

Convention everywhere (training layers, packing, kernels): ``sign(0) = +1``.
"""

from __future__ import annotations

from typing import Any

import torch


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0``, -1 elsewhere (no gradient)."""
    return torch.where(x >= 0, torch.ones((), dtype=x.dtype), -torch.ones((), dtype=x.dtype))


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.clamp(2 - 2 * x.abs(), min=0)


def sign_ste(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """sign(x) forward; identity gradient where ``|x| <= clip``, zero outside."""
    return _SignSTE.apply(x, clip)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward; gradient ``max(0, 2 - 2|x|)`` (Bi-Real Net's ApproxSign)."""
    return _ApproxSign.apply(x)


def channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """mean |W| over every dim but the first, shaped to broadcast against ``w``."""
    return w.abs().reshape(w.shape[0], -1).mean(1).reshape(-1, *([1] * (w.dim() - 1)))


def magnitude_aware_sign(w: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """``mean|W| * sign(W)`` per output channel; the gradient flows through both factors."""
    return channel_mean_abs(w) * sign_ste(w, clip)


def binary_estimator(name: str, x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    if name == "ste":
        return sign_ste(x, clip)
    if name == "approx_sign":
        return approx_sign(x)
    raise ValueError(f"unknown sign estimator {name!r}; allowed: 'ste', 'approx_sign'")


# --------------------------------------------------------------------------- ternary


def twn_threshold(w: torch.Tensor, factor: float = 0.7, per_channel: bool = False) -> torch.Tensor:
    """TWN's threshold ``factor * mean|W|`` (per layer, or per output channel)."""
    return factor * (channel_mean_abs(w) if per_channel else w.abs().mean())


def twn_codes_and_scale(
    w: torch.Tensor, factor: float = 0.7, per_channel: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes in {-1, 0, 1} and the scale (mean of |W| above the threshold)."""
    w = w.detach()
    delta = twn_threshold(w, factor, per_channel)
    mask = (w.abs() > delta).to(w.dtype)
    codes = sign(w) * mask
    mag = w.abs() * mask
    if per_channel:
        num = mag.reshape(w.shape[0], -1).sum(1)
        den = mask.reshape(w.shape[0], -1).sum(1).clamp(min=1)
        scale = (num / den).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        scale = mag.sum() / mask.sum().clamp(min=1)
    return codes, scale


def twn_ste(w: torch.Tensor, factor: float = 0.7, per_channel: bool = False) -> torch.Tensor:
    """TWN quantized weight ``alpha * codes``; the gradient passes straight to the latent ``w``."""
    codes, scale = twn_codes_and_scale(w, factor, per_channel)
    q = codes * scale
    return w + (q - w).detach()


def ttq_codes(w: torch.Tensor, t: float = 0.05) -> torch.Tensor:
    """TTQ's ternary codes with threshold ``t * max|W|``."""
    w = w.detach()
    delta = t * w.abs().max()
    return sign(w) * (w.abs() > delta).to(w.dtype)


class _TTQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, t: float) -> torch.Tensor:
        codes = ttq_codes(w, t)
        pos, neg = (codes > 0).to(w.dtype), (codes < 0).to(w.dtype)
        ctx.save_for_backward(pos, neg, wp, wn)
        return wp * pos - wn * neg

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        pos, neg, wp, wn = ctx.saved_tensors
        zero = 1 - pos - neg
        g_w = grad * (wp * pos + zero + wn * neg)
        g_wp = (grad * pos).sum().reshape(wp.shape)
        g_wn = -(grad * neg).sum().reshape(wn.shape)
        return g_w, g_wp, g_wn, None


def ttq(w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, t: float = 0.05) -> torch.Tensor:
    """TTQ quantized weight ``Wp`` / 0 / ``-Wn`` with trained scales ``wp``, ``wn`` (positive)."""
    return _TTQ.apply(w, wp, wn, t)


def ttq_init_scales(w: torch.Tensor, t: float = 0.05) -> tuple[float, float]:
    """Initial Wp, Wn: mean magnitude of the positive / negative weights above the threshold."""
    codes = ttq_codes(w, t)
    w = w.detach()
    pos, neg = w[codes > 0], w[codes < 0]
    wp = float(pos.mean()) if pos.numel() else float(w.abs().mean())
    wn = float(-neg.mean()) if neg.numel() else float(w.abs().mean())
    return wp, wn
