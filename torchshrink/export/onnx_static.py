"""Static INT8 graphs (quint8 activations) as ONNX QDQ.

Every quint8 value of the traced graph becomes QuantizeLinear -> DequantizeLinear with its calibrated
scale and uint8 zero point; Int8Conv2d / Int8Linear become Conv / Gemm on DequantizeLinear(int8 weight,
per-channel scale) and DequantizeLinear(int32 bias, input scale x weight scale), QuantizedAdd becomes Add,
each followed by its output's Q/DQ. ONNX Runtime fuses these groups into its integer kernels
(QLinearConv, QGemm, QLinearAdd). Ops that torch runs on quint8 tensors in between (pooling, flatten,
ReLU, reshapes) keep their input's quantization grid, so their outputs get a Q/DQ with the same one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from torchshrink.export.onnx_ops import Twin, const

_INT32_MAX = 2**31 - 1


class FakeQuant(torch.autograd.Function):
    """x -> QuantizeLinear(scale, uint8 zero point) -> DequantizeLinear: a quint8 value, in float."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, zero_point: int) -> Any:
        s = const(g, torch.tensor(scale, dtype=torch.float32))
        z = const(g, torch.tensor(zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class QWeightOp(torch.autograd.Function):
    """Conv (4-D weight) or Gemm with transB (2-D) of ``x`` with DequantizeLinear(int8 weight, per-channel
    scale) and DequantizeLinear(int32 bias, per-channel scale)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, qbias: torch.Tensor,
                b_scale: torch.Tensor, conv: tuple[tuple[int, ...], ...] | None) -> torch.Tensor:
        w = qweight.float() * w_scale.reshape(-1, *([1] * (qweight.dim() - 1)))
        b = qbias.float() * b_scale
        if conv is None:
            return F.linear(x, w, b)
        stride, padding, dilation, (groups,) = conv
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def symbolic(g: Any, x: Any, qweight: Any, w_scale: Any, qbias: Any, b_scale: Any,
                 conv: tuple[tuple[int, ...], ...] | None) -> Any:
        n = qweight.type().sizes()[0]
        wd = g.op("DequantizeLinear", qweight, w_scale, const(g, torch.zeros(n, dtype=torch.int8)), axis_i=0)
        bd = g.op("DequantizeLinear", qbias, b_scale, const(g, torch.zeros(n, dtype=torch.int32)), axis_i=0)
        if conv is None:
            return g.op("Gemm", x, wd, bd, transB_i=1)
        stride, padding, dilation, (groups,) = conv
        kernel = qweight.type().sizes()[2:]
        return g.op("Conv", x, wd, bd, strides_i=list(stride), pads_i=list(padding) * 2, dilations_i=list(dilation),
                    group_i=groups, kernel_shape_i=list(kernel))


def fit_int32_bias(qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor,
                   in_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight and per-channel scale (float64) whose int32 bias, on the grid in_scale x w_scale, cannot
    overflow the integer kernel's int32 accumulator.

    Torch's quantized kernels add the bias in float; ONNX's QDQ form (and ONNX Runtime's QLinearConv / QGemm) add
    it as int32 on the accumulator. With tiny activation scales (a layer whose inputs are ~1e-6) the bias divided by
    that grid passes 2^31 and wraps or clamps: a channel-pruned, randomly initialised ShuffleNetV2's classifier
    gave cosine 0.98 against torch (0.03 once ONNX Runtime fused it). Such channels take a coarser weight scale --
    the smallest that fits the bias with room for the largest accumulation -- and their int8 weights are re-rounded
    to it, as ONNX Runtime's own quantizer does. Other channels stay bit-identical."""
    k = qweight[0].numel()
    # leave room for the largest |sum (x - zp) * w| an int8 weight row can reach (at least half the range)
    room = float(max(_INT32_MAX - 255 * 128 * k, _INT32_MAX // 2))
    need = bias.abs() / (in_scale * room) if in_scale > 0 else torch.zeros_like(w_scale)
    grow = need > w_scale
    if not bool(grow.any()):
        return qweight.clone(), w_scale.clone()
    new_scale = torch.where(grow, need * (1 + 1e-6), w_scale)
    shape = (-1, *([1] * (qweight.dim() - 1)))
    real = qweight.double() * w_scale.reshape(shape)
    requant = torch.round(real / new_scale.reshape(shape)).clamp(-128, 127).to(torch.int8)
    return torch.where(grow.reshape(shape), requant, qweight), new_scale


class StaticLayer(Twin):
    """Int8Conv2d / Int8Linear: the integer op, its ReLU, and the output's Q/DQ."""

    def __init__(self, m: nn.Module, in_scale: float) -> None:
        super().__init__()
        from torchshrink.quant.modules import Int8Conv2d

        self.conv = ((tuple(m.stride), tuple(m.padding), tuple(m.dilation), (m.groups,))
                     if isinstance(m, Int8Conv2d) else None)
        self.relu, self.out_scale, self.out_zero_point = m.relu, m.out_scale, m.out_zero_point
        self.out_features = m.qweight.shape[0]
        qweight, w_scale = fit_int32_bias(m.qweight, m.w_scale.double(), m.bias.double(), in_scale)
        b_scale = (in_scale * w_scale).clamp_min(1e-30)
        qbias = torch.round(m.bias.double() / b_scale).clamp(-_INT32_MAX, _INT32_MAX)
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("qbias", qbias.to(torch.int32))
        self.register_buffer("b_scale", b_scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.conv is None and x.dim() != 2:  # Gemm is 2-D
            x = x.reshape(-1, shape[-1])
        y = QWeightOp.apply(x, self.qweight, self.w_scale, self.qbias, self.b_scale, self.conv)
        if self.conv is None and len(shape) != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        if self.relu:
            y = F.relu(y)
        return FakeQuant.apply(y, self.out_scale, self.out_zero_point)


class StaticAdd(Twin):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.relu, self.out_scale, self.out_zero_point = m.relu, m.out_scale, m.out_zero_point

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = a + b
        return FakeQuant.apply(F.relu(y) if self.relu else y, self.out_scale, self.out_zero_point)


class Requant(Twin):
    """A Q/DQ with fixed quint8 parameters (graph entries and ops that keep their input's grid)."""

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FakeQuant.apply(x, self.scale, self.zero_point)


def is_static(gm: nn.Module) -> bool:
    from torchshrink.quant.modules import Int8Conv2d, Int8Linear, QuantizeActivation, QuantizedAdd

    return isinstance(gm, fx.GraphModule) and any(
        isinstance(m, Int8Conv2d | Int8Linear | QuantizedAdd | QuantizeActivation) for m in gm.children())


def static_twin(gm: fx.GraphModule) -> None:
    """Rewrite a static INT8 GraphModule (a copy) in place into its QDQ twin."""
    from torchshrink.quant.modules import DequantizeActivation, Int8Conv2d, Int8Linear, QuantizeActivation, QuantizedAdd
    from torchshrink.quant.static import _is_pass

    grid: dict[fx.Node, tuple[float, int]] = {}  # quint8 value -> (scale, zero point)
    swaps: dict[str, nn.Module] = {}
    requant: list[fx.Node] = []
    for n in gm.graph.nodes:
        mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        first = n.args[0] if n.args else None
        if isinstance(mod, QuantizeActivation):
            grid[n] = (mod.scale, mod.zero_point)
            swaps[str(n.target)] = Requant(mod.scale, mod.zero_point)
        elif isinstance(mod, Int8Conv2d | Int8Linear):
            if first not in grid:
                raise ValueError(f"layer {n.target!r} ({type(mod).__name__}) reads no quint8 value of this graph")
            grid[n] = (mod.out_scale, mod.out_zero_point)
            swaps[str(n.target)] = StaticLayer(mod, grid[first][0])
        elif isinstance(mod, QuantizedAdd):
            grid[n] = (mod.out_scale, mod.out_zero_point)
            swaps[str(n.target)] = StaticAdd(mod)
        elif isinstance(mod, DequantizeActivation):
            swaps[str(n.target)] = nn.Identity()
        elif first in grid and _is_pass(gm, n) and not (n.op == "call_method" and n.target in ("size", "dim")):
            grid[n] = grid[first]  # type: ignore[index]
            requant.append(n)
    for name, twin in swaps.items():
        gm.add_submodule(name, twin)
    for k, n in enumerate(requant):
        name = f"_ts_requant_{k}"
        gm.add_submodule(name, Requant(*grid[n]))
        with gm.graph.inserting_after(n):
            q = gm.graph.call_module(name, (n,))
        n.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    gm.graph.lint()
    gm.recompile()
