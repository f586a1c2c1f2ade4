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


def lzma_unpack(blob: bytes, max_bytes: int | None = None, *, exact: int | None = None) -> bytes:
    """Decode a raw LZMA2 stream. The output may not exceed ``max_bytes`` (or must be exactly ``exact``
    bytes), the stream must end, and nothing may follow it: a decompression bomb or trailing data
    raises ``ValueError`` before more than the allowed bytes are produced."""
    limit = exact if exact is not None else max_bytes
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_RAW_FILTER)
    out = d.decompress(blob, max_length=-1 if limit is None else limit + 1)
    if limit is not None and len(out) > limit:
        raise ValueError(f"the stream decodes to more than the {limit:,} bytes declared")
    if not d.eof:
        raise ValueError("the stream is truncated (no end marker)")
    if d.unused_data:
        raise ValueError(f"{len(d.unused_data):,} bytes of trailing data after the stream")
    if exact is not None and len(out) != exact:
        raise ValueError(f"the stream decodes to {len(out):,} bytes, {exact:,} declared")
    return out


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


# The JSON manifest inside a container may not decode to more than this.
MAX_MANIFEST_BYTES = 64 << 20
# Declared tensor bytes may exceed the compressed payload by at most this factor (LZMA2 reaches
# ~7000:1 only on constant data; an entropy-coded model's payload is a few x), or 16 MiB in all.
MAX_EXPANSION = 1024
_SMALL = 16 << 20


def _parts(path: Path, raw: Any) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    from torchshrink.export.schema import check_shape

    if not isinstance(raw, list):
        raise ModelLoadError(f"{path}: the part list must be a list")
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], str)):
            raise ModelLoadError(f"{path}: each part must be [name, dtype, shape]")
        name, dtype, shape = item
        if dtype not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {name[:80]!r} has dtype {dtype[:40]!r}; allowed: {', '.join(_DTYPES)}")
        dt = _DTYPES[dtype]
        shape_t = check_shape(shape, f"{path}: part {name[:80]!r}")
        count = 1
        for s in shape_t:
            count *= s
        out.append((name, dt, shape_t, count * torch.empty((), dtype=dt).element_size()))
    return out


def read_container(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (full manifest, flat tensors) of a ``model.tsz``. Every size is checked against the
    declarations before anything is allocated; decompression is bounded by the declared bytes."""
    if not path.is_file():
        raise ModelLoadError(f"container file {path} is missing")
    data = path.read_bytes()
    if data[:4] != MAGIC or len(data) < 8:
        raise ModelLoadError(f"{path} is not a torchshrink container (bad magic)")
    (n_head,) = struct.unpack("<I", data[4:8])
    if 8 + n_head > len(data):
        raise ModelLoadError(f"{path} is truncated: its manifest stream runs past the end of the file")
    try:
        manifest = json.loads(lzma_unpack(data[8:8 + n_head], MAX_MANIFEST_BYTES))
    except (lzma.LZMAError, EOFError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path} is corrupt: manifest stream: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path} is corrupt: its manifest is not an object")
    parts = _parts(path, manifest.pop("parts", []))
    body_bytes = len(data) - 8 - n_head
    declared = sum(p[3] for p in parts)
    if declared > max(_SMALL, MAX_EXPANSION * body_bytes):
        raise ModelLoadError(f"{path} declares {declared:,} bytes of tensors in {body_bytes:,} compressed bytes; "
                             f"refused (more than {MAX_EXPANSION}x)")
    try:
        body = lzma_unpack(data[8 + n_head:], exact=declared)
    except (lzma.LZMAError, EOFError, ValueError) as e:
        raise ModelLoadError(f"{path} is corrupt: tensor stream: {type(e).__name__}: {str(e)[:200]}") from None
    flat: dict[str, torch.Tensor] = {}
    offset = 0
    for name, dt, shape, size in parts:
        if name in flat:
            raise ModelLoadError(f"{path}: part {name[:80]!r} is declared twice")
        raw = bytearray(body[offset:offset + size])
        flat[name] = torch.frombuffer(raw, dtype=dt).reshape(shape) if size else torch.empty(shape, dtype=dt)
        offset += size
    return manifest, flat
