"""ONNX export of torchshrink models that keeps their compression, plus an output-parity check in ONNX
Runtime.

:func:`export_twin` swaps every compressed layer for a twin that emits its stored integers as they are
(ops and initializers: ``onnx_ops.py``, static INT8: ``onnx_static.py``):

- int8-dynamic: DynamicQuantizeLinear(x) -> MatMulInteger with the int8 weight -> scales, bias;
- weight-only: DequantizeLinear(int8 per channel; int8 per group or INT4 with ``block_size``) -> MatMul
  (ONNX Runtime: MatMulNBits, int8 activations by default; float Gemm in models with bnn / xnor layers);
- int8-static / QAT: QuantizeLinear / DequantizeLinear around Conv, Gemm and Add (uint8 activations,
  int8 per-channel weights, int32 biases);
- k-means: bit planes of the codes (uint8) -> BitwiseAnd -> Gather from the float codebook;
- binary / ternary packed layers: their 1- / 2-bit codes unpacked in the graph; bnn / xnor binarize the
  input with Where(x - threshold >= 0, 1, -1);
- fp16 / bf16 casts: the half-precision tensors cast to float32 where used; CSR sparse layers: dense.

The default opset is 21 (INT4 and blocked DequantizeLinear): torch's exporter writes 20 and the file
is then lifted to 21 (no op torch emits changed meaning between them). Torch's constant folding is
off, so no dequantization is folded back into a float32 initializer; ONNX Runtime folds or fuses those
subgraphs when it loads the file (DequantizeLinear + MatMul -> MatMulNBits, the dynamic pattern ->
DynamicQuantizeMatMul, static Q/DQ groups -> QLinearConv / QGemm / QLinearAdd, bit unpacking -> float).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.export import onnx_ops as ops
from torchshrink.measure.quality import cosine_rows, main_output

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 13, 21
_TORCH_MAX_OPSET = 20  # the TorchScript exporter's highest
EXPORTABLE = ("int8-dynamic, int8-static / QAT, weight-only int8 / int4, k-means, packed binary / ternary, "
              "fp16 / bf16 casts, CSR sparse and float layers")


def _twin_of(m: nn.Module, float_matmul: bool) -> nn.Module | None:
    """The exportable stand-in for one compressed layer, or None for a layer that exports as it is."""
    from torchshrink.binary.modules import _PackedBinary, _PackedTernary
    from torchshrink.prune.sparse import SparseLinear
    from torchshrink.quant.cast import CastWrapper
    from torchshrink.quant.fused import LinearAddNorm
    from torchshrink.quant.kmeans import ClusteredLayer
    from torchshrink.quant.modules import Int8DynamicLinear, WeightOnlyLinear

    if isinstance(m, LinearAddNorm):  # named_modules lists it before its dense, which is swapped next
        return ops._ExportAddNorm(m)
    if type(m).__name__ == "NativeSelfAttention":  # likewise before its query / key / value
        return ops._ExportAttention(m)
    if isinstance(m, Int8DynamicLinear):  # a GELU fused into the GEMM's epilogue is emitted after it
        return nn.Sequential(ops.ExportDyn(m), nn.GELU()) if m.post_op == "gelu" else ops.ExportDyn(m)
    if isinstance(m, WeightOnlyLinear):
        return ops.ExportWeightOnly(m, float_matmul)
    table: tuple[tuple[Any, Any], ...] = (
        (ClusteredLayer, ops.ExportClustered),
        (_PackedBinary, ops.ExportBinary), (_PackedTernary, ops.ExportTernary), (CastWrapper, ops.ExportCast),
        (SparseLinear, ops.dense_linear))
    return next((make(m) for cls, make in table if isinstance(m, cls)), None)


def export_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose compressed modules are replaced by exportable equivalents (see the module doc)."""
    from torchshrink.binary.layers import FULLY_BINARY
    from torchshrink.binary.modules import _PackedBinary
    from torchshrink.core.surgery import set_module
    from torchshrink.export.onnx_static import is_static, static_twin
    from torchshrink.quant.modules import Int8Conv2d, Int8Linear, QuantizedAdd

    twin = copy.deepcopy(model)
    # sign activations flip on the int8 activation rounding of ONNX Runtime's MatMulNBits: next to fully
    # binary layers, weight-only layers (binarize's kept first / last layers) export for a float matmul
    float_matmul = any(isinstance(m, _PackedBinary) and m.mode in FULLY_BINARY for m in twin.modules())
    for name, m in list(twin.named_modules()):
        # FusedQKV / QKVPart stay: their inner Int8DynamicLinear is swapped below, and the hand-over of the
        # fused output traces into one GEMM and three slices
        if is_static(m):
            try:
                static_twin(m)  # type: ignore[arg-type]
            except ValueError as e:
                raise UnsupportedLayerError(f"{e}; exportable: static INT8 layers fed by a QuantizeActivation or "
                                            "another integer layer of the graph int8-static built") from None
            continue
        new = _twin_of(m, float_matmul)
        if new is not None:
            set_module(twin, name, new)
    for name, m in twin.named_modules():
        if isinstance(m, Int8Conv2d | Int8Linear | QuantizedAdd):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(m).__name__}) runs on quint8 tensors outside a static INT8 graph, so its "
                f"input's scale is unknown; exportable: {EXPORTABLE} (static INT8 as the graph int8-static returns)")
    return twin.eval()


class _Plain(nn.Module):
    """Calls the model with positional inputs only (the TorchScript tracer would fill the remaining
    parameters' defaults in positionally, which transformers' argument handling rejects) and returns
    plain tensors: a transformers ModelOutput becomes the tuple of its tensors. A model that takes ``use_cache``
    (a causal LM) is called without its KV cache, which is an object, not tensors, in transformers 4.5x."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        try:
            takes = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes = False
        self.kwargs = {"use_cache": False} if takes else {}

    def forward(self, *inputs: torch.Tensor) -> Any:
        y = self.model(*inputs, **self.kwargs)
        if hasattr(y, "to_tuple"):
            return tuple(t for t in y.to_tuple() if isinstance(t, torch.Tensor))
        return y


def _check_opset(twin: nn.Module, opset: int) -> int:
    """Refuse an opset outside the supported range or below what a layer's ops need; returns the highest need."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedLayerError(f"opset {opset} is not supported; allowed: {MIN_OPSET} to {MAX_OPSET}")
    top = MIN_OPSET
    for name, m in twin.named_modules():
        need = getattr(m, "min_opset", 0)
        if need > opset:
            allowed = f"opset {need}" + (f" to {MAX_OPSET}" if need < MAX_OPSET else "")
            raise UnsupportedLayerError(f"layer {name!r} exports with {m.needs}, which needs opset >= {need}; "
                                        f"got opset {opset}; allowed: {allowed}")
        top = max(top, need)
    return top


def _finish(path: Path, opset: int) -> None:
    """Rewrite the placeholder nodes and lift the file to ``opset`` (> 20)."""
    import onnx

    model = onnx.load(str(path))
    ops.finish_blocked(model)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    model.ir_version = max(model.ir_version, 10)  # INT4 and opset 21
    onnx.save(model, str(path))


PARITY = 0.99  # output cosine the written file must reach in ONNX Runtime against the model, on the export inputs


@contextlib.contextmanager
def plain_attention() -> Iterator[None]:
    """torch's fused inference path for nn.TransformerEncoderLayer / nn.MultiheadAttention
    (aten::_transformer_encoder_layer_fwd, _native_multi_head_attention) has no ONNX form: every model built from
    them failed to export. While exporting, the layers take their composite path -- the same math in plain ops."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def export_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: str | os.PathLike[str], *,
                input_names: Sequence[str] | None = None, opset: int = MAX_OPSET,
                dynamic_axes: dict[str, dict[int, str]] | None = None, check: bool = True) -> Path:
    """Write ``model`` as ONNX with its compressed layers kept compressed (see the module doc); returns the
    path. ``dynamic_axes`` (input name -> {axis: name}) defaults to a free batch axis on every input.
    ``check`` (where onnxruntime is installed): the file is run in ONNX Runtime on ``inputs`` and must reach
    output cosine PARITY against ``model`` -- a graph that exports but computes something else (a channel-pruned
    static-INT8 ShuffleNetV2: 0.03 with ORT's optimizations) is refused, not handed back. Nothing is left at
    ``path`` when the export or the check fails (one UnsupportedLayerError line)."""
    out = Path(path)
    twin = export_twin(model)
    need = _check_opset(twin, opset)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(input_names or [f"input{i}" for i in range(len(inputs))])
    axes = dynamic_axes if dynamic_axes is not None else {n: {0: "batch"} for n in names}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with torch.no_grad(), plain_attention():
            torch.onnx.export(_Plain(twin), tuple(inputs), str(tmp), input_names=names, output_names=["output"],
                              dynamic_axes=axes, opset_version=min(opset, _TORCH_MAX_OPSET), dynamo=False,
                              do_constant_folding=False,
                              custom_opsets={ops.DOMAIN: 1} if need > _TORCH_MAX_OPSET else None)
        if opset > _TORCH_MAX_OPSET:
            _finish(tmp, opset)
    except Exception as e:  # the exporter raises many types; the user gets one line and no partial file
        tmp.unlink(missing_ok=True)
        raise UnsupportedLayerError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: "
                                    f"{(str(e).splitlines() or [''])[0][:200]}") from None
    if check and importlib.util.find_spec("onnxruntime") is not None:
        try:
            cos = onnx_parity(model, tmp, inputs)["cosine"]
        except Exception as e:  # noqa: BLE001 - ONNX Runtime refusing the graph is a failed export too
            tmp.unlink(missing_ok=True)
            raise UnsupportedLayerError(f"the ONNX export of {type(model).__name__} does not run in ONNX Runtime: "
                                        f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
        if not cos >= PARITY:
            tmp.unlink(missing_ok=True)
            raise UnsupportedLayerError(f"the ONNX export of {type(model).__name__} computes something else in ONNX "
                                        f"Runtime (output cosine {cos:.4f} vs the model on the export inputs, "
                                        f"below {PARITY}); nothing written")
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
        with plain_attention():
            return torch.export.export(model, tuple(inputs))
    except Exception as e:
        raise UnsupportedLayerError(f"torch.export of {type(model).__name__} failed: {type(e).__name__}: "
                                    f"{(str(e).splitlines() or [''])[0][:200]}") from None


def onnx_parity(model: nn.Module, path: str | os.PathLike[str], inputs: Sequence[torch.Tensor], *,
                threads: int = 1, ort_config: dict[str, str] | None = None) -> dict[str, float]:
    """Run the ONNX file in ONNX Runtime (session config entries ``ort_config``, e.g.
    ``{"session.qdq_matmulnbits_accuracy_level": "0"}``) and compare its first output with ``model``'s on
    ``inputs``: cosine, max abs diff, ``identical`` (1.0 when every value is equal: integer outputs) and
    ``qdq`` (1.0 when the file holds a (Dynamic)QuantizeLinear or DequantizeLinear)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    for key, value in (ort_config or {}).items():
        so.add_session_config_entry(key, value)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    got = torch.from_numpy(sess.run(None, feed)[0])
    with torch.no_grad():
        ref = main_output(model(*inputs))
    same = got.shape == ref.shape and bool(torch.equal(got.to(ref.dtype), ref))
    got, ref = got.float(), ref.float()
    cos = float(cosine_rows(got.reshape(1, -1), ref.reshape(1, -1))[0])
    ops_used = {n.op_type for n in onnx.load(str(path)).graph.node}
    return {"cosine": cos, "max_abs_diff": float((got - ref).abs().max()), "identical": float(same),
            "qdq": float(bool(ops_used & {"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"}))}
