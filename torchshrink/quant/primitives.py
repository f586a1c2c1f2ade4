"""Linear quantization primitives (pure functions): q = clamp(round(x / s) + z, qmin, qmax).

- asymmetric: s = (max - min) / (2^b - 1), z = qmin - round(min / s) (the range always holds 0,
  so z lies in [qmin, qmax] and zero is exact);
- symmetric: s = max|x| / qmax with the restricted range [-qmax, qmax] (z = 0 for signed types,
  the mid code for unsigned ones).

Granularity: per tensor, per channel (``axis``) or per group of ``group_size`` consecutive values
along the last dimension. Inside the calibrated range |dequantize(quantize(x)) - x| <= s / 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from torchshrink.core.errors import ConfigError

Granularity = Literal["tensor", "channel", "group"]
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
_EPS = 1e-12


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits!r} is not supported; allowed: {', '.join(map(str, SUPPORTED_BITS))}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams_from_minmax(
    min_val: torch.Tensor, max_val: torch.Tensor, *, bits: int = 8, signed: bool = True, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int64) for ranges ``[min_val, max_val]`` (any shape)."""
    qmin, qmax = qrange(bits, signed)
    lo = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    if symmetric:
        half = (qmax - qmin) // 2  # 127 for int8 / uint8: restricted, symmetric range
        scale = torch.maximum(-lo, hi) / half
        scale = torch.clamp(scale, min=_EPS)
        zp_val = 0 if signed else (qmin + qmax + 1) // 2
        zp = torch.full_like(scale, zp_val, dtype=torch.int64)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=_EPS)
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
    return scale, zp


def _reduce_dims(x: torch.Tensor, axis: int) -> list[int]:
    axis = axis % x.dim()
    return [d for d in range(x.dim()) if d != axis]


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``x`` as [..., n_groups, group_size] along its last dimension."""
    if x.shape[-1] % group_size:
        raise ConfigError(
            f"group_size={group_size} does not divide the last dimension {x.shape[-1]} of a tensor of shape "
            f"{tuple(x.shape)}; pick a divisor (e.g. 32, 64, 128) or per-channel quantization"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def minmax(x: torch.Tensor, granularity: Granularity = "tensor", *, axis: int = 0,
           group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` at the given granularity (shapes broadcast against ``x``, or its group view)."""
    x = x.detach().float()
    if granularity == "tensor":
        return x.min(), x.max()
    if granularity == "channel":
        dims = _reduce_dims(x, axis)
        return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    if granularity == "group":
        g = group_view(x, group_size)
        return g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    raise ConfigError(f"granularity={granularity!r}; allowed: 'tensor', 'channel', 'group'")


def compute_qparams(x: torch.Tensor, *, bits: int = 8, signed: bool = True, symmetric: bool = True,
                    granularity: Granularity = "tensor", axis: int = 0,
                    group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = minmax(x, granularity, axis=axis, group_size=group_size)
    return qparams_from_minmax(lo, hi, bits=bits, signed=signed, symmetric=symmetric)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, bits: int = 8,
             signed: bool = True) -> torch.Tensor:
    """Integer codes (int8 for signed, uint8 for unsigned 8-bit, int16 never needed)."""
    qmin, qmax = qrange(bits, signed)
    q = torch.clamp(torch.round(x.float() / scale) + zero_point, qmin, qmax)
    return q.to(torch.int8 if signed else torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q.to(torch.float32) - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, bits: int = 8,
                  signed: bool = True) -> torch.Tensor:
    """quantize -> dequantize in float, with a straight-through gradient for ``x``."""
    qmin, qmax = qrange(bits, signed)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    dq = (q - zero_point) * scale
    return x + (dq - x).detach()


def quantize_weight(w: torch.Tensor, *, bits: int = 8, granularity: Granularity = "channel",
                    group_size: int = 128, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed codes of a weight [out, ...] plus scale and zero point.

    Per-channel: scale/zp have shape [out]; per-group: [out, in // group_size]; per-tensor: [].
    Codes keep the weight's shape.
    """
    w = w.detach().float()
    if granularity == "group":
        w2 = w.reshape(w.shape[0], -1)
        g = group_view(w2, group_size)
        lo, hi = minmax(w2, "group", group_size=group_size)
        s, z = qparams_from_minmax(lo, hi, bits=bits, signed=True, symmetric=symmetric)
        q = quantize(g, s, z, bits=bits).reshape(w.shape)
        return q, s.squeeze(-1), z.squeeze(-1)
    s, z = compute_qparams(w, bits=bits, symmetric=symmetric, granularity=granularity, axis=0)
    q = quantize(w, s, z, bits=bits)
    if granularity == "channel":
        return q, s.reshape(-1), z.reshape(-1)
    return q, s, z


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      group_size: int | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_weight` (``group_size`` given for per-group scales)."""
    if group_size:
        g = group_view(q.reshape(q.shape[0], -1), group_size)
        return dequantize(g, scale.unsqueeze(-1), zero_point.unsqueeze(-1)).reshape(q.shape)
    if scale.dim() == 0:
        return dequantize(q, scale, zero_point)
    shape = (-1,) + (1,) * (q.dim() - 1)
    return dequantize(q, scale.reshape(shape), zero_point.reshape(shape))


@contextlib.contextmanager
def engine(name: str) -> Iterator[None]:
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old
