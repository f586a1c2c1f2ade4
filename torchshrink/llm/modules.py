"""``PackedLinear``: a language-model Linear stored as its quantized codes (two per byte up to 4 bits,
one byte at 8), an fp16 scale and a uint8 zero point per (output row, group), and its float bias. The
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


@register_module
class PackedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group: int = 64,
                 sym: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group, self.sym = in_features, out_features, bits, group, sym
        g = group or in_features
        cols = in_features // 2 if bits <= 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, in_features // g, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(out_features, in_features // g, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, lin: nn.Linear, q: Quantized) -> PackedLinear:
        g = q.grid
        if g.bits <= 4 and lin.in_features % 2:
            raise ValueError(f"{lin.in_features} input features: sub-byte codes pack two per byte (even width needed)")
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, g.bits, g.group, g.sym)
        codes = q.codes.to(torch.int16)
        m.qweight.copy_(pack_int4(codes - 8) if g.bits <= 4 else codes.to(torch.uint8))
        m.scale.copy_(q.scale.half())
        m.zero.copy_(q.zero.to(torch.uint8))
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        return m

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "group": self.group, "sym": self.sym}

    def codes(self) -> torch.Tensor:
        if self.bits <= 4:
            return unpack_int4(self.qweight).to(torch.int16) + 8
        return self.qweight.to(torch.int16)

    def quantized(self) -> Quantized:
        return Quantized(self.codes().to(torch.uint8), self.scale.float(), self.zero.float(),
                         Grid(self.bits, self.group, self.sym))

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def logical_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)
