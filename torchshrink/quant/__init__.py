"""Quantization: FP16/BF16 casting (more techniques arrive with the quantization issue)."""

from torchshrink.quant.cast import CastConfig, CastWrapper

__all__ = ["CastConfig", "CastWrapper"]
