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


def known_format(name: str) -> bool:
    """Whether ``name`` is ``dense`` or a registered format (the technique packages register theirs when
    ``torchshrink`` is imported, which importing any of its modules does first)."""
    return name == "dense" or name in _FORMATS


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


def inflate(blob: bytes, exact: int) -> bytes:
    """zlib-decode ``blob`` to exactly ``exact`` bytes: more (a bomb), fewer, an unfinished stream or
    trailing data raise ValueError, and never more than ``exact + 1`` bytes are produced."""
    import zlib

    d = zlib.decompressobj()
    out = d.decompress(blob, exact + 1)
    if len(out) > exact or d.unconsumed_tail:
        raise ValueError(f"the stream decodes to more than the {exact:,} bytes declared")
    if not d.eof or d.unused_data:
        raise ValueError("the stream is truncated or followed by trailing data")
    if len(out) != exact:
        raise ValueError(f"the stream decodes to {len(out):,} bytes, {exact:,} declared")
    return out


def _bitmask_encode(t: torch.Tensor) -> Encoded:
    mask = nonzero_bits(t)
    return {"mask": pack_bits(mask), "values": t.reshape(-1)[mask.reshape(-1)].contiguous()}


def numel_of(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """A packed bitmask of exactly ``n`` entries; a packed buffer of another size is refused."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"a mask of {n:,} entries takes {(n + 7) // 8:,} bytes, the file holds {packed.numel():,}")
    return unpack_bits(packed, n)


def _bitmask_decode(parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    shape = meta["shape"]
    n = numel_of(shape)
    mask = unpack_mask(parts["mask"], n)
    if int(mask.sum()) != parts["values"].numel():
        raise ValueError(f"the mask marks {int(mask.sum()):,} nonzeros, the file holds {parts['values'].numel():,} values")
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
    if parts["values"].numel() != numel_of(meta["shape"]):
        raise ValueError("the stored values do not match the declared shape")
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
            if parts is not None and nbytes(parts) < best_bytes * 0.98 and loadable(dense_bytes, nbytes(parts)):
                best, best_bytes = (fmt.name, parts), nbytes(parts)
    return best


def loadable(declared: int, stored: int) -> bool:
    """Whether ``decode_tensor`` accepts this expansion: the saver never writes what the loader refuses
    (an all-zero head, like torchvision ViT's, compresses past the bomb limit)."""
    return declared <= max(1 << 20, MAX_EXPANSION * stored)


# A format may decode to at most this many bytes per stored byte (sparse and entropy-coded
# formats expand; nothing legitimate expands this much), or 1 MiB.
MAX_EXPANSION = 4096


def decode_tensor(fmt: str, parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    """Decode one saved tensor. ``meta`` (format, shape, dtype) was validated by the manifest schema;
    the declared size is checked against the stored bytes before anything is allocated, and the
    decoded tensor must have exactly the declared shape and dtype."""
    from torchshrink.core.errors import ModelLoadError
    from torchshrink.export.schema import DTYPES

    shape, dtype = list(meta["shape"]), DTYPES[meta["dtype"]]
    stored = nbytes(parts)
    declared = numel_of(shape) * torch.empty((), dtype=dtype).element_size()
    if fmt == "dense":
        out = parts.get("")
        if out is None:
            raise ModelLoadError("the weights file lacks the tensor")
    elif not loadable(declared, stored):
        raise ModelLoadError(f"declares {declared:,} bytes ({meta['shape']}) from {stored:,} stored bytes; refused")
    else:
        try:
            out = get_format(fmt).decode(parts, meta)
        except KeyError as e:
            raise ModelLoadError(f"{fmt} data lacks part {e}") from None
        except (ValueError, RuntimeError, IndexError, TypeError, OverflowError, MemoryError) as e:
            raise ModelLoadError(f"{fmt} data is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
        except Exception as e:  # zlib.error, lzma.LZMAError, DataError from technique decoders
            raise ModelLoadError(f"{fmt} data is corrupt ({type(e).__name__}: {str(e)[:160]})") from None
    if list(out.shape) != shape or out.dtype != dtype:
        raise ModelLoadError(f"decodes to {tuple(out.shape)} {out.dtype}, the manifest declares {tuple(shape)} {dtype}")
    return out
