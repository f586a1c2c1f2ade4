"""Bit-packed inference modules: what a binarized model is saved as and runs with.

- :class:`PackedBinaryLinear` / :class:`PackedBinaryConv2d`: 1 bit per weight (``weight_bits``,
  uint8), float per-channel ``scale`` (bwn / xnor) and ``act_threshold`` (bnn / xnor).
  Fully binary modes (bnn, xnor) run the XNOR-popcount kernel (``kernels.py``); binary-weight
  modes unpack the bits on the fly and call the float op.
- :class:`PackedTernaryLinear` / :class:`PackedTernaryConv2d`: 2 bits per weight (``weight_codes``),
  float ``pos_scale`` / ``neg_scale``; unpacked on the fly.

All are inference modules (no gradients through the packed weight).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.binary import kernels as K
from torchshrink.binary.layers import FULLY_BINARY, SCALED, BinaryConv2d, BinaryLinear, xnor_beta
from torchshrink.binary.packing import (
    pack_binary,
    pack_ternary,
    packed_binary_bytes,
    packed_ternary_bytes,
    unpack_binary,
    unpack_ternary_codes,
)
from torchshrink.export.modules import register_module

BINARY_MODES = ("binaryconnect", "bwn", "bnn", "xnor")
log = logging.getLogger(__name__)


class _PackedBase(nn.Module):
    """Geometry + bias handling shared by the four packed modules."""

    is_conv = False
    weight_shape: tuple[int, ...]
    bias: torch.Tensor | None

    def _init_bias(self, n: int, bias: bool) -> None:
        if bias:
            self.register_buffer("bias", torch.zeros(n))
        else:
            self.bias = None

    def _bias(self, out: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return out
        return out + (self.bias.reshape(1, -1, 1, 1) if self.is_conv else self.bias)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)  # type: ignore[attr-defined]
        return F.linear(x, w)

    def _extra_params(self) -> int:
        return sum(b.numel() for n, b in self.named_buffers() if not n.startswith("weight_"))

    def logical_params(self) -> int:
        return math.prod(self.weight_shape) + self._extra_params()

    def macs(self, args: tuple, output: torch.Tensor) -> int:
        """Multiply-accumulates of the equivalent float layer (for bnn/xnor they are XNOR-popcounts)."""
        per_out = math.prod(self.weight_shape[1:])
        return int(output.numel() * per_out)


class _PackedBinary(_PackedBase):
    mode: str
    backend: str

    def _setup(self, n_out: int, n_in: int, mode: str, bias: bool, backend: str) -> None:
        if mode not in BINARY_MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(BINARY_MODES)}")
        K.check_backend_name(backend)  # availability is checked when the kernel first runs
        self.mode, self.backend = mode, backend
        self.register_buffer("weight_bits", torch.zeros(packed_binary_bytes(math.prod(self.weight_shape)), dtype=torch.uint8))
        if mode in SCALED:
            self.register_buffer("scale", torch.ones(n_out))
        if mode in FULLY_BINARY:
            self.register_buffer("act_threshold", torch.zeros(n_in))
        self._init_bias(n_out, bias)
        self._cache: dict[str, Any] = {}

    def weight_signs(self) -> torch.Tensor:
        """The +-1 weight, unpacked."""
        return unpack_binary(self.weight_bits, self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        w = self.weight_signs()
        if self.mode in SCALED:
            w = w * self.scale.reshape(-1, *([1] * (w.dim() - 1)))
        return w

    def _sync_cache(self) -> None:
        """Drop packed weights and backend choices when the weights changed (e.g. a state load)."""
        key = (self.weight_bits.data_ptr(), self.weight_bits._version)
        if self._cache.get("key") != key:
            self._cache = {"key": key}

    def _run_measured(self, run: Callable[[str], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """Run the XNOR kernel on the backend that measured fastest for this input shape on this
        machine (``backend="auto"``); both backends give the same integers, so the choice is safe."""
        self._sync_cache()
        key = ("backend", shape)
        choice = self._cache.get(key)
        if choice is None:
            resolved = K.resolve_backend(self.backend)
            if self.backend != "auto" or resolved == "numpy":
                choice = resolved
            else:
                times = {}
                for b in ("c", "numpy"):
                    run(b)  # packs the weights for b, and warms up
                    t0 = time.perf_counter()
                    for _ in range(3):
                        run(b)
                    times[b] = time.perf_counter() - t0
                choice = min(times, key=times.__getitem__)
                log.info("binary layer %s, input %s: %s measured fastest (%s)", type(self).__name__, shape, choice,
                         {k: f"{v * 1000 / 3:.3f} ms" for k, v in times.items()})
            self._cache[key] = choice
        return run(choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode not in FULLY_BINARY:
            return self._bias(self._op(x, self.dequantized_weight().to(x.dtype)))
        shape = (-1, 1, 1) if self.is_conv else (-1,)
        xs = x.float() - self.act_threshold.reshape(shape)
        out = self._binary_dot(xs).to(torch.float32)
        if self.mode == "xnor":
            beta = (xnor_beta(xs, self.kernel_size, self.stride, self.padding, self.dilation)  # type: ignore[attr-defined]
                    if self.is_conv else xs.abs().mean(-1, keepdim=True))
            out = out * self.scale.reshape(shape) * beta
        return self._bias(out).to(x.dtype)

    def _binary_dot(self, xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_module
class PackedBinaryLinear(_PackedBinary):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "bwn", backend: str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._setup(out_features, in_features, mode, bias, backend)

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "mode": self.mode, "backend": self.backend}

    def _binary_dot(self, xs: torch.Tensor) -> torch.Tensor:
        def run(b: str) -> torch.Tensor:
            if ("w", b) not in self._cache:
                self._cache[("w", b)] = K.pack_linear_weight(self.weight_signs(), b)
            return K.binary_linear(xs, self._cache[("w", b)], self.in_features, b)

        return self._run_measured(run, tuple(xs.shape))


@register_module
class PackedBinaryConv2d(_PackedBinary):
    is_conv = True

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True,
        mode: str = "bwn", backend: str = "auto",
    ) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._setup(out_channels, in_channels, mode, bias, backend)

    def init_args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "mode": self.mode, "backend": self.backend}

    def _binary_dot(self, xs: torch.Tensor) -> torch.Tensor:
        if self.groups != 1:  # no grouped XNOR kernel: the float op on the same signs (exact)
            return F.conv2d(torch.where(xs >= 0, 1.0, -1.0), self.weight_signs(), None, self.stride, self.padding,
                            self.dilation, self.groups)
        self._sync_cache()
        h, w = xs.shape[-2:]
        corr = None
        if any(self.padding):
            corr = self._cache.get(("corr", h, w))
            if corr is None:
                corr = K.padding_correction(self.weight_signs(), h, w, self.stride, self.padding, self.dilation)
                self._cache[("corr", h, w)] = corr

        def run(b: str) -> torch.Tensor:
            if ("w", b) not in self._cache:
                self._cache[("w", b)] = K.pack_conv_weight(self.weight_signs(), b)
            return K.binary_conv2d(xs, self._cache[("w", b)], self.in_channels, self.kernel_size, self.stride,
                                   self.padding, self.dilation, corr, b)

        return self._run_measured(run, tuple(xs.shape))


# --------------------------------------------------------------------------- ternary


class _PackedTernary(_PackedBase):
    def _setup(self, n_out: int, per_channel: bool, bias: bool) -> None:
        self.per_channel = per_channel
        n_scale = n_out if per_channel else 1
        self.register_buffer("weight_codes", torch.zeros(packed_ternary_bytes(math.prod(self.weight_shape)), dtype=torch.uint8))
        self.register_buffer("pos_scale", torch.ones(n_scale))
        self.register_buffer("neg_scale", torch.ones(n_scale))
        self._init_bias(n_out, bias)

    def weight_codes_unpacked(self) -> torch.Tensor:
        """Ternary codes in {-1, 0, 1}."""
        codes = unpack_ternary_codes(self.weight_codes, math.prod(self.weight_shape)).reshape(self.weight_shape)
        return (codes == 1).float() - (codes == 2).float()

    def dequantized_weight(self) -> torch.Tensor:
        c = self.weight_codes_unpacked()
        shape = (-1,) + (1,) * (c.dim() - 1)
        return (c > 0) * self.pos_scale.reshape(shape) - (c < 0) * self.neg_scale.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bias(self._op(x, self.dequantized_weight().to(x.dtype)))


@register_module
class PackedTernaryLinear(_PackedTernary):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_channel: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._setup(out_features, per_channel, bias)

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "per_channel": self.per_channel}


@register_module
class PackedTernaryConv2d(_PackedTernary):
    is_conv = True

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True,
        per_channel: bool = False,
    ) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._setup(out_channels, per_channel, bias)

    def init_args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "per_channel": self.per_channel}


PACKED_MODULES = (PackedBinaryLinear, PackedBinaryConv2d, PackedTernaryLinear, PackedTernaryConv2d)


# --------------------------------------------------------------------------- conversion


def _geometry(layer: BinaryLinear | BinaryConv2d) -> dict[str, Any]:
    if isinstance(layer, BinaryLinear):
        return {"in_features": layer.in_features, "out_features": layer.out_features, "bias": layer.bias is not None}
    return {"in_channels": layer.in_channels, "out_channels": layer.out_channels, "kernel_size": layer.kernel_size,
            "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups,
            "bias": layer.bias is not None}


@torch.no_grad()
def to_packed(layer: BinaryLinear | BinaryConv2d, backend: str = "auto") -> nn.Module:
    """Convert a trained binary / ternary layer into its bit-packed inference module."""
    conv = isinstance(layer, BinaryConv2d)
    geo = _geometry(layer)
    w = layer.weight.detach().float()
    if layer.mode in ("twn", "ttq"):
        cls_t = PackedTernaryConv2d if conv else PackedTernaryLinear
        per_channel = layer.mode == "twn" and layer.per_channel
        out_t = cls_t(**geo, per_channel=per_channel)
        codes = layer.weight_signs()
        out_t.weight_codes.copy_(pack_ternary(codes))
        if layer.mode == "twn":
            from torchshrink.binary.ste import twn_codes_and_scale

            scale = twn_codes_and_scale(w, layer.twn_factor, layer.per_channel)[1].reshape(-1)
            out_t.pos_scale.copy_(scale)
            out_t.neg_scale.copy_(scale)
        else:
            out_t.pos_scale.copy_(layer.wp.detach().reshape(-1))
            out_t.neg_scale.copy_(layer.wn.detach().reshape(-1))
        packed: _PackedBase = out_t
    else:
        cls_b = PackedBinaryConv2d if conv else PackedBinaryLinear
        out_b = cls_b(**geo, mode=layer.mode, backend=backend)
        out_b.weight_bits.copy_(pack_binary(layer.weight_signs()))
        if layer.mode in SCALED:
            out_b.scale.copy_(w.abs().reshape(w.shape[0], -1).mean(1))
        if layer.mode in FULLY_BINARY:
            out_b.act_threshold.copy_(layer.act_threshold.detach())
        packed = out_b
    if layer.bias is not None:
        packed.bias.copy_(layer.bias.detach())  # type: ignore[union-attr]
    return packed.to(layer.weight.device).eval()
