"""Quantization: FP16/BF16 casting, INT8 dynamic / static PTQ, weight-only INT8 / INT4, observers
and primitives. Quantized modules hold integer tensors and run PyTorch's integer kernels."""

from torchshrink.quant.cast import CastConfig, CastWrapper
from torchshrink.quant.dynamic import Int8DynamicConfig
from torchshrink.quant.modules import (
    DequantizeActivation,
    Int8Conv2d,
    Int8DynamicLinear,
    Int8Linear,
    QuantizeActivation,
    QuantizedAdd,
    WeightOnlyLinear,
)
from torchshrink.quant.qat import QATConfig
from torchshrink.quant.static import Int8StaticConfig
from torchshrink.quant.weight_only import WeightOnlyConfig

__all__ = [
    "CastConfig", "CastWrapper", "DequantizeActivation", "Int8Conv2d", "Int8DynamicConfig", "Int8DynamicLinear",
    "Int8Linear", "Int8StaticConfig", "QATConfig", "QuantizeActivation", "QuantizedAdd", "WeightOnlyConfig", "WeightOnlyLinear",
]
