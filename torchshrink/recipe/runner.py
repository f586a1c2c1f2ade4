"""Run a recipe on a model: stage by stage, measuring before/after each, then write the compressed
model, the recipe and a report (Markdown + JSON) into a fresh output folder, atomically."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from torchshrink.core.api import apply
from torchshrink.core.config import get_entry
from torchshrink.core.errors import OutputExistsError
from torchshrink.core.select import check_names
from torchshrink.export.io import _atomic_dir, commit_dir, write_model_files
from torchshrink.measure.counts import run_model
from torchshrink.measure.latency import time_interleaved
from torchshrink.measure.machine import machine_info, machine_markdown
from torchshrink.measure.report import Measurement, compare, compare_markdown, measure
from torchshrink.models import load_model
from torchshrink.recipe.recipe import Recipe, Stage
from torchshrink.recipe.task import Task, task_for
from torchshrink.recipe.train import finetune, recovery_loss

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class StageResult:
    name: str
    kind: str
    measurement: Measurement
    vs_previous: dict[str, Any]
    seconds: float
    history: list[dict[str, float]]


@dataclasses.dataclass
class RunResult:
    model: nn.Module
    original: Measurement
    final: Measurement
    stages: list[StageResult]
    summary: dict[str, Any]
    out: Path | None
    timing_note: str

    def to_dict(self, recipe: Recipe, spec: str) -> dict[str, Any]:
        return {
            "model": spec,
            "recipe": recipe.to_dict(),
            "machine": machine_info(),
            "timing": self.timing_note,
            "original": self.original.to_dict(),
            "final": self.final.to_dict(),
            "summary": self.summary,
            "stages": [
                {"name": s.name, "kind": s.kind, "seconds": s.seconds, "measurement": s.measurement.to_dict(),
                 "vs_previous": s.vs_previous, "finetune_history": s.history}
                for s in self.stages
            ],
        }


def _timed_pair(a: nn.Module, b: nn.Module, task: Task, threads: int | None) -> tuple[Any, Any]:
    t = time_interleaved({"a": a, "b": b}, task.inputs, n_threads=threads, warmup=10, runs=30, min_seconds=1.0)
    return t["a"], t["b"]


def run_stage(model: nn.Module, stage: Stage, task: Task, progress: Progress | None = None) -> tuple[nn.Module, list]:
    """Apply one stage (prepare -> fine-tune -> finalize) to a copy of ``model``."""
    entry = get_entry(stage.config)
    new = apply(model, stage.config, select=stage.select, data=task.calibration)
    history: list[dict[str, float]] = []
    if stage.finetune is not None and stage.finetune.epochs > 0:
        loss = recovery_loss(stage.recovery, model, stage.finetune)
        on_step = (lambda m, s, t: entry.on_step(m, stage.config, s, t)) if entry.on_step else None
        cb = (lambda s, t: progress(f"{stage.config.kind}: fine-tune", s, t)) if progress else None
        history = finetune(new, task.require_train(), stage.finetune, loss_fn=loss, on_step=on_step,
                           evaluate=(lambda m: task.evaluate(m, model)) if task.primary == "accuracy" else None,
                           progress=cb)
    if entry.finalize is not None:
        new = entry.finalize(new, stage.config)
    return new.eval(), history


def compress(
    model: str | nn.Module,
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    force: bool = False,
    threads: int | None = None,
    task: Task | None = None,
    progress: Progress | None = None,
) -> RunResult:
    spec = model if isinstance(model, str) else getattr(model, "_torchshrink_source", type(model).__name__)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        if out_path.exists() and not force:
            raise OutputExistsError(f"output folder {out_path} already exists; pass --force to replace it")
        src = Path(spec) if isinstance(spec, str) else None
        if src is not None and src.exists() and out_path.resolve() == src.resolve():
            raise OutputExistsError(f"output {out_path} is the input model; torchshrink never overwrites its input")
    original = load_model(model) if isinstance(model, str) else model
    original.eval()
    task = task or task_for(original)
    run_model(original, task.inputs)  # a wrong input fails here, before any work
    for stage in recipe.stages:  # so does a misspelled layer name
        check_names(original, stage.select)
    base = measure(original, task.inputs, latency=False, evaluate=lambda m: task.evaluate(m, original), name="original")
    current, prev_meas = original, base
    stages: list[StageResult] = []
    for i, stage in enumerate(recipe.stages):
        label = f"{i + 1}/{len(recipe.stages)} {stage.config.kind}"
        if progress:
            progress(label, i, len(recipe.stages))
        t0 = time.perf_counter()
        new, history = run_stage(current, stage, task, progress)
        seconds = time.perf_counter() - t0
        m = measure(new, task.inputs, latency=False, evaluate=lambda mm: task.evaluate(mm, original), name=label)
        la, lb = _timed_pair(current, new, task, threads)
        prev_meas = dataclasses.replace(prev_meas, latency=la)
        m = dataclasses.replace(m, latency=lb)
        stages.append(StageResult(label, stage.config.kind, m, compare(prev_meas, m), seconds, history))
        current, prev_meas = new, m
    if progress:
        progress("final timing", len(recipe.stages), len(recipe.stages))
    lo, lf = _timed_pair(original, current, task, threads)
    before = dataclasses.replace(base, latency=lo)
    final = dataclasses.replace(stages[-1].measurement if stages else base, latency=lf)
    note = (f"latency: batch {task.inputs[0].shape[0]}, {lo.threads} thread(s), original and final timed "
            f"interleaved in one run, median of {lo.runs} runs after warm-up")
    result = RunResult(current, before, final, stages, compare(before, final), out_path, note)
    if out_path is not None:
        write_outputs(result, recipe, str(spec), out_path, force)
    return result


def report_markdown(result: RunResult, recipe: Recipe, spec: str) -> str:
    lines = [f"# torchshrink report: {recipe.name} on {spec}\n", machine_markdown(), f"\n{result.timing_note}\n",
             "\n## Original -> final\n", compare_markdown(result.summary)]
    for s in result.stages:
        lines += [f"\n## Stage {s.name} ({s.seconds:.1f} s)\n", compare_markdown(s.vs_previous)]
    lines += ["\n## Recipe\n", "```yaml\n" + recipe.to_yaml() + "```\n"]
    return "\n".join(lines)


def write_outputs(result: RunResult, recipe: Recipe, spec: str, out: Path, force: bool) -> None:
    tmp = _atomic_dir(out, force)
    try:
        (tmp / "model").mkdir()
        write_model_files(result.model, tmp / "model", recipe=recipe.to_dict())
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "report.json").write_text(json.dumps(result.to_dict(recipe, spec), indent=1, default=str))
        (tmp / "report.md").write_text(report_markdown(result, recipe, spec))
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
