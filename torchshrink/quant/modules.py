"""Real-integer modules. Each holds plain integer tensors (int8 codes, or int4 codes packed two
per byte) plus float scales as buffers, so ``torchshrink.save`` writes them as they are; the
kernel-specific packed weights of PyTorch's quantized ops are rebuilt lazily on first use (after a
copy or a reload).

Kernels: ``torch.ops.quantized.linear_dynamic`` or oneDNN's ``qlinear_pointwise`` fed by our activation
quantization kernel (INT8 dynamic: int8 weights, activations quantized per call, per tensor or per token), ``quantized.conv2d[_relu]`` / ``linear[_relu]`` / ``add[_relu]`` (INT8 static, quint8
activations), on the engine named in ``engine`` (fbgemm / x86 / onednn).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.errors import ConfigError
from torchshrink.export.modules import register_module
from torchshrink.quant import kernels
from torchshrink.quant.kernels import park_codes, take_codes
from torchshrink.quant.packing import pack_int4, unpack_int4
from torchshrink.quant.primitives import dequantize_weight, engine, quantize_weight

warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
ACTIVATION_GRANULARITIES = ("tensor", "token")
DYNAMIC_KERNELS = ("linear_dynamic", "onednn")
POST_OPS = ("none", "gelu")
def _qweight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    zeros = torch.zeros(scale.numel(), dtype=torch.long)
    return torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)


class _Packed(nn.Module):
    """Base: a lazily built kernel handle that is dropped on copy / pickling / state loading."""

    def __init__(self) -> None:
        super().__init__()
        self._packed: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        self._packed = None
        return super()._apply(fn, recurse)

    def _set_int8_weight(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int = 8) -> None:
        """Quantize ``weight`` symmetric per output channel into ``qweight`` / ``w_scale``; copy ``bias``. A kernel
        handle packed from the previous weights is dropped."""
        q, s, _ = quantize_weight(weight.detach().float(), bits=bits, granularity="channel")
        self.qweight.copy_(q)
        self.w_scale.copy_(s)
        if bias is not None:
            self.bias.copy_(bias.detach())
        self._packed = None

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int8 codes stand for (per-channel scales, zero points 0)."""
        return dequantize_weight(self.qweight, self.w_scale, torch.zeros_like(self.w_scale))

    def _pack_linear(self, bias: torch.Tensor | None) -> Any:
        with engine(self.engine):
            self._packed = torch.ops.quantized.linear_prepack(_qweight(self.qweight, self.w_scale), bias)
        return self._packed

    def logical_nonzero(self) -> int:
        """Nonzero integer weights (a zero code is an exact zero: weights are symmetric) plus bias."""
        bias = getattr(self, "bias", None)
        return int(torch.count_nonzero(self.qweight)) + (int(torch.count_nonzero(bias)) if bias is not None else 0)


def _float_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().float().clone()


@register_module
class Int8DynamicLinear(_Packed):
    """Linear with int8 per-channel weights; activations are quantized to uint8 at run time and the
    GEMM runs in integers. ``activation="token"`` gives every row (token) its own grid, so one
    outlier token no longer coarsens the grid of all the others. An optional per-input-channel
    ``smooth`` divisor (SmoothQuant) moves channel outliers into the weights.

    ``kernel``: ``linear_dynamic`` -- PyTorch's ``quantized.linear_dynamic`` (quantizes per tensor inside;
    per-token rows are divided by their max |x| first and multiplied back after, which is exact
    because the op is row-wise linear); ``onednn`` -- our C kernel writes the uint8 codes (per tensor,
    or per row in one sweep) and oneDNN's ``qlinear_pointwise`` runs the GEMM with ``post_op="gelu"``
    fused into its epilogue; per-row zero points are removed after the GEMM (``kernels.rows_epilogue``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, smooth: bool = False,
                 engine: str = "x86", reduce_range: bool = True, activation: str = "tensor",
                 kernel: str = "linear_dynamic", post_op: str = "none", emit_codes: int = 0) -> None:
        super().__init__()
        if emit_codes not in (0, 127, 255):
            raise ConfigError(f"emit_codes={emit_codes!r}; allowed: 0 (off), 127, 255")
        for what, value, allowed in (("activation", activation, ACTIVATION_GRANULARITIES),
                                     ("kernel", kernel, DYNAMIC_KERNELS), ("post_op", post_op, POST_OPS)):
            if value not in allowed:
                raise ConfigError(f"{what}={value!r}; allowed: {', '.join(allowed)}")
        self.in_features, self.out_features = in_features, out_features
        self.engine, self.reduce_range, self.activation = engine, reduce_range, activation
        self.kernel, self.post_op = kernel, post_op
        # > 0: this (oneDNN, per-token) layer also writes its output's per-token codes in [0, emit_codes] in the
        # epilogue's sweep, for the next per-token layer that reads exactly this output (quant/fused.py link_codes)
        self.emit_codes = emit_codes
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features) if smooth else None)

    @classmethod
    def from_float(cls, lin: nn.Linear, *, smooth: torch.Tensor | None = None, engine: str = "x86",
                   reduce_range: bool = True, activation: str = "tensor", kernel: str = "linear_dynamic",
                   post_op: str = "none") -> Int8DynamicLinear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, smooth is not None, engine, reduce_range,
                activation, kernel, post_op)
        w = lin.weight.detach().float()
        if smooth is not None:
            m.smooth.copy_(smooth)
            w = w * smooth  # x / s @ (W * s)^T == x @ W^T
        m._set_int8_weight(w, lin.bias)
        return m

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "smooth": self.smooth is not None, "engine": self.engine, "reduce_range": self.reduce_range,
                "activation": self.activation, "kernel": self.kernel, "post_op": self.post_op,
                "emit_codes": self.emit_codes}

    def _pack(self) -> Any:
        if self.kernel == "onednn":
            colsum = self.w_scale * self.qweight.sum(1, dtype=torch.int32).float()  # zero-point correction
            self._packed = (torch.ops.onednn.qlinear_prepack(self.qweight, None), colsum,
                            torch.zeros(self.out_features, dtype=torch.long), self.w_scale.float().contiguous())
            return self._packed
        # per-token: the bias is added after the rows are scaled back, so the kernel gets none
        return self._pack_linear(None if self.activation == "token" else self.bias)

    @property
    def qmax(self) -> int:
        """Largest activation code: 127 with ``reduce_range`` (no int16 saturation without VNNI), else 255."""
        return 127 if self.reduce_range else 255

    def gemm(self, x2: torch.Tensor, source: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """oneDNN kernel, x2 [M, K] contiguous float32 -> (acc [M, N] float32, grid). Per tensor: acc is the
        finished output (bias and ``post_op`` applied) and grid None. Per token: acc is the raw GEMM on
        the codes and grid = (row scale, row zero point, colsum) for ``kernels.rows_epilogue``; the codes
        are the ones a producer layer handed over for ``source`` (the caller's tensor that x2 reshapes),
        if it did."""
        wp, colsum, wzp, ws = self._packed if self._packed is not None else self._pack()
        if self.activation == "token":
            codes = take_codes(source, self.qmax) if source is not None and self.smooth is None else None
            q, s, z = codes if codes is not None else kernels.quant_rows(x2, self.qmax)
            return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, wp, ws, wzp, None, 1.0, 0, torch.float32, "none", [],
                                                      ""), (s, z, colsum)
        q, s, z = kernels.quant_tensor(x2, self.qmax)
        bias = None if self.bias is None else self.bias.float()
        return torch.ops.onednn.qlinear_pointwise.tensor(q, s, z, wp, ws, wzp, bias, 1.0, 0, torch.float32,
                                                         self.post_op, [], "none" if self.post_op == "gelu" else ""), None

    def _onednn(self, x: torch.Tensor, x2: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """(output [M, N], the output's per-token codes for the next layer when ``emit_codes``, else None)."""
        acc, grid = self.gemm(x2, x)
        if grid is None:
            return acc, None
        bias, gelu = None if self.bias is None else self.bias.float(), self.post_op == "gelu"
        if self.emit_codes and x.dtype == torch.float32:
            return kernels.rows_epilogue_codes(acc, *grid, bias, gelu, self.emit_codes)
        return kernels.rows_epilogue(acc, *grid, bias, gelu=gelu), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed if self._packed is not None else self._pack()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.smooth is not None:
            x2 = x2 / self.smooth
        out_codes = None
        if self.kernel == "onednn":
            y, out_codes = self._onednn(x, x2.contiguous())
        elif self.activation == "token":
            row_max = torch.linalg.vector_norm(x2, ord=float("inf"), dim=-1, keepdim=True).clamp_min_(1e-12)
            x2 = x2.div_(row_max) if self.smooth is not None else x2 / row_max  # never write into the caller's x
            y = torch.ops.quantized.linear_dynamic(x2, packed, self.reduce_range)
            y = torch.addcmul(self.bias, y, row_max) if self.bias is not None else y.mul_(row_max)
        else:
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), packed, self.reduce_range)
        if self.post_op == "gelu" and self.kernel != "onednn":
            y = F.gelu(y)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        if out_codes is not None:  # parked for exactly the object returned
            park_codes(y, self.emit_codes, out_codes)
        return y

    def logical_params(self) -> int:
        return self.qweight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def macs(self, args: tuple, output: Any) -> int:
        return int(args[0].numel() // self.in_features * self.in_features * self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        w = super().dequantized_weight()
        return w / self.smooth if self.smooth is not None else w


@register_module
class WeightOnlyLinear(nn.Module):
    """Linear whose weight is stored as int8 per-channel or int4 per-group codes (int4 packed two per
    byte); it is dequantized on the fly and multiplied in float (a storage / memory saving: this CPU
    has no fast weight-only integer GEMM, measured)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        cols = in_features // 2 if bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8 if bits == 4 else torch.int8))
        n_scales = (out_features, in_features // group_size) if group_size else (out_features,)
        self.register_buffer("scale", torch.ones(n_scales))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, lin: nn.Linear, *, bits: int = 4, group_size: int = 128) -> WeightOnlyLinear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, group_size)
        q, s, _ = quantize_weight(lin.weight, bits=bits, granularity="group" if group_size else "channel",
                                  group_size=group_size or 128)
        m.qweight.copy_(pack_int4(q) if bits == 4 else q)
        m.scale.copy_(s)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        return m

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "group_size": self.group_size}

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scale, torch.zeros_like(self.scale), self.group_size or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def logical_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)


# --------------------------------------------------------------------------- static (quint8 activations)


@register_module
class QuantizeActivation(nn.Module):
    """float -> quint8 with calibrated scale / zero point (the entry of an integer region)."""

    def __init__(self, scale: float = 1.0, zero_point: int = 0) -> None:
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def init_args(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(x.float(), self.scale, self.zero_point, torch.quint8)


@register_module
class DequantizeActivation(nn.Module):
    def init_args(self) -> dict[str, Any]:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.dequantize() if x.is_quantized else x


@register_module
class Int8Conv2d(_Packed):
    """Conv2d (BatchNorm folded, ReLU optionally fused) on quint8 activations and int8 per-channel
    weights; returns quint8 with the calibrated output scale."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1), groups: int = 1,
                 relu: bool = False, out_scale: float = 1.0, out_zero_point: int = 0, engine: str = "x86") -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.relu, self.out_scale, self.out_zero_point, self.engine = relu, float(out_scale), int(out_zero_point), engine
        self.register_buffer("qweight", torch.zeros(out_channels, in_channels // groups, *self.kernel_size, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d, *, relu: bool,
                   out_scale: float, out_zero_point: int, engine: str, bits: int = 8) -> Int8Conv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,  # type: ignore[arg-type]
                conv.groups, relu, out_scale, out_zero_point, engine)
        m._set_int8_weight(weight, bias, bits)
        return m

    def init_args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "relu": self.relu, "out_scale": self.out_scale,
                "out_zero_point": self.out_zero_point, "engine": self.engine}

    def _pack(self) -> Any:
        with engine(self.engine):
            self._packed = torch.ops.quantized.conv2d_prepack(
                _qweight(self.qweight, self.w_scale), self.bias, list(self.stride), list(self.padding),
                list(self.dilation), self.groups)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed if self._packed is not None else self._pack()
        op = torch.ops.quantized.conv2d_relu if self.relu else torch.ops.quantized.conv2d
        return op(x, packed, self.out_scale, self.out_zero_point)

    def logical_params(self) -> int:
        return self.qweight.numel() + self.bias.numel()

    def macs(self, args: tuple, output: Any) -> int:
        per_out = self.qweight[0].numel()
        return int(output.numel() * per_out)


@register_module
class Int8Linear(_Packed):
    """Linear on quint8 activations (static scales), int8 per-channel weights, quint8 output."""

    def __init__(self, in_features: int, out_features: int, relu: bool = False, out_scale: float = 1.0,
                 out_zero_point: int = 0, engine: str = "x86") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.relu, self.out_scale, self.out_zero_point, self.engine = relu, float(out_scale), int(out_zero_point), engine
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, relu: bool, out_scale: float,
                   out_zero_point: int, engine: str, bits: int = 8) -> Int8Linear:
        m = cls(weight.shape[1], weight.shape[0], relu, out_scale, out_zero_point, engine)
        m._set_int8_weight(weight, bias, bits)
        return m

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "relu": self.relu,
                "out_scale": self.out_scale, "out_zero_point": self.out_zero_point, "engine": self.engine}

    def _pack(self) -> Any:
        return self._pack_linear(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed if self._packed is not None else self._pack()
        op = torch.ops.quantized.linear_relu if self.relu else torch.ops.quantized.linear
        shape = x.shape
        y = op(x.reshape(-1, shape[-1]), packed, self.out_scale, self.out_zero_point)
        return y.reshape(*shape[:-1], self.out_features)

    def logical_params(self) -> int:
        return self.qweight.numel() + self.bias.numel()

    def macs(self, args: tuple, output: Any) -> int:
        return int(output.numel() * self.in_features)


@register_module
class QuantizedAdd(nn.Module):
    """a + b (optionally ReLU) on two quint8 tensors, requantized to the calibrated output scale."""

    def __init__(self, relu: bool = False, out_scale: float = 1.0, out_zero_point: int = 0) -> None:
        super().__init__()
        self.relu, self.out_scale, self.out_zero_point = relu, float(out_scale), int(out_zero_point)

    def init_args(self) -> dict[str, Any]:
        return {"relu": self.relu, "out_scale": self.out_scale, "out_zero_point": self.out_zero_point}

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        op = torch.ops.quantized.add_relu if self.relu else torch.ops.quantized.add
        return op(a, b, self.out_scale, self.out_zero_point)
