"""The runtimes a deployed model can run in, each wrapped as an ``nn.Module`` (tensors in, tensor out) so
quality checks and timing treat every candidate alike: torch eager, torch.compile, ONNX Runtime and
OpenVINO. The optional ones say how to install them when they are missing."""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.measure.quality import main_output

INSTALL = {"onnxruntime": "pip install 'torchshrink[deploy]' (onnx + onnxruntime)",
           "openvino": "pip install 'torchshrink[deploy]' (openvino)",
           "nncf": "pip install 'torchshrink[deploy]' (nncf, for OpenVINO int8)",
           "llama_cpp": "pip install 'torchshrink[llm]' (llama-cpp-python)",
           "gguf": "pip install 'torchshrink[llm]' (gguf)"}


def missing(package: str) -> str | None:
    """None when ``package`` imports here, else why not and how to install it."""
    if importlib.util.find_spec(package) is None:
        return f"not installed: {INSTALL.get(package, 'pip install ' + package)}"
    if package == "onnxruntime" and importlib.util.find_spec("onnx") is None:
        return f"onnx not installed: {INSTALL['onnxruntime']}"
    return None


def input_names(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[str]:
    """The forward's parameter names for the positional ``inputs`` (``input0``... where they cannot be read)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= len(inputs) and len(set(params[:len(inputs)])) == len(inputs):
        return params[:len(inputs)]
    return [f"input{i}" for i in range(len(inputs))]


def dynamic_axes(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, dict[int, str]]:
    """The batch dimension of every input is free; integer inputs of rank 2 (token ids, masks) also free
    their sequence length. Image sizes stay as traced."""
    axes: dict[str, dict[int, str]] = {}
    for n, t in zip(names, inputs, strict=True):
        axes[n] = {0: "batch"}
        if not t.is_floating_point() and t.dim() == 2:
            axes[n][1] = "sequence"
    return axes


def write_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> Path:
    """``model`` as ONNX at ``path`` (quantized layers as QDQ), batch (and token length) left free."""
    from torchshrink.export.onnx import export_onnx

    names = input_names(model, inputs)
    # check=False: deploy holds every candidate to its quality budget on held-out data itself
    return export_onnx(model, tuple(inputs), path, input_names=names, dynamic_axes=dynamic_axes(names, inputs),
                       check=False)


def _first_output(out: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(out[0] if isinstance(out, list | tuple) else out))


def _feed_arrays(inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().cpu().contiguous().numpy() for t in inputs]


class OrtModule(nn.Module):
    """An ONNX Runtime session on this CPU called like the torch model it was exported from."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's worker threads otherwise spin after every run: on a 2-core machine they took the cores from
        # whatever ran next (a torch model timed right after ORT: 67 -> 107 ms) and ORT itself was no faster
        # (315 ms spinning, 309 ms not; MiniLM 16 x 128, 2 threads, one interleaved run)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.names):
            raise UnsupportedLayerError(f"the ONNX model takes {len(self.names)} inputs ({', '.join(self.names)}), "
                                        f"not {len(inputs)}")
        return _first_output(self.session.run(None, dict(zip(self.names, _feed_arrays(inputs), strict=True))))


def ov_config(threads: int, precision: str | None) -> dict[str, Any]:
    """OpenVINO CPU settings for batch latency on ``threads`` cores, in ``precision`` (f32 or bf16; None:
    OpenVINO's own choice of precision and streams, what a user gets by default)."""
    if precision is None:
        return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    return {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision}


class OvModule(nn.Module):
    """An OpenVINO model compiled for this CPU, called like the torch model it came from. ``per_shape``: compiled
    once per input shape, reshaped to it first -- OpenVINO's low-precision passes mishandle torchshrink's QDQ graphs
    with a dynamic batch (a static-INT8 Swin-T: output cosine 0.88 against torch; 0.9994 compiled for its shape)."""

    def __init__(self, ov_model: Any, threads: int, precision: str | None = "f32", per_shape: bool = False) -> None:
        super().__init__()
        self.ov_model, self.precision, self.per_shape = ov_model, precision, per_shape
        self.config = ov_config(threads, precision)
        self._compiled: dict[tuple, tuple[Any, Any]] = {}
        if not per_shape:
            self._compile(None)

    def _compile(self, shapes: tuple | None) -> tuple[Any, Any]:
        import openvino as ov

        if shapes not in self._compiled:
            model = self.ov_model
            if shapes is not None:
                model = model.clone()
                model.reshape({i: list(s) for i, s in enumerate(shapes)})
            compiled = ov.Core().compile_model(model, "CPU", self.config)
            if len(self._compiled) >= 8:  # held-out text batches come in many lengths: keep the latest few
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[shapes] = (compiled, compiled.create_infer_request())
        return self._compiled[shapes]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        compiled, request = self._compile(tuple(tuple(t.shape) for t in inputs) if self.per_shape else None)
        res = request.infer(_feed_arrays(inputs))
        return torch.from_numpy(np.array(res[compiled.output(0)]))


def ov_read(onnx_path: Path) -> Any:
    import openvino as ov

    return ov.Core().read_model(str(onnx_path))


def ov_int8(onnx_path: Path, calibration: Sequence[Sequence[torch.Tensor]], *, transformer: bool) -> Any:
    """OpenVINO's own INT8 (NNCF post-training quantization) of the ONNX model, calibrated on ``calibration``."""
    import nncf

    ov_model = ov_read(onnx_path)
    names = [i.get_any_name() for i in ov_model.inputs]
    items = [dict(zip(names, _feed_arrays(b), strict=True)) for b in calibration]
    kwargs: dict[str, Any] = {"subset_size": len(items)}  # NNCF counts dataset items (here: batches)
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    return nncf.quantize(ov_model, nncf.Dataset(items), **kwargs)


def ov_save(ov_model: Any, path: Path) -> list[Path]:
    """``path`` (.xml) and its .bin; weights kept in their own precision (no fp16 compression)."""
    import openvino as ov

    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return [path, path.with_suffix(".bin")]


class Compiled(nn.Module):
    """``torch.compile`` of an eager module (inductor), compiled on first call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.fn = torch.compile(inner, dynamic=None)  # held-out batches vary in shape: dims go dynamic once

    def warm(self, inputs: Sequence[torch.Tensor]) -> Compiled:
        """Compile now (on ``inputs``' shapes), so the build time says what compiling costs."""
        self.fn(*inputs)
        return self

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.fn(*inputs)


class Cast(nn.Module):
    """The whole model in ``dtype`` (a plain ``model.to(dtype)``): floating inputs cast in, outputs cast back."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner.to(dtype), dtype

    def forward(self, *inputs: torch.Tensor) -> Any:
        out = self.inner(*(t.to(self.dtype) if t.is_floating_point() else t for t in inputs))
        return main_output(out).float()


def file_bytes(paths: Sequence[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)
