"""``bitmask-zlib``: the bitmask format (packed mask + nonzero values), entropy-coded losslessly.

The packed mask of a 90%-sparse tensor is mostly zero bytes, and the nonzero values of a trained
layer share a few exponents; zlib on the mask and on the byte-shuffled values (all first bytes, then
all second bytes, ...) removes that redundancy and decodes bit for bit. Only tensors with at least
half zeros are entropy-coded; for denser ones the parts are the plain bitmask layout, never smaller
than ``bitmask`` itself, so the exporter keeps choosing ``bitmask`` or ``dense`` there.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from torchshrink.export.formats import (
    Encoded,
    Format,
    inflate,
    nonzero_bits,
    numel_of,
    pack_bits,
    register_format,
    unpack_mask,
)

LEVEL = 9


def _z(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(zlib.compress(data, LEVEL), dtype=np.uint8).copy())


def encode(t: torch.Tensor) -> Encoded:
    mask = nonzero_bits(t).reshape(-1)
    values = t.reshape(-1)[mask].contiguous()
    packed = pack_bits(mask)
    if not t.dtype.is_floating_point or float(mask.float().mean()) > 0.5:
        return {"z": torch.zeros(1, dtype=torch.uint8), "mask": packed, "values": values}
    size = values.element_size()
    shuffled = values.view(torch.uint8).reshape(-1, size).t().contiguous()
    return {"z": torch.ones(1, dtype=torch.uint8), "mask": _z(packed.numpy().tobytes()),
            "values": _z(shuffled.numpy().tobytes())}


def decode(parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    shape = meta["shape"]
    n = numel_of(shape)
    if int(parts["z"][0]) == 0:
        mask, values = unpack_mask(parts["mask"], n), parts["values"]
    else:
        dtype = getattr(torch, meta["dtype"])
        size = torch.empty(0, dtype=dtype).element_size()
        packed = inflate(parts["mask"].numpy().tobytes(), (n + 7) // 8)
        mask = unpack_mask(torch.from_numpy(np.frombuffer(packed, dtype=np.uint8).copy()), n)
        nnz = int(mask.sum())
        raw = torch.from_numpy(np.frombuffer(inflate(parts["values"].numpy().tobytes(), nnz * size), dtype=np.uint8).copy())
        if raw.numel() == 0:  # an all-zero tensor has no values to un-shuffle
            values = torch.empty(0, dtype=dtype)
        else:
            values = raw.reshape(size, -1).t().contiguous().view(dtype).reshape(-1)
    if values.numel() != int(mask.sum()):
        raise ValueError(f"the mask marks {int(mask.sum()):,} nonzeros, the file holds {values.numel():,} values")
    out = torch.zeros(n, dtype=values.dtype)
    out[mask] = values
    return out.reshape(shape)


register_format(Format("bitmask-zlib", encode, decode))
