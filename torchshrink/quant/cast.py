"""FP16 / BF16 casting: the simplest compression. Selected layers keep their weights in the
half-precision dtype (half the bytes on disk and in memory) and run in it; inputs are cast on the
way in and outputs cast back, so the rest of the model is unaffected."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core.config import Config, register
from torchshrink.core.select import Select, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.export.modules import register_module

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@register_module
class CastWrapper(nn.Module):
    """Runs ``inner`` in ``dtype``; casts floating inputs in and outputs back to the caller's dtype."""

    def __init__(self, inner: nn.Module | None = None, dtype: str = "bfloat16", inner_type: str = "", inner_init: dict | None = None) -> None:
        super().__init__()
        if inner is None:  # rebuilding from a manifest
            from torchshrink.export.modules import build_module

            inner = build_module(inner_type, inner_init or {})
        self.dtype_name = dtype
        self.inner = inner.to(_DTYPES[dtype])

    def init_args(self) -> dict[str, Any]:
        from torchshrink.export.modules import init_args, type_name

        return {"dtype": self.dtype_name, "inner_type": type_name(self.inner), "inner_init": init_args(self.inner)}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dt = _DTYPES[self.dtype_name]
        out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()  # ids in, floats out (Embedding)
        out = self.inner(x.to(dt) if x.is_floating_point() else x, *args, **kwargs)
        return out.to(out_dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def _castable(m: nn.Module) -> bool:
    from torchshrink.export.modules import init_args

    return init_args(m) is not None and not isinstance(m, nn.Sequential | nn.ModuleList | nn.ModuleDict)


def apply_cast(model: nn.Module, config: CastConfig, *, select: Select | None = None, data: Any = None, **_: Any) -> nn.Module:
    for name, m in select_modules(model, select, ("Linear", "Conv1d", "Conv2d", "Embedding", "LayerNorm"), replaces=True):
        if _castable(m):
            set_module(model, name, CastWrapper(m, config.dtype))
    return model


@dataclasses.dataclass(frozen=True, kw_only=True)
class CastConfig(Config):
    """Cast selected layers (default: Linear, Conv, Embedding, LayerNorm) to float16 or bfloat16."""

    kind = "cast"
    family = "quantize"
    dtype: Literal["float16", "bfloat16"] = "bfloat16"


register(CastConfig, apply_cast)
