"""ONNX export of torchshrink-quantized models with QuantizeLinear / DequantizeLinear, plus an
output-parity check in ONNX Runtime.

Int8DynamicLinear -> DynamicQuantizeLinear(x) -> DequantizeLinear -> MatMul with
DequantizeLinear(int8 weight, per-channel scale, axis 0) (ONNX Runtime fuses this QDQ pattern into
its integer MatMul). WeightOnlyLinear -> int8 codes (int4 unpacked) times their scales. Float layers
export as usual. Static INT8 graphs (quint8 tensors) are not exportable yet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.errors import UnsupportedLayerError

log = logging.getLogger(__name__)


class _DynQDQLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, qweight.float() * scale[:, None], bias)

    @staticmethod
    def symbolic(g: Any, x: Any, qweight: Any, scale: Any, bias: Any) -> Any:
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        xd = g.op("DequantizeLinear", xq, xs, xz)
        zp = g.op("Constant", value_t=torch.zeros(1, dtype=torch.int8))
        zps = g.op("Expand", zp, g.op("Shape", scale))
        wd = g.op("DequantizeLinear", qweight, scale, zps, axis_i=0)
        y = g.op("MatMul", xd, g.op("Transpose", wd, perm_i=[1, 0]))
        return g.op("Add", y, bias)


class _ExportDyn(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.register_buffer("qweight", m.qweight.clone())
        self.register_buffer("scale", m.w_scale.clone())
        self.register_buffer("bias", m.bias.clone() if m.bias is not None else torch.zeros(m.out_features))
        self.register_buffer("smooth", m.smooth.clone() if m.smooth is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        return _DynQDQLinear.apply(x, self.qweight, self.scale, self.bias)


class _ExportWeightOnly(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.group = m.group_size
        self.register_buffer("codes", m.codes().clone())
        self.register_buffer("scale", m.scale.clone())
        self.register_buffer("bias", m.bias.clone() if m.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.codes.float()
        if self.group:
            w = (c.reshape(c.shape[0], -1, self.group) * self.scale.unsqueeze(-1)).reshape(c.shape)
        else:
            w = c * self.scale[:, None]
        return F.linear(x, w, self.bias)


class _ExportAddNorm(nn.Module):
    """LinearAddNorm as plain ops: LayerNorm(dense(x) + residual); ``dense`` is swapped for its twin next."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.dense, self.LayerNorm = m.dense, m.LayerNorm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


def _dense_twin(m: nn.Module) -> nn.Module:
    """A float Linear / Conv2d computing what a weight-binary (binaryconnect / bwn) packed layer computes."""
    g = m.geometry_args()
    layer = (nn.Conv2d(**g, bias=m.bias is not None) if m.is_conv
             else nn.Linear(g["in_features"], g["out_features"], bias=m.bias is not None))
    layer.weight.data = m.dequantized_weight().float()
    if m.bias is not None:
        layer.bias.data = m.bias.detach().float().clone()
    return layer


def export_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized modules are replaced by exportable QDQ equivalents."""
    import copy

    from torchshrink.binary.layers import FULLY_BINARY
    from torchshrink.binary.modules import _PackedBinary, _PackedTernary
    from torchshrink.core.surgery import set_module
    from torchshrink.quant.fused import LinearAddNorm
    from torchshrink.quant.modules import Int8Conv2d, Int8DynamicLinear, Int8Linear, QuantizedAdd, WeightOnlyLinear

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        # FusedQKV / QKVPart stay: their inner Int8DynamicLinear is swapped below, and the hand-over of the
        # fused output traces into one GEMM and three slices
        if isinstance(m, LinearAddNorm):  # named_modules lists it before its dense, which is swapped next
            set_module(twin, name, _ExportAddNorm(m))
        elif isinstance(m, Int8DynamicLinear):  # a GELU fused into the GEMM's epilogue is emitted after it
            exp = _ExportDyn(m)
            set_module(twin, name, nn.Sequential(exp, nn.GELU()) if m.post_op == "gelu" else exp)
        elif isinstance(m, WeightOnlyLinear):
            set_module(twin, name, _ExportWeightOnly(m))
        elif isinstance(m, Int8Conv2d | Int8Linear | QuantizedAdd):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(m).__name__}) runs on quint8 tensors and cannot be exported to ONNX yet; "
                "exportable: int8-dynamic, weight-only and float layers"
            )
        elif isinstance(m, _PackedBinary) and m.mode not in FULLY_BINARY:  # dense in the file (see #21)
            set_module(twin, name, _dense_twin(m))
        elif isinstance(m, _PackedBinary):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(m).__name__}, mode {m.mode!r}) runs torchshrink's XNOR-popcount op, which ONNX "
                "has no operator for; exportable: int8-dynamic, weight-only, binaryconnect / bwn and float layers "
                "(torch.export keeps it: torchshrink.export.onnx.export_program)"
            )
        elif isinstance(m, _PackedTernary):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(m).__name__}) unpacks 2-bit codes with integer bit operations ONNX export "
                "lacks; exportable: int8-dynamic, weight-only, packed binary and float layers"
            )
    return twin.eval()


def export_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: str | os.PathLike[str], *,
                input_names: Sequence[str] | None = None, opset: int = 17) -> Path:
    """Write ``model`` as ONNX (QDQ for quantized layers); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(input_names or [f"input{i}" for i in range(len(inputs))])
    axes = {n: {0: "batch"} for n in names}
    tmp = out.with_name(f".{out.name}.tmp")
    twin = export_twin(model)
    try:
        torch.onnx.export(twin, tuple(inputs), str(tmp), input_names=names, output_names=["output"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    except Exception as e:  # the exporter raises many types; the user gets one line and no partial file
        tmp.unlink(missing_ok=True)
        raise UnsupportedLayerError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: "
                                    f"{(str(e).splitlines() or [''])[0][:200]}") from None
    os.replace(tmp, out)
    return out


def export_program(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (torchshrink's kernels appear as ``torch.ops.torchshrink.*`` ops), or one
    UnsupportedLayerError line: layers on quint8 tensors or torch's packed dynamic-quantization handles
    (which torch.export cannot trace) are named up front."""
    from torchshrink.quant.modules import Int8Conv2d, Int8DynamicLinear, Int8Linear, QuantizedAdd

    for name, m in model.named_modules():
        if isinstance(m, Int8Conv2d | Int8Linear | QuantizedAdd) or (
                isinstance(m, Int8DynamicLinear) and m.kernel != "onednn"):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(m).__name__}) runs on quantized tensors torch.export cannot trace; "
                "exportable: int8-dynamic with kernel='onednn', packed binary / ternary, CSR sparse and float layers; "
                "or export to ONNX (torchshrink.export.onnx.export_onnx)"
            )
    try:
        return torch.export.export(model, tuple(inputs))
    except Exception as e:
        raise UnsupportedLayerError(f"torch.export of {type(model).__name__} failed: {type(e).__name__}: "
                                    f"{(str(e).splitlines() or [''])[0][:200]}") from None


def onnx_parity(model: nn.Module, path: str | os.PathLike[str], inputs: Sequence[torch.Tensor], *,
                threads: int = 1) -> dict[str, float]:
    """Run the ONNX file in ONNX Runtime and compare with ``model`` on ``inputs``: cosine and max abs diff."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    got = torch.from_numpy(sess.run(None, feed)[0]).float()
    with torch.no_grad():
        ref = model(*inputs).float()
    cos = F.cosine_similarity(got.reshape(1, -1), ref.reshape(1, -1)).item()
    ops = sorted({n.op_type for n in __import__("onnx").load(str(path)).graph.node})
    return {"cosine": cos, "max_abs_diff": float((got - ref).abs().max()), "qdq": float("DequantizeLinear" in ops)}
