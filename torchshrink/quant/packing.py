"""Sub-byte packing: two 4-bit codes per byte (low nibble first), exact round trip."""

from __future__ import annotations

import torch

from torchshrink.core.errors import ConfigError


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes in [-8, 7] (any integer dtype, even element count along the last dim)
    -> uint8 tensor whose last dimension is halved."""
    if q.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ConfigError(f"int4 codes must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> int8 codes [..., 2n] in [-8, 7]."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    out = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(out > 7, out - 16, out)
