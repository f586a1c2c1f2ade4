"""Bit-packed inference modules: what a binarized model is saved as and runs with.

- :class:`PackedBinaryLinear` / :class:`PackedBinaryConv2d`: 1 bit per weight (``weight_bits``,
  uint8), float per-channel ``scale`` (bwn / xnor; absent once folded into a following layer,
  see ``fold.py``) and ``act_threshold`` (bnn / xnor; absent once folded into the BatchNorm that
  feeds the layer, then the threshold is 0).
  Fully binary modes (bnn, xnor) run the XNOR-popcount kernel (``kernels.py``); binary-weight
  modes unpack the bits on the fly and call the float op.
- :class:`PackedTernaryLinear` / :class:`PackedTernaryConv2d`: 2 bits per weight (``weight_codes``),
  float ``pos_scale`` / ``neg_scale``; unpacked on the fly.

Float parameters are stored as ``param_dtype`` (float16 or float32) and computed in float32. All
are inference modules (no gradients through the packed weight).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchshrink.binary import kernels as K
from torchshrink.binary.geometry import ConvGeometry, LinearGeometry, _Geometry
from torchshrink.binary.layers import FULLY_BINARY, SCALED, TERNARY, BinaryConv2d, BinaryLinear
from torchshrink.binary.packing import (
    BITS_FORMAT,
    pack_binary,
    pack_ternary,
    packed_binary_bytes,
    packed_ternary_bytes,
    unpack_binary,
    unpack_ternary_codes,
)
from torchshrink.core import native, state
from torchshrink.core.errors import ConfigError
from torchshrink.export.modules import register_module

BINARY_MODES = ("binaryconnect", "bwn", "bnn", "xnor")
PARAM_DTYPES = {"float32": torch.float32, "float16": torch.float16}
log = logging.getLogger(__name__)


def check_param_dtype(name: str) -> torch.dtype:
    if name not in PARAM_DTYPES:
        raise ConfigError(f"param_dtype={name!r}; allowed: {', '.join(PARAM_DTYPES)}")
    return PARAM_DTYPES[name]


class _PackedBase(_Geometry):
    """Float parameters (stored as ``param_dtype``, used as float32) shared by the packed modules."""

    param_dtype: str
    packed_name: str

    def _init_params(self, names: dict[str, int], param_dtype: str) -> None:
        dt = check_param_dtype(param_dtype)
        self.param_dtype = param_dtype
        for name, n in names.items():
            self.register_buffer(name, torch.ones(n, dtype=dt) if "scale" in name else torch.zeros(n, dtype=dt))
        if "bias" not in names:
            self.bias = None
        state.put(self, formats={self.packed_name: BITS_FORMAT})
        self._cache: dict[Any, Any] = {}

    def _f32(self, name: str) -> torch.Tensor | None:
        """Buffer ``name`` as float32 (converted once while it is unchanged), or None if absent."""
        t = self._buffers.get(name)
        if t is None or t.dtype == torch.float32:
            return t
        if not native.eager((t,)):  # tracing: no cache (fake tensors have no storage to key on)
            return t.float().contiguous()
        ver = (t.data_ptr(), t._version)
        hit = self._cache.get(("f32", name))
        if hit is None or hit[0] != ver:
            hit = (ver, t.float().contiguous())
            self._cache[("f32", name)] = hit
        return hit[1]

    def _extra_params(self) -> int:
        return sum(b.numel() for n, b in self.named_buffers() if n != self.packed_name)

    def logical_params(self) -> int:
        return math.prod(self.weight_shape) + self._extra_params()

    def macs(self, args: tuple, output: torch.Tensor) -> int:
        """Multiply-accumulates of the equivalent float layer (for bnn/xnor they are XNOR-popcounts)."""
        return int(output.numel() * math.prod(self.weight_shape[1:]))

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self._op(x, self.dequantized_weight().to(x.dtype)), self._f32("bias"))


class _PackedBinary(_PackedBase):
    packed_name = "weight_bits"

    def _setup(  # type: ignore[override]
        self, bias: bool = True, mode: str = "bwn", backend: str = "auto", scaled: bool = True,
        param_dtype: str = "float32", thresholded: bool = True,
    ) -> None:
        if mode not in BINARY_MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(BINARY_MODES)}")
        K.check_backend_name(backend)  # availability is checked when the kernel first runs
        self.mode, self.backend, self.scaled = mode, backend, scaled and mode in SCALED
        self.register_buffer("weight_bits", torch.zeros(packed_binary_bytes(math.prod(self.weight_shape)), dtype=torch.uint8))
        self.thresholded = thresholded and mode in FULLY_BINARY
        params = {"scale": self.n_out} if self.scaled else {}
        if self.thresholded:
            params["act_threshold"] = self.n_in
        if bias:
            params["bias"] = self.n_out
        self._init_params(params, param_dtype)

    def option_args(self) -> dict[str, Any]:
        return {"mode": self.mode, "backend": self.backend, "scaled": self.scaled, "param_dtype": self.param_dtype,
                "thresholded": self.thresholded}

    def weight_signs(self) -> torch.Tensor:
        """The +-1 weight, unpacked."""
        return unpack_binary(self.weight_bits, self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        w = self.weight_signs()
        scale = self._f32("scale")
        return w if scale is None else w * scale.reshape(-1, *([1] * (w.dim() - 1)))

    def _sync_cache(self) -> None:
        """Drop packed weights and backend choices when the weights changed (e.g. a state load)."""
        key = (self.weight_bits.data_ptr(), self.weight_bits._version)
        if self._cache.get("key") != key:
            self._cache = {"key": key}

    def _packed_weight(self, backend: str) -> torch.Tensor:
        w = self._cache.get(("w", backend))
        if w is None:
            signs = self.weight_signs()
            w = K.pack_conv_weight(signs, backend) if self.is_conv else K.pack_signs(signs, backend)
            self._cache[("w", backend)] = w
        return w

    def _choose_backend(self, run: Callable[[str], torch.Tensor], shape: tuple[int, ...]) -> str:
        """The XNOR backend that measured fastest for this input shape on this machine
        (``backend="auto"``); both give the same integers, so the choice is safe."""
        resolved = K.resolve_backend(self.backend)
        if self.backend != "auto" or resolved == "numpy":
            return resolved
        from torchshrink.measure.latency import time_interleaved  # the library's one timing loop

        t = time_interleaved({b: (lambda b=b: run(b)) for b in ("c", "numpy")}, warmup=1, runs=4)
        choice = min(t, key=lambda b: t[b].p50_ms)  # the first call also packs the weights for each backend
        log.info("binary layer %s, input %s: %s measured fastest (%s)", type(self).__name__, shape, choice,
                 {k: f"{v.p50_ms:.3f} ms" for k, v in t.items()})
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode not in FULLY_BINARY:
            return self._float_forward(x)
        if not native.eager((x, self.weight_bits)):  # tracing: nothing cached (fake tensors), no timing
            saved, self._cache = self._cache, {}
            try:
                return self._xnor_forward(x.float(), K.resolve_backend(self.backend)).to(x.dtype)
            finally:
                self._cache = saved
        self._sync_cache()
        xf = x.float()
        key = ("backend", tuple(x.shape))
        choice = self._cache.get(key)
        if choice is None:
            choice = self._cache[key] = self._choose_backend(lambda b: self._xnor_forward(xf, b), tuple(x.shape))
        return self._xnor_forward(xf, choice).to(x.dtype)

    def _xnor_forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """Fully binary forward on ``backend``: integer XNOR-popcount, then scale, beta and bias in float."""
        tau = self._f32("act_threshold")
        xs = x if tau is None else x - tau.reshape(self.channel_shape)
        out = self._binary_dot(xs, backend).to(torch.float32)
        scale = self._f32("scale")
        if scale is not None:
            out = out * scale.reshape(self.channel_shape)
        if self.mode == "xnor":
            out = out * self.xnor_beta(xs)
        return self.add_bias(out, self._f32("bias"))

    def _binary_dot(self, xs: torch.Tensor, backend: str) -> torch.Tensor:
        raise NotImplementedError


@register_module
class PackedBinaryLinear(_PackedBinary, LinearGeometry):
    def _xnor_forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        if backend != "c" or K.resolve_backend("c") != "c":
            return super()._xnor_forward(x, backend)
        # one C call: sign + pack of the input, XNOR-popcount GEMM, scale, beta and bias
        tau = self._f32("act_threshold")
        beta = self.xnor_beta(x if tau is None else x - tau).contiguous() if self.mode == "xnor" else None
        return K.binary_linear_fused(x, tau, self._packed_weight("c"), self._f32("scale"), self._f32("bias"), beta)

    def _binary_dot(self, xs: torch.Tensor, backend: str) -> torch.Tensor:
        return K.binary_linear(xs, self._packed_weight(backend), self.in_features, backend)


@register_module
class PackedBinaryConv2d(_PackedBinary, ConvGeometry):
    def _binary_dot(self, xs: torch.Tensor, backend: str) -> torch.Tensor:
        if self.groups != 1:  # no grouped XNOR kernel: the float op on the same signs (exact)
            return self._op(torch.where(xs >= 0, 1.0, -1.0), self.weight_signs())
        h, w = xs.shape[-2:]
        corr = None
        if any(self.padding):
            corr = self._cache.get(("corr", h, w))
            if corr is None:
                corr = K.padding_correction(self.weight_signs(), h, w, self.stride, self.padding, self.dilation)
                self._cache[("corr", h, w)] = corr
        return K.binary_conv2d(xs, self._packed_weight(backend), self.in_channels, self.kernel_size, self.stride,
                               self.padding, self.dilation, corr, backend)


# --------------------------------------------------------------------------- ternary


class _PackedTernary(_PackedBase):
    packed_name = "weight_codes"

    def _setup(self, bias: bool = True, per_channel: bool = False, param_dtype: str = "float32") -> None:  # type: ignore[override]
        self.per_channel = per_channel
        n_scale = self.n_out if per_channel else 1
        self.register_buffer("weight_codes", torch.zeros(packed_ternary_bytes(math.prod(self.weight_shape)), dtype=torch.uint8))
        params = {"pos_scale": n_scale, "neg_scale": n_scale}
        if bias:
            params["bias"] = self.n_out
        self._init_params(params, param_dtype)

    def option_args(self) -> dict[str, Any]:
        return {"per_channel": self.per_channel, "param_dtype": self.param_dtype}

    def weight_codes_unpacked(self) -> torch.Tensor:
        """Ternary codes in {-1, 0, 1}."""
        codes = unpack_ternary_codes(self.weight_codes, math.prod(self.weight_shape)).reshape(self.weight_shape)
        return (codes == 1).float() - (codes == 2).float()

    def dequantized_weight(self) -> torch.Tensor:
        c = self.weight_codes_unpacked()
        shape = (-1,) + (1,) * (c.dim() - 1)
        pos, neg = self._f32("pos_scale"), self._f32("neg_scale")
        return (c > 0) * pos.reshape(shape) - (c < 0) * neg.reshape(shape)  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._float_forward(x)


@register_module
class PackedTernaryLinear(_PackedTernary, LinearGeometry):
    pass


@register_module
class PackedTernaryConv2d(_PackedTernary, ConvGeometry):
    pass


PACKED_MODULES = (PackedBinaryLinear, PackedBinaryConv2d, PackedTernaryLinear, PackedTernaryConv2d)


# --------------------------------------------------------------------------- conversion


def _ternary_scales(layer: BinaryLinear | BinaryConv2d, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.mode == "twn":
        from torchshrink.binary.ste import twn_codes_and_scale

        scale = twn_codes_and_scale(w, layer.twn_factor, layer.per_channel)[1].reshape(-1)
        return scale, scale
    return layer.wp.detach().reshape(-1), layer.wn.detach().reshape(-1)


@torch.no_grad()
def to_packed(layer: BinaryLinear | BinaryConv2d, backend: str = "auto", param_dtype: str = "float32") -> nn.Module:
    """Convert a trained binary / ternary layer into its bit-packed inference module."""
    geo = {**layer.geometry_args(), "bias": layer.bias is not None, "param_dtype": param_dtype}
    w = layer.weight.detach().float()
    packed: _PackedBase
    if layer.mode in TERNARY:
        packed = (PackedTernaryConv2d if layer.is_conv else PackedTernaryLinear)(
            **geo, per_channel=layer.mode == "twn" and layer.per_channel)
        packed.weight_codes.copy_(pack_ternary(layer.weight_signs()))
        pos, neg = _ternary_scales(layer, w)
        packed.pos_scale.copy_(pos)
        packed.neg_scale.copy_(neg)
    else:
        tau = layer.threshold_vector().detach() if layer.mode in FULLY_BINARY else None
        packed = (PackedBinaryConv2d if layer.is_conv else PackedBinaryLinear)(
            **geo, mode=layer.mode, backend=backend, thresholded=tau is not None and bool(tau.any()))
        packed.weight_bits.copy_(pack_binary(layer.weight_signs()))
        if layer.mode in SCALED:
            packed.scale.copy_(w.abs().reshape(w.shape[0], -1).mean(1))
        if packed.thresholded:  # an all-zero threshold (e.g. folded into a BatchNorm) is not stored
            packed.act_threshold.copy_(tau)
    if layer.bias is not None:
        packed.bias.copy_(layer.bias.detach())  # type: ignore[union-attr]
    return packed.to(layer.weight.device).eval()
