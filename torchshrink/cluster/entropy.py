"""Entropy coding of integer code tensors in the saved file, the last step of Deep Compression.

Codes go through the standard library's maintained coders (zlib: DEFLATE = LZ77 + Huffman; lzma:
LZMA with range coding); the smaller result per tensor is stored, and decoding is exact."""

from __future__ import annotations

import lzma
import zlib
from typing import Any

import numpy as np
import torch

from torchshrink.export.formats import Encoded, Format, register_format

_CODECS = {0: "zlib", 1: "lzma"}


def _compress(raw: bytes) -> tuple[int, bytes]:
    candidates = [
        (0, zlib.compress(raw, 9)),
        (1, lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])),
    ]
    return min(candidates, key=lambda c: len(c[1]))


def _decompress(codec: int, blob: bytes) -> bytes:
    if codec == 0:
        return zlib.decompress(blob)
    return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])


def encode_codes(t: torch.Tensor) -> Encoded:
    if t.dtype not in (torch.uint8, torch.int16, torch.int32):
        raise TypeError(f"entropy format stores integer codes, got {t.dtype}")
    arr = t.contiguous().numpy()
    codec, blob = _compress(arr.tobytes())
    return {"data": torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone(), "codec": torch.tensor([codec], dtype=torch.uint8)}


def decode_codes(parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    raw = _decompress(int(parts["codec"][0]), parts["data"].numpy().tobytes())
    dtype = {"uint8": np.uint8, "int16": np.int16, "int32": np.int32}[meta["dtype"]]
    return torch.from_numpy(np.frombuffer(raw, dtype=dtype).copy()).reshape(meta["shape"])


ENTROPY = register_format(Format("entropy", encode_codes, decode_codes, auto=False))
