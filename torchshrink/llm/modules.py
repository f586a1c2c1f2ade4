"""``PackedLinear``: a language-model Linear stored as its quantized codes (8 codes in 3 bytes at 3 bits, 4 per
byte at 2 bits, 2 per byte at 4 bits -- and at 2/3 bits where the width is not a multiple of 8 --, one byte
at 8), an fp16 scale and a uint8 zero point per (output row, group), and its float bias. The
forward dequantizes the weight and runs a float GEMM: the model computes exactly what the quantizer
evaluated (its scales are already fp16 values), and ``ts.save`` / ``ts.load`` round-trip it exactly.
Fast integer decode kernels are #22's; this is the storage format (and the source of GGUF export)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.export.modules import register_module
from torchshrink.llm.wquant import Grid, Quantized
from torchshrink.quant.packing import pack_int4, unpack_int4


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per row of codes: ``bits`` per code where the row splits into whole bytes (8 codes per 3 bytes
    at 3 bits), else 4 bits (2 per byte), 1 byte at 8 bits."""
    if bits == 8:
        return in_features
    if bits in (2, 3) and in_features % 8 == 0:
        return in_features * bits // 8
    return in_features // 2


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[rows, n]`` in [0, 2^bits) -> uint8 ``[rows, packed_width(n, bits)]``, little-endian
    bit order within each 8-code (3-bit) or 4-code (2-bit) word."""
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    if packed_width(n, bits) == n // 2:
        return pack_int4(codes.to(torch.int16) - 8)
    per = 8  # codes per word: 8 x 3 bits = 3 bytes, 8 x 2 bits = 2 bytes
    c = codes.to(torch.int32).reshape(rows, n // per, per)
    word = (c << (bits * torch.arange(per, dtype=torch.int32))).sum(-1)
    nbytes = bits * per // 8
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(nbytes)], -1).reshape(rows, -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int16 codes ``[rows, n]``."""
    if bits == 8:
        return packed.to(torch.int16)
    if packed_width(n, bits) == n // 2:
        return unpack_int4(packed).to(torch.int16) + 8
    per, nbytes = 8, bits
    b = packed.to(torch.int32).reshape(packed.shape[0], n // per, nbytes)
    word = (b << (8 * torch.arange(nbytes, dtype=torch.int32))).sum(-1)
    codes = (word[..., None] >> (bits * torch.arange(per, dtype=torch.int32))) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], n).to(torch.int16)


@register_module
class PackedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group: int = 64,
                 sym: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group, self.sym = in_features, out_features, bits, group, sym
        g = group or in_features
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, in_features // g, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(out_features, in_features // g, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, lin: nn.Linear, q: Quantized) -> PackedLinear:
        g = q.grid
        if g.bits <= 4 and lin.in_features % 2:
            raise ValueError(f"{lin.in_features} input features: sub-byte codes pack two per byte (even width needed)")
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, g.bits, g.group, g.sym)
        m.qweight.copy_(pack_codes(q.codes, g.bits))
        m.scale.copy_(q.scale.half())
        m.zero.copy_(q.zero.to(torch.uint8))
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        return m

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "group": self.group, "sym": self.sym}

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def quantized(self) -> Quantized:
        return Quantized(self.codes().to(torch.uint8), self.scale.float(), self.zero.float(),
                         Grid(self.bits, self.group, self.sym))

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def logical_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)
