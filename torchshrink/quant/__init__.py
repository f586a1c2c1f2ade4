"""Quantization: FP16/BF16 casting, INT8 dynamic / static PTQ, weight-only INT8 / INT4, QAT, k-means
weight sharing with entropy-coded codes (Deep Compression's steps 2-3), observers and primitives.
Quantized modules hold integer tensors and run PyTorch's integer kernels (or ours, kernels.py)."""

from torchshrink.quant.cast import CastConfig, CastWrapper
from torchshrink.quant.dynamic import Int8DynamicConfig
from torchshrink.quant.entropy import ENTROPY
from torchshrink.quant.kmeans import ClusteredLayer, KMeansConfig, kmeans_1d
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
    "ENTROPY", "CastConfig", "CastWrapper", "ClusteredLayer", "DequantizeActivation", "KMeansConfig", "kmeans_1d", "Int8Conv2d", "Int8DynamicConfig", "Int8DynamicLinear",
    "Int8Linear", "Int8StaticConfig", "QATConfig", "QuantizeActivation", "QuantizedAdd", "WeightOnlyConfig", "WeightOnlyLinear",
]
