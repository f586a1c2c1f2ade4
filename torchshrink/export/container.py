"""The compact container: one file for an entropy-coded model (Deep Compression's last step).

A model whose tensors use a format marked ``container=True`` (e.g. the relative-index cluster
codes) is written as ``model.tsz`` instead of ``model.safetensors``, beside a stub
``manifest.json`` that only points at it. For a ~5 KB model the safetensors header and the JSON
manifest would otherwise be half the file.

Layout of ``model.tsz``::

    b"TSZ1" | u32 little-endian: bytes of stream 1 | stream 1 | stream 2

Stream 1 is the manifest (JSON, with ``parts``: [name, dtype, shape] in payload order), stream 2
the tensor bytes concatenated in that order; both are raw LZMA2 streams (the standard library's
lzma). Parts are grouped by their role (all gaps, then all codes, ...), so similar bytes sit
together for the coder. Reading needs no pickle: dtypes come from an allow-list.
"""

from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path
from typing import Any

import torch

from torchshrink.core.errors import ModelLoadError

CONTAINER = "model.tsz"
MAGIC = b"TSZ1"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.float16, torch.bfloat16, torch.float32, torch.float64)}
# literal-context bits per stream: text likes context, the binary payload does not
_TEXT_LC, _DATA_LC = 3, 0
_RAW_FILTER = [{"id": lzma.FILTER_LZMA2}]


def lzma_pack(raw: bytes, lc: int) -> bytes:
    """Raw LZMA2 stream at the strongest preset; ``lc`` literal-context bits (0 suits binary data)."""
    flt = {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": lc, "lp": 0, "pb": 0}
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[flt])


def lzma_unpack(blob: bytes) -> bytes:
    return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=_RAW_FILTER)


def _order(name: str) -> tuple[str, str]:
    key, _, part = name.rpartition("::")
    return (part, key) if key else ("", name)


def write_container(path: Path, flat: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    names = sorted(flat, key=_order)
    parts = []
    chunks = []
    for n in names:
        t = flat[n].detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"the compact container cannot store {t.dtype} tensors ({n}); allowed: {', '.join(_DTYPES)}")
        parts.append([n, dtype, list(t.shape)])
        chunks.append(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    head = lzma_pack(json.dumps({**manifest, "parts": parts}, separators=(",", ":"), default=str).encode(), _TEXT_LC)
    body = lzma_pack(b"".join(chunks), _DATA_LC)
    path.write_bytes(MAGIC + struct.pack("<I", len(head)) + head + body)


def read_container(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (full manifest, flat tensors) of a ``model.tsz``."""
    if not path.is_file():
        raise ModelLoadError(f"container file {path} is missing")
    data = path.read_bytes()
    if data[:4] != MAGIC or len(data) < 8:
        raise ModelLoadError(f"{path} is not a torchshrink container (bad magic)")
    (n_head,) = struct.unpack("<I", data[4:8])
    try:
        manifest = json.loads(lzma_unpack(data[8:8 + n_head]))
        body = lzma_unpack(data[8 + n_head:])
    except (lzma.LZMAError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    flat: dict[str, torch.Tensor] = {}
    offset = 0
    for name, dtype, shape in manifest.pop("parts", []):
        if dtype not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
        dt = _DTYPES[dtype]
        count = 1
        for s in shape:
            count *= int(s)
        size = count * torch.empty((), dtype=dt).element_size()
        if offset + size > len(body):
            raise ModelLoadError(f"{path} is truncated: tensor {name!r} runs past the end of the data")
        raw = bytearray(body[offset:offset + size])
        flat[name] = torch.frombuffer(raw, dtype=dt).reshape(shape) if size else torch.empty(shape, dtype=dt)
        offset += size
    return manifest, flat
