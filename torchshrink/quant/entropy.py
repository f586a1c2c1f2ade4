"""Entropy coding of integer code tensors in the saved file, the last step of Deep Compression.

Two storage formats for cluster codes:

- ``relidx`` (written now): the paper's relative-index coding (Han et al. 2016, section 3). The
  positions of nonzero codes become gaps (u8; a gap over 255 inserts padding entries of code 0, the
  paper's 'filler zero'), stored beside the nonzero codes, in row- or column-major
  order, whichever the entropy coder shrinks more. The format leaves its streams raw: it marks the
  model as entropy-coded, so ``torchshrink.save`` writes the compact container, which LZMA-codes
  the whole payload (all gaps, then all codes, then everything else) in one stream.
- ``entropy`` (files written before ``relidx``; still read): the dense code tensor, zlib or lzma
  compressed per tensor.

Coders are the standard library's (zlib: DEFLATE = LZ77 + Huffman; lzma: LZMA range coding).
Decoding is exact.
"""

from __future__ import annotations

import lzma
import zlib
from typing import Any

import numpy as np
import torch

from torchshrink.export.container import lzma_pack, lzma_unpack
from torchshrink.export.formats import Encoded, Format, inflate, numel_of, register_format

_CODECS = {0: "zlib", 1: "lzma"}
_DTYPES = {"uint8": np.uint8, "int16": np.int16, "int32": np.int32}
_MAX_GAP = 255


def _compress(raw: bytes) -> tuple[int, bytes]:
    candidates = [
        (0, zlib.compress(raw, 9)),
        (1, lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])),
    ]
    return min(candidates, key=lambda c: len(c[1]))


def _decompress(codec: int, blob: bytes, exact: int) -> bytes:
    if codec == 0:
        return inflate(blob, exact)
    if codec == 1:
        return lzma_unpack(blob, exact=exact)
    raise ValueError(f"unknown codec {codec}; allowed: {_CODECS}")


def _code_dtype(name: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"code dtype {name!r}; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _check_codes(t: torch.Tensor) -> None:
    if t.dtype not in (torch.uint8, torch.int16, torch.int32):
        raise TypeError(f"entropy formats store integer codes (uint8, int16, int32), got {t.dtype}")


def encode_codes(t: torch.Tensor) -> Encoded:
    _check_codes(t)
    codec, blob = _compress(t.contiguous().numpy().tobytes())
    return {"data": torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone(), "codec": torch.tensor([codec], dtype=torch.uint8)}


def decode_codes(parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    dtype = _code_dtype(meta["dtype"])
    n = numel_of(meta["shape"])
    raw = _decompress(int(parts["codec"][0]), parts["data"].numpy().tobytes(), n * np.dtype(dtype).itemsize)
    return torch.from_numpy(np.frombuffer(raw, dtype=dtype).copy()).reshape(meta["shape"])


def relative_index(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nonzero entries of ``flat`` as (gaps u8, values): gap = zeros skipped before the entry.
    A gap of 256 or more is split by padding entries (gap 255, value 0), each covering 256 slots."""
    pos = np.flatnonzero(flat)
    gaps = np.diff(pos, prepend=-1) - 1
    pads = gaps // (_MAX_GAP + 1)  # padding entries needed before each real entry
    n = len(pos) + int(pads.sum())
    out_gaps = np.full(n, _MAX_GAP, dtype=np.uint8)
    out_vals = np.zeros(n, dtype=flat.dtype)
    real = np.arange(len(pos)) + np.cumsum(pads)  # where each real entry lands
    out_gaps[real] = (gaps % (_MAX_GAP + 1)).astype(np.uint8)
    out_vals[real] = flat[pos]
    return out_gaps, out_vals


def from_relative_index(gaps: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
    pos = np.cumsum(gaps.astype(np.int64) + 1) - 1
    out = np.zeros(n, dtype=vals.dtype)
    if len(pos) and pos[-1] >= n:
        raise ValueError(f"relative-index stream points past the tensor end ({pos[-1]} >= {n})")
    out[pos] = vals  # padding entries write a 0, which is what is there
    return out


def _as_matrix(t: torch.Tensor) -> np.ndarray:
    arr = t.contiguous().numpy()
    return arr.reshape(arr.shape[0], -1) if arr.ndim >= 2 else arr.reshape(1, -1)


def encode_relidx(t: torch.Tensor) -> Encoded:
    _check_codes(t)
    mat = _as_matrix(t)
    best: tuple[int, Encoded] | None = None
    for order, m in ((0, mat), (1, mat.T)):
        gaps, vals = relative_index(np.ascontiguousarray(m).reshape(-1))
        size = len(lzma_pack(gaps.tobytes(), lc=0)) + len(lzma_pack(vals.tobytes(), lc=0))
        if best is None or size < best[0]:
            best = (size, {"gaps": torch.from_numpy(gaps), "codes": torch.from_numpy(vals),
                           "order": torch.tensor([order], dtype=torch.uint8)})
    assert best is not None
    return best[1]


def decode_relidx(parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    shape = list(meta["shape"])
    rows = shape[0] if len(shape) >= 2 else 1
    n = numel_of(shape)
    if parts["gaps"].dtype != torch.uint8 or parts["gaps"].shape != parts["codes"].shape or parts["codes"].dim() != 1:
        raise ValueError("relative-index gaps and codes must be two 1-D streams of one length (gaps uint8)")
    if int(parts["order"][0]) not in (0, 1):
        raise ValueError("relative-index order must be 0 (row-major) or 1 (column-major)")
    vals = parts["codes"].numpy().astype(_code_dtype(meta["dtype"]), copy=False)
    flat = from_relative_index(parts["gaps"].numpy(), vals, n)
    if int(parts["order"][0]) == 1:  # stored column-major
        flat = flat.reshape(n // max(rows, 1), rows).T.reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(flat)).reshape(shape)


ENTROPY = register_format(Format("entropy", encode_codes, decode_codes, auto=False))
RELIDX = register_format(Format("relidx", encode_relidx, decode_relidx, auto=False, container=True))
