"""Layer geometry shared by the training layers (``layers.py``) and the packed inference modules
(``modules.py``): constructor arguments, the float op, per-channel broadcasting and XNOR-Net's
activation scale. A class combines one geometry with one behaviour mixin that defines
``_setup(bias=..., **options)`` and ``option_args()``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IntPair = int | tuple[int, int] | list[int]


def float_geometry(m: nn.Linear | nn.Conv2d) -> dict[str, Any]:
    """Constructor geometry of a float Linear / Conv2d (without ``bias``)."""
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features}
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
            "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}


class _Geometry(nn.Module):
    is_conv = False
    weight_shape: tuple[int, ...]
    bias: torch.Tensor | None

    def _setup(self, bias: bool = True, **options: Any) -> None:
        raise NotImplementedError

    def option_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def geometry_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def init_args(self) -> dict[str, Any]:
        return {**self.geometry_args(), "bias": self.bias is not None, **self.option_args()}

    @property
    def channel_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector over this layer's activations."""
        return (-1, 1, 1) if self.is_conv else (-1,)

    def add_bias(self, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.bias if bias is None else bias
        return out if b is None else out + b.to(out.dtype).reshape(self.channel_shape)

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def xnor_beta(self, xs: torch.Tensor) -> torch.Tensor:
        """XNOR-Net's activation scale for the shifted input ``xs``."""
        raise NotImplementedError


class LinearGeometry(_Geometry):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, **options: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self.n_in, self.n_out = in_features, out_features
        self._setup(bias=bias, **options)

    def geometry_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, bias)

    def xnor_beta(self, xs: torch.Tensor) -> torch.Tensor:
        """The mean of ``|x - tau|`` over the input features, ``[..., 1]``."""
        return xs.abs().mean(-1, keepdim=True)


class ConvGeometry(_Geometry):
    is_conv = True

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
        dilation: IntPair = 1, groups: int = 1, bias: bool = True, **options: Any,
    ) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size: tuple[int, int] = tuple(pair(kernel_size))  # type: ignore[assignment]
        self.stride: tuple[int, int] = tuple(pair(stride))  # type: ignore[assignment]
        self.padding: tuple[int, int] = tuple(pair(padding))  # type: ignore[assignment]
        self.dilation: tuple[int, int] = tuple(pair(dilation))  # type: ignore[assignment]
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.n_in, self.n_out = in_channels, out_channels
        self._setup(bias=bias, **options)

    def geometry_args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups}

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def xnor_beta(self, xs: torch.Tensor) -> torch.Tensor:
        """XNOR-Net's K: the channel mean of ``|x - tau|`` averaged over each kernel window, ``[B, 1, Ho, Wo]``."""
        mean_abs = xs.abs().mean(1, keepdim=True)
        kh, kw = self.kernel_size
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=xs.dtype, device=xs.device)
        return F.conv2d(mean_abs, box, None, self.stride, self.padding, self.dilation)
