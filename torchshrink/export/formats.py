"""Tensor storage formats for the saved file. A format turns one tensor into a few smaller
tensors (and back, exactly). Techniques register their own (``register_format``); a tensor is
written in the smallest format that applies to it, so file size follows the compression."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Encoded = dict[str, torch.Tensor]
# An encoder may return None: "this tensor cannot be stored exactly in my format" (the tensor is
# then written in the best automatic format instead).
Encoder = Callable[[torch.Tensor], Encoded | None]


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    encode: Encoder
    decode: Callable[[Encoded, dict[str, Any]], torch.Tensor]
    # Picked automatically when it is smaller than the dense tensor (else only on request).
    auto: bool = True
    # Its parts are left raw for an entropy coder: a model with such a tensor is saved in the
    # compact container (one LZMA stream for the whole payload, see export/io.py).
    container: bool = False


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    if name not in _FORMATS:
        raise KeyError(f"unknown tensor format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def nbytes(parts: Encoded) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def nonzero_bits(t: torch.Tensor) -> torch.Tensor:
    """Boolean mask of entries whose bit pattern is not all zero (keeps -0.0 exact)."""
    if t.dtype.is_floating_point:
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.contiguous().view(int_dtype) != 0
    return t != 0


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor with 8 entries per byte (little bit order)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8), bitorder="little"))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def _bitmask_encode(t: torch.Tensor) -> Encoded:
    mask = nonzero_bits(t)
    return {"mask": pack_bits(mask), "values": t.reshape(-1)[mask.reshape(-1)].contiguous()}


def _bitmask_decode(parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    shape = meta["shape"]
    n = int(np.prod(shape)) if shape else 1
    mask = unpack_bits(parts["mask"], n)
    out = torch.zeros(n, dtype=parts["values"].dtype)
    out[mask] = parts["values"]
    return out.reshape(shape)


register_format(Format("bitmask", _bitmask_encode, _bitmask_decode))


def _half_exact_encode(t: torch.Tensor) -> Encoded | None:
    """float32 values that float16 represents exactly (e.g. rounded on purpose) in half the bytes."""
    if t.dtype != torch.float32:
        return None
    h = t.half()
    if not torch.equal(h.float(), t):  # also false for NaN: kept as it is
        return None
    return {"values": h}


def _half_exact_decode(parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    return parts["values"].float().reshape(meta["shape"])


register_format(Format("half-exact", _half_exact_encode, _half_exact_decode, auto=False))


def encode_tensor(t: torch.Tensor, preferred: str | None = None) -> tuple[str, Encoded]:
    """Return (format name, parts). ``dense`` means the tensor is stored as it is."""
    t = t.detach().cpu()
    dense_bytes = t.numel() * t.element_size()
    if preferred and preferred != "dense":
        forced = get_format(preferred).encode(t)
        if forced is not None:
            return preferred, forced
    best: tuple[str, Encoded] = ("dense", {"": t.contiguous()})
    best_bytes = dense_bytes
    if t.numel() >= 64 and not t.dtype.is_complex:
        for fmt in _FORMATS.values():
            if not fmt.auto:
                continue
            parts = fmt.encode(t)
            if parts is not None and nbytes(parts) < best_bytes * 0.98:
                best, best_bytes = (fmt.name, parts), nbytes(parts)
    return best


def decode_tensor(fmt: str, parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    if fmt == "dense":
        return parts[""]
    return get_format(fmt).decode(parts, meta)
