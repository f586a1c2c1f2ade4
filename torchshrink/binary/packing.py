"""Bit packing for binary (1 bit per weight) and ternary (2 bits per weight) tensors.

Layout (what goes on disk): the tensor is flattened in C order and packed into a flat ``uint8``
tensor, little bit order inside each byte.

- binary: bit ``i % 8`` of byte ``i // 8`` is 1 for +1 and 0 for -1; 8 weights per byte.
- ternary: the 2-bit code of element ``i`` sits at bits ``2 * (i % 4)`` of byte ``i // 4``:
  ``0`` for 0, ``1`` for +1, ``2`` for -1 (``3`` never occurs); 4 weights per byte.

A size that is not a multiple of 8 (or 4) is padded with zero bits; unpacking takes the element
count and drops them, so odd sizes round-trip exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from torchshrink.core.errors import DataError
from torchshrink.export.formats import Format, register_format


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if len(shape) else 1


def _describe_bad(t: torch.Tensor, allowed: torch.Tensor) -> str:
    flat = t.detach().reshape(-1)
    bad = flat[~torch.isin(flat, allowed)]
    shown = ", ".join(f"{float(v):g}" for v in bad[:3].tolist())
    return f"{bad.numel()} of {flat.numel()} entries are not allowed (e.g. {shown})"


def is_binary(t: torch.Tensor) -> bool:
    """True when every entry is exactly -1 or +1."""
    return bool(((t == 1) | (t == -1)).all())


def is_ternary(t: torch.Tensor) -> bool:
    """True when every entry is exactly -1, 0 or +1."""
    return bool(((t == 1) | (t == -1) | (t == 0)).all())


def packed_binary_bytes(numel: int) -> int:
    return (numel + 7) // 8


def packed_ternary_bytes(numel: int) -> int:
    return (numel + 3) // 4


def pack_binary(t: torch.Tensor) -> torch.Tensor:
    """Pack a tensor of +-1 into a flat uint8 tensor (8 per byte). Raises DataError otherwise."""
    t = t.detach().cpu()
    if t.numel() and not is_binary(t):
        raise DataError(
            f"pack_binary needs a tensor of only -1 and +1; {_describe_bad(t, torch.tensor([-1.0, 1.0], dtype=t.dtype))}. "
            "Apply torchshrink.binary.ste.sign() first"
        )
    bits = (t.reshape(-1) > 0).numpy().astype(np.uint8)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def unpack_binary(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_binary`: a tensor of ``shape`` holding -1 / +1."""
    n = _numel(shape)
    if packed.dtype != torch.uint8 or packed.numel() != packed_binary_bytes(n):
        raise DataError(
            f"packed binary data of {packed.numel()} {packed.dtype} values cannot hold shape {tuple(shape)}; "
            f"expected {packed_binary_bytes(n)} uint8 bytes"
        )
    bits = (packed.reshape(-1, 1) >> _BIT_SHIFTS.to(packed.device)) & 1  # torch ops: traceable, any device
    return (bits.reshape(-1)[:n].to(dtype) * 2 - 1).reshape(tuple(shape))


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack a tensor of -1 / 0 / +1 into a flat uint8 tensor (4 per byte). Raises DataError otherwise."""
    t = t.detach().cpu()
    if t.numel() and not is_ternary(t):
        raise DataError(
            f"pack_ternary needs a tensor of only -1, 0 and +1; "
            f"{_describe_bad(t, torch.tensor([-1.0, 0.0, 1.0], dtype=t.dtype))}"
        )
    flat = t.reshape(-1)
    codes = torch.zeros(flat.numel(), dtype=torch.uint8)
    codes[flat > 0] = 1
    codes[flat < 0] = 2
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, torch.zeros(pad, dtype=torch.uint8)])
    c = codes.reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).contiguous()


_TERNARY_LUT = torch.tensor([0.0, 1.0, -1.0, float("nan")])


def unpack_ternary_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 2-bit codes (uint8 in {0, 1, 2}) of the first ``numel`` packed elements."""
    if packed.dtype != torch.uint8 or packed.numel() != packed_ternary_bytes(numel):
        raise DataError(
            f"packed ternary data of {packed.numel()} {packed.dtype} values cannot hold {numel} elements; "
            f"expected {packed_ternary_bytes(numel)} uint8 bytes"
        )
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    codes = ((packed.reshape(-1, 1) >> shifts) & 3).reshape(-1)[:numel]
    if type(codes) is torch.Tensor and bool((codes == 3).any()):  # checked in eager use (not while tracing)
        raise DataError("packed ternary data holds the invalid code 3; the file is corrupt")
    return codes


def unpack_ternary(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: a tensor of ``shape`` holding -1 / 0 / +1."""
    codes = unpack_ternary_codes(packed, _numel(shape))
    return _TERNARY_LUT.to(dtype)[codes.long()].reshape(tuple(shape))


# --------------------------------------------------------------------------- file format

BITS_FORMAT = "packed-bits"


def _bits_encode(t: torch.Tensor) -> dict[str, torch.Tensor] | None:
    return {"bits": t.reshape(-1).contiguous()} if t.dtype == torch.uint8 else None


def _bits_decode(parts: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    return parts["bits"].reshape(meta["shape"])


# Packed 1- / 2-bit weights are stored as they are, inside the compact container (one LZMA stream
# for manifest + tensors, export/container.py): for a small binarized model the safetensors header
# and the JSON manifest would otherwise cost as much as the bits themselves.
# (Without a container-aware export, the bits are written to safetensors unchanged.)
_IN_CONTAINER = {"container": True} if "container" in Format.__dataclass_fields__ else {}
register_format(Format(BITS_FORMAT, _bits_encode, _bits_decode, auto=False, **_IN_CONTAINER))
