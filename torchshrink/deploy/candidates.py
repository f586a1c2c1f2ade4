"""Deployment candidates: precision (the model as given, bf16, fp16, torchshrink INT8, INT4 weight-only,
OpenVINO's INT8) x runtime (torch eager, torch.compile, ONNX Runtime, OpenVINO). Each is built from the
model the user gives; one that cannot be built on this machine is kept as a row saying why."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.deploy import runtimes as rt
from torchshrink.measure.machine import cpu_flags

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "torch.compile", "onnxruntime", "openvino")
AS_GIVEN = "as given"
_COMPRESSED = ("torchshrink.quant", "torchshrink.binary", "torchshrink.llm", "torchshrink.prune.sparse")


@dataclasses.dataclass
class Candidate:
    runtime: str
    precision: str
    module: nn.Module | None = None
    status: str = "built"  # built | skipped: why | failed: why | passed | below budget
    build_s: float = 0.0
    quality: dict[str, float] = dataclasses.field(default_factory=dict)
    timing: Any = None  # measure.latency.Timing
    write: Callable[[Path], list[Path]] | None = None  # writes the artifact into a folder, returns its files
    snippet: str = ""  # how to load and call the written artifact ({dir} is the folder)

    @property
    def name(self) -> str:
        return f"{self.runtime} / {self.precision}"

    @property
    def ok(self) -> bool:
        return self.module is not None and not self.status.startswith(("skipped", "failed"))


def compressed(model: nn.Module) -> bool:
    """True where the model already holds torchshrink's integer / packed / sparse layers."""
    return any(type(m).__module__.startswith(_COMPRESSED) and type(m).__name__ != "CastWrapper"
               for m in model.modules())


def one_line(e: BaseException) -> str:
    """An exception as the one line a table row shows: its text with line breaks folded (ONNX Runtime puts the
    detail -- which index, got what, expected what -- on the lines after its first), at most 200 characters."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _build(runtime: str, precision: str, make: Callable[[], tuple[nn.Module, Callable[[Path], list[Path]], str]]
           ) -> Candidate:
    c = Candidate(runtime, precision)
    t0 = time.perf_counter()
    try:
        c.module, c.write, c.snippet = make()
    except Exception as e:  # a candidate this machine cannot build is a row of the table, not an error
        log.info("deploy candidate %s failed: %s", c.name, e)
        c.status = f"failed: {one_line(e)}"
    c.build_s = time.perf_counter() - t0
    return c


def _skip(runtime: str, precision: str, why: str) -> Candidate:
    return Candidate(runtime, precision, status=f"skipped: {why}")


def _bert_like(model: nn.Module) -> bool:
    return any(re.search(r"attention\.self\.query$", n) for n, _ in model.named_modules())


def _transformer(model: nn.Module) -> bool:
    return any("Attention" in type(m).__name__ for m in model.modules())


def int8_model(model: nn.Module, calibration: list[Any], attention_bf16: bool = False) -> nn.Module:
    """torchshrink's INT8 for this kind of model: static (calibrated) for CNNs, the bert-int8 recipe for BERT
    encoders (``attention_bf16``: its attention kernel with bfloat16 products), dynamic INT8 Linears otherwise."""
    import torchshrink as ts

    if any(isinstance(x, nn.Conv2d) for x in model.modules()):
        try:
            return ts.apply(copy.deepcopy(model), ts.Int8StaticConfig(calib_batches=max(1, len(calibration))),
                            data=calibration, inplace=True)
        except UnsupportedLayerError as e:  # static INT8 traces the model with torch.fx; a ViT does not trace
            log.info("deploy: static INT8 does not fit (%s); dynamic INT8 instead", e)
    m = copy.deepcopy(model)
    if _bert_like(m):
        from torchshrink.recipe import load_recipe

        st = load_recipe("bert-int8").stages[0]
        config = dataclasses.replace(st.config, attention_bf16=True) if attention_bf16 else st.config
        return ts.apply(m, config, select=st.select, data=calibration, inplace=True)
    return ts.apply(m, ts.Int8DynamicConfig(), data=calibration, inplace=True)


def int4_model(model: nn.Module) -> nn.Module:
    import torchshrink as ts

    return ts.apply(copy.deepcopy(model), ts.WeightOnlyConfig(bits=4, group_size=128), inplace=True)


# --------------------------------------------------------------------------- artifacts and snippets

def _torch_writer(model: nn.Module) -> Callable[[Path], list[Path]]:
    def write(folder: Path) -> list[Path]:
        import torchshrink as ts

        ts.save(model, folder / "model")
        return sorted((folder / "model").iterdir())
    return write


def _torch_snippet(precision: str, compiled: bool) -> str:
    lines = ["import torch, torchshrink as ts", "model = ts.load('{dir}/model')"]
    if compiled:
        lines.append("model = torch.compile(model)  # compiles on the first call")
    if precision in ("bf16", "fp16"):
        dt = "bfloat16" if precision == "bf16" else "float16"
        lines.append(f"y = model(*(x.to(torch.{dt}) if x.is_floating_point() else x for x in inputs)).float()")
    else:
        lines.append("y = model(*inputs)")
    return "\n".join(lines)


def _copy_writer(files: list[Path], names: list[str]) -> Callable[[Path], list[Path]]:
    def write(folder: Path) -> list[Path]:
        out = []
        for f, n in zip(files, names, strict=True):
            shutil.copyfile(f, folder / n)
            out.append(folder / n)
        return out
    return write


ORT_SNIPPET = ("import onnxruntime as ort\n"
               "session = ort.InferenceSession('{dir}/model.onnx', providers=['CPUExecutionProvider'])\n"
               "y = session.run(None, {{i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}})[0]")


def _ov_snippet(precision: str, threads: int, per_shape: bool = False) -> str:
    config = repr(rt.ov_config(threads, precision)).replace("{", "{{").replace("}", "}}")  # a format template
    if per_shape:  # see runtimes.OvModule: the QDQ graph is compiled for the shapes it runs
        return ("import openvino as ov\n"
                "m = ov.Core().read_model('{dir}/model.xml')\n"
                "m.reshape({{i: list(x.shape) for i, x in enumerate(inputs)}})  # compile for the shapes you run\n"
                f"model = ov.Core().compile_model(m, 'CPU', {config})\n"
                "y = model([x.numpy() for x in inputs])[0]")
    return ("import openvino as ov\n"
            f"model = ov.Core().compile_model('{{dir}}/model.xml', 'CPU', {config})\n"
            "y = model([x.numpy() for x in inputs])[0]")


# --------------------------------------------------------------------------- building them all

@dataclasses.dataclass
class Settings:
    threads: int
    runtimes: tuple[str, ...] = RUNTIMES
    compile: bool = True
    scratch: Path = Path(".")


def torch_precisions(model: nn.Module, calibration: list[Any]) -> list[tuple[str, Callable[[], nn.Module] | str]]:
    """(precision, how to make the eager model or why not) for every precision tried."""
    flags = cpu_flags()
    if compressed(model):
        why = "the model is already compressed to its own precision"
        return [(AS_GIVEN, lambda: model), ("bf16", why), ("int8 (torchshrink)", why), ("int4 weight-only", why)]
    fp16 = (lambda: rt.Cast(copy.deepcopy(model), torch.float16)) if flags & {"avx512_fp16", "amx_fp16"} else \
        "this CPU has no native fp16 arithmetic (avx512_fp16 / amx_fp16)"
    bf16_attention = "int8 + bf16 attention (torchshrink)", (
        (lambda: int8_model(model, calibration, attention_bf16=True)) if flags & {"avx512_bf16", "amx_bf16"} else
        "this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    return [(AS_GIVEN, lambda: model),
            ("bf16", lambda: rt.Cast(copy.deepcopy(model), torch.bfloat16)),
            ("fp16", fp16),
            ("int8 (torchshrink)", lambda: int8_model(model, calibration)),
            *([bf16_attention] if _bert_like(model) else []),
            ("int4 weight-only", (lambda: int4_model(model)) if any(isinstance(x, nn.Linear) for x in model.modules())
             else "the model has no Linear layer to hold 4-bit weights")]


def build_all(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: list[tuple[torch.Tensor, ...]],
              calibration_batches: list[Any], s: Settings) -> list[Candidate]:
    """Every candidate, in table order. ``calibration``: input tuples (OpenVINO's INT8); ``calibration_batches``:
    the same data as torchshrink's calibration takes it."""
    out: list[Candidate] = []
    eager: dict[str, nn.Module] = {}
    for precision, make in torch_precisions(model, calibration_batches):
        if isinstance(make, str):
            out.append(_skip("torch", precision, make))
            continue

        def torch_eager(make: Callable[[], nn.Module] = make, precision: str = precision) -> tuple:
            m = make().eval()
            save = m.inner if isinstance(m, rt.Cast) else m
            return m, _torch_writer(save), _torch_snippet(precision, compiled=False)
        c = _build("torch", precision, torch_eager)
        out.append(c)
        if c.module is not None:
            eager[precision] = c.module
    if "torch.compile" in s.runtimes:
        for precision in (AS_GIVEN, "bf16"):
            if not s.compile:
                out.append(_skip("torch.compile", precision, "not asked for (compile=False / --no-compile)"))
            elif precision in eager:
                m = eager[precision]
                save = m.inner if isinstance(m, rt.Cast) else m
                out.append(_build("torch.compile", precision, lambda m=m, save=save, p=precision: (
                    rt.Compiled(m).warm(example), _torch_writer(save), _torch_snippet(p, compiled=True))))
    onnx_files: dict[str, Path] = {}
    if "onnxruntime" in s.runtimes or "openvino" in s.runtimes:
        for precision in (AS_GIVEN, "int8 (torchshrink)", "int4 weight-only"):
            if precision in eager:
                path = s.scratch / f"{re.sub(r'[^a-z0-9]+', '-', precision)}.onnx"
                try:
                    onnx_files[precision] = rt.write_onnx(eager[precision], example, path)
                except Exception as e:
                    onnx_files[precision] = None  # type: ignore[assignment]
                    out.append(Candidate("onnxruntime", precision, status=f"failed: ONNX export: {one_line(e)}"))
    if "onnxruntime" in s.runtimes:
        why = rt.missing("onnxruntime")
        for precision, path in onnx_files.items():
            if why:
                out.append(_skip("onnxruntime", precision, why))
            elif path is not None:
                out.append(_build("onnxruntime", precision, lambda p=path: (
                    rt.OrtModule(p, s.threads), _copy_writer([p], ["model.onnx"]), ORT_SNIPPET)))
    if "openvino" in s.runtimes:
        out.extend(_openvino(model, onnx_files, calibration, s))
    return out


def _openvino(model: nn.Module, onnx_files: dict[str, Path], calibration: list[tuple[torch.Tensor, ...]],
              s: Settings) -> list[Candidate]:
    why = rt.missing("openvino")
    plain = onnx_files.get(AS_GIVEN)
    if why:
        return [_skip("openvino", "any precision", why)]
    if plain is None:
        return [_skip("openvino", "fp32", "no ONNX export of the model to read (see the onnxruntime row)")]

    def ov(path: Path, hint: str, quantize: bool = False, per_shape: bool = False) -> tuple:
        ov_model = rt.ov_int8(path, calibration, transformer=_transformer(model)) if quantize else rt.ov_read(path)
        return (rt.OvModule(ov_model, s.threads, hint, per_shape),
                lambda folder: rt.ov_save(ov_model, folder / "model.xml"), _ov_snippet(hint, s.threads, per_shape))
    given = compressed(model)  # a QDQ graph: OpenVINO runs its integer layers as INT8 whatever the hint
    out = [_build("openvino", AS_GIVEN if given else "fp32", lambda: ov(plain, "f32", per_shape=given))]
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        out.append(_build("openvino", f"{AS_GIVEN} + bf16" if given else "bf16",
                          lambda: ov(plain, "bf16", per_shape=given)))
    else:
        out.append(_skip("openvino", "bf16", "this CPU has no native bf16 (avx512_bf16 / amx_bf16)"))
    nncf_missing = rt.missing("nncf")
    if compressed(model):
        out.append(_skip("openvino", "int8 (NNCF)", "the model is already compressed to its own precision"))
    elif nncf_missing:
        out.append(_skip("openvino", "int8 (NNCF)", nncf_missing))
    else:
        out.append(_build("openvino", "int8 (NNCF)", lambda: ov(plain, "f32", quantize=True)))
    q = onnx_files.get("int8 (torchshrink)")
    if q is not None:
        out.append(_build("openvino", "int8 (torchshrink)", lambda: ov(q, "f32", per_shape=True)))
    return out
