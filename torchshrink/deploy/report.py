"""What ``deploy`` writes: the chosen artifact (checked by loading it back the way the snippet does),
``deploy.md`` (the table, the machine, where the quality figures come from, how to load) and
``deploy.json``; all into a temp folder beside the output, renamed into place at the end."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchshrink.core.errors import ModelLoadError
from torchshrink.core.files import commit, temp_dir, write_atomic
from torchshrink.deploy import runtimes as rt
from torchshrink.measure.machine import machine_markdown

if TYPE_CHECKING:
    from torchshrink.deploy.api import DeployResult
    from torchshrink.deploy.candidates import Candidate

REPRODUCES = 0.999  # cosine the reloaded artifact must reach against the candidate it was written from


def reload(c: Candidate, folder: Path, threads: int, skeleton: nn.Module | None = None) -> nn.Module:
    """The written artifact of ``c`` loaded back as its snippet loads it (``skeleton``: the user's architecture,
    for a model of their own class that torchshrink cannot rebuild from the folder alone)."""
    if c.runtime == "onnxruntime":
        return rt.OrtModule(folder / "model.onnx", threads)
    if c.runtime == "openvino":
        assert isinstance(c.module, rt.OvModule)
        return rt.OvModule(rt.ov_read(folder / "model.xml"), threads, c.module.precision, c.module.per_shape)
    import torchshrink as ts

    m = ts.load(folder / "model", model=copy.deepcopy(skeleton) if skeleton is not None else None).eval()
    inner = c.module.inner if isinstance(c.module, rt.Compiled) else c.module
    return rt.Cast(m, inner.dtype) if isinstance(inner, rt.Cast) else m


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec) + ("x" if spec == ".2f" else "")


def markdown(result: DeployResult) -> str:
    from torchshrink.deploy.api import BURST

    r = result
    lines = [f"# deploy: {r.winner.name}", "", machine_markdown(r.machine).strip(), "",
             f"Timed: inputs {' + '.join('x'.join(map(str, s)) for s in r.example)}, {r.threads} thread(s), every row "
             f"that passed interleaved in one run, each turn {BURST} calls back to back of which the last {BURST - 1} are timed "
             "(median of the timed calls after warm-up).",
             f"Quality budget: {r.budget}.", ""]
    lines += [f"- {k}: {v}" for k, v in r.provenance.items() if k != "search"]
    ref = r.reference
    lines += ["", "| runtime | precision | status | p50 ms | speedup vs given | "
              + ("speedup vs reference | " if ref else "") + "quality | build s |",
              "|---|---|---|---:|---:|" + ("---:|" if ref else "") + "---|---:|"]
    for row in r.rows():
        q = ", ".join(f"{k} {v:.4f}" for k, v in row["quality"].items())
        mark = " **(chosen)**" if row["chosen"] else ""
        lines.append(f"| {row['runtime']} | {row['precision']}{mark} | {row['status']} | {_fmt(row['p50_ms'], '.3f')} | "
                     f"{_fmt(row['speedup_vs_given'], '.2f')} | "
                     + (f"{_fmt(row['speedup_vs_reference'], '.2f')} | " if ref else "")
                     + f"{q or '-'} | {row['build_s']:.1f} |")
    if ref:
        lines += ["", f"Reference (the original model, torch eager) timed in the same run: {ref.p50_ms:.3f} ms p50."]
    lines += ["", "## Load it", "", "```python", r.snippet(), "```", ""]
    return "\n".join(lines)


def publish(out: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temp folder beside ``out`` and move it into place whole; on any failure nothing is left behind."""
    tmp = temp_dir(out)
    try:
        fill(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_output(result: DeployResult, out: Path, example: tuple[torch.Tensor, ...]) -> None:
    """Write the chosen artifact and the reports into ``out`` (atomically); the artifact is loaded back and
    must reproduce the candidate's output on ``example``, else nothing is written."""
    from torchshrink.deploy.api import DeployError, outputs_match

    c = result.winner
    assert c.write is not None and c.module is not None

    def fill(tmp: Path) -> None:
        files = c.write(tmp)
        try:
            again = reload(c, tmp, result.threads)
            result.architecture = None
        except ModelLoadError as e:  # the user's own class: the folder holds weights and changes, their code the class
            if "is not one torchshrink rebuilds" not in str(e):
                raise
            again = reload(c, tmp, result.threads, skeleton=result.baseline.module)
            result.architecture = type(result.baseline.module).__name__
        cos = outputs_match(again(*example), c.module(*example))
        if not cos >= REPRODUCES:
            raise DeployError(f"the written {c.name} artifact does not reproduce its candidate (output cosine "
                              f"{cos:.5f}); nothing was written")
        result.out = out
        result.files = sorted(str(f.relative_to(tmp)) for f in files)
        write_atomic(tmp / "deploy.json", json.dumps(result.to_dict(), indent=1, default=_plain))
        write_atomic(tmp / "deploy.md", markdown(result))
    try:
        publish(out, fill)
    except BaseException:
        result.out = None
        raise


def _plain(v: Any) -> Any:
    return v.to_dict() if hasattr(v, "to_dict") else str(v)
