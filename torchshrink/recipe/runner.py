"""Run a recipe on a model, stage by stage, measuring before/after each.

Output folder layout (everything appears at ``OUT`` only when the run has finished):

    OUT/model/            the compressed model (torchshrink.save format)
    OUT/stages/NN-kind/   checkpoint of every stage: model + stage.json
    OUT/recipe.yaml, report.json, report.md, report.html

While running, work happens in ``.OUT.partial/`` beside it. Each stage checkpoint is written to a
temp folder and renamed into place when complete, so a killed run (even SIGKILL) leaves only
finished checkpoints, and ``resume=True`` (``--resume``) continues from the last one. Every stage
re-seeds torch and the data order from (seed, stage index), so a resumed run ends with the same
result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core.api import apply
from torchshrink.core.config import get_entry
from torchshrink.core.errors import ConfigError, OutputExistsError
from torchshrink.core.select import check_names
from torchshrink.export.io import _atomic_dir, commit_dir, load, write_model_files
from torchshrink.measure.counts import run_model
from torchshrink.measure.latency import time_interleaved
from torchshrink.measure.machine import machine_info
from torchshrink.measure.report import Measurement, compare, measure
from torchshrink.models import load_model
from torchshrink.recipe.recipe import Recipe, Stage, order_warnings, recipe_from_yaml
from torchshrink.recipe.report import layer_summary, write_reports
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

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "seconds": self.seconds, "measurement": self.measurement.to_dict(),
                "vs_previous": self.vs_previous, "finetune_history": self.history}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageResult:
        return cls(d["name"], d["kind"], Measurement.from_dict(d["measurement"]), d["vs_previous"], d["seconds"], d["finetune_history"])


@dataclasses.dataclass
class RunResult:
    model: nn.Module
    original: Measurement
    final: Measurement
    stages: list[StageResult]
    summary: dict[str, Any]
    out: Path | None
    timing_note: str
    primary: str = ""
    resumed_from: int = 0

    def to_dict(self, recipe: Recipe, spec: str) -> dict[str, Any]:
        return {
            "model": spec, "recipe": recipe.to_dict(), "machine": machine_info(), "timing": self.timing_note,
            "primary": self.primary, "original": self.original.to_dict(), "final": self.final.to_dict(),
            "summary": self.summary, "stages": [s.to_dict() for s in self.stages],
            "layers": layer_summary(self.model), "resumed_from_stage": self.resumed_from,
            "warnings": order_warnings(recipe),
        }


def _timed_pair(a: nn.Module, b: nn.Module, task: Task, threads: int | None) -> tuple[Any, Any]:
    t = time_interleaved({"a": a, "b": b}, task.inputs, n_threads=threads, warmup=10, runs=30, min_seconds=1.0)
    return t["a"], t["b"]


def _reseed(task: Task, seed: int) -> None:
    torch.manual_seed(seed)
    gen = getattr(task.train, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)


def prepare_stage(model: nn.Module, stage: Stage, task: Task, seed: int = 0) -> nn.Module:
    """Re-seed (so a resumed run repeats this stage exactly) and apply the stage's config to a copy."""
    _reseed(task, seed)
    extra = {"train_data": task.train} if stage.config.family == "distill" else {}
    return apply(model, stage.config, select=stage.select, data=task.calibration, **extra)


def run_stage(model: nn.Module, stage: Stage, task: Task, progress: Progress | None = None, seed: int = 0) -> tuple[nn.Module, list]:
    """Apply one stage (prepare -> fine-tune -> finalize) to a copy of ``model``."""
    entry = get_entry(stage.config)
    new = prepare_stage(model, stage, task, seed)
    history: list[dict[str, float]] = []
    if stage.finetune is not None and stage.finetune.epochs > 0:
        ft = dataclasses.replace(stage.finetune, seed=stage.finetune.seed + seed)
        loss = recovery_loss(stage.recovery, model, ft)
        on_step = (lambda m, s, t: entry.on_step(m, stage.config, s, t)) if entry.on_step else None
        cb = (lambda s, t: progress(f"{stage.config.kind}: fine-tune", s, t)) if progress else None
        history = finetune(new, task.require_train(), ft, loss_fn=loss, on_step=on_step,
                           evaluate=(lambda m: task.evaluate(m, model)) if task.primary == "accuracy" else None,
                           progress=cb)
    if entry.finalize is not None:
        new = entry.finalize(new, stage.config)
    return new.eval(), history


def _work_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def _run_key(spec: str, recipe: Recipe, seed: int) -> dict[str, Any]:
    return {"model": spec, "recipe": recipe.to_dict(), "seed": seed}


def _prepare_work(out: Path, spec: str, recipe: Recipe, seed: int, force: bool, resume: bool) -> Path:
    work = _work_dir(out)
    key = _run_key(spec, recipe, seed)
    if resume:
        if not (work / "run.json").is_file():
            done = " (that run already finished)" if (out / "report.json").is_file() else ""
            raise ConfigError(f"nothing to resume at {out}{done}: no unfinished run found ({work.name} is missing)")
        if json.loads((work / "run.json").read_text()) != key:
            raise ConfigError(f"the unfinished run at {out} used another model, recipe or seed; rerun without --resume")
        return work
    if out.exists() and not force:
        raise OutputExistsError(f"output folder {out} already exists; pass --force to replace it")
    if work.exists():
        if not force:
            raise OutputExistsError(f"an unfinished run exists at {work}; pass --resume to continue it or --force to start over")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "run.json").write_text(json.dumps(key, indent=1))
    return work


def _tensorboard(work: Path | None) -> Any:
    """A SummaryWriter in OUT/tensorboard when the tensorboard package is installed, else None."""
    if work is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(work / "tensorboard"))


def _log_stage(writer: Any, index: int, res: StageResult) -> None:
    if writer is None:
        return
    for rec in res.history:
        for k, v in rec.items():
            if k != "epoch":
                writer.add_scalar(f"stage{index + 1}-{res.kind}/finetune/{k}", v, int(rec["epoch"]))
    m = res.measurement
    for k, v in {"file_bytes": m.file_bytes, "macs": m.macs, "nonzero_params": m.nonzero_params,
                 "latency_p50_ms": m.latency.p50_ms if m.latency else None, **m.quality}.items():
        if v is not None:
            writer.add_scalar(f"stages/{k}", v, index + 1)
    writer.flush()


def _checkpoint(work: Path, index: int, stage: Stage, model: nn.Module, result: StageResult) -> None:
    stages = work / "stages"
    stages.mkdir(exist_ok=True)
    final = stages / f"{index + 1:02d}-{stage.config.kind}"
    tmp = _atomic_dir(final, force=True)
    try:
        (tmp / "model").mkdir()
        write_model_files(model, tmp / "model", recipe=stage.to_dict())
        (tmp / "stage.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finished_stage(work: Path | None, index: int, stage: Stage) -> tuple[nn.Module, StageResult] | None:
    if work is None:
        return None
    d = work / "stages" / f"{index + 1:02d}-{stage.config.kind}"
    if not (d / "stage.json").is_file():
        return None
    return load(d / "model"), StageResult.from_dict(json.loads((d / "stage.json").read_text()))


def compress(
    model: str | nn.Module,
    recipe: Recipe | None,
    out: str | Path | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    threads: int | None = None,
    task: Task | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> RunResult:
    spec = model if isinstance(model, str) else getattr(model, "_torchshrink_source", type(model).__name__)
    out_path = Path(out) if out is not None else None
    if resume and out_path is None:
        raise ConfigError("resume needs the output folder of the interrupted run")
    if recipe is None:
        if not resume:
            raise ConfigError("a recipe is required (a YAML file or a built-in name)")
        recipe = recipe_from_yaml((_work_dir(out_path) / "recipe.yaml").read_text()) if (_work_dir(out_path) / "recipe.yaml").is_file() else None
        if recipe is None:
            raise ConfigError(f"nothing to resume at {out_path}: no unfinished run found")
    if out_path is not None and isinstance(spec, str) and Path(spec).exists() and out_path.resolve() == Path(spec).resolve():
        raise OutputExistsError(f"output {out_path} is the input model; torchshrink never overwrites its input")
    if out_path is not None and not resume and out_path.exists() and not force:
        raise OutputExistsError(f"output folder {out_path} already exists; pass --force to replace it")
    original = load_model(model) if isinstance(model, str) else model
    original.eval()
    task = task or task_for(original)
    run_model(original, task.inputs)  # a wrong input fails here, before any work
    for stage in recipe.stages:  # so does a misspelled layer name, or fine-tuning without data
        check_names(original, stage.select)
        if stage.finetune is not None and stage.finetune.epochs > 0:
            task.require_train()
    for warning in order_warnings(recipe):
        log.warning("%s", warning)
    work = _prepare_work(out_path, str(spec), recipe, seed, force, resume) if out_path is not None else None
    if work is not None:
        (work / "recipe.yaml").write_text(recipe.to_yaml())
    base = measure(original, task.inputs, latency=False, evaluate=lambda m: task.evaluate(m, original), name="original")
    current, prev_meas = original, base
    stages: list[StageResult] = []
    resumed_from = 0
    writer = _tensorboard(work)
    for i, stage in enumerate(recipe.stages):
        label = f"{i + 1}/{len(recipe.stages)} {stage.config.kind}"
        done = _finished_stage(work, i, stage)
        if done is not None:
            current, res = done
            stages.append(res)
            prev_meas, resumed_from = res.measurement, i + 1
            continue
        if progress:
            progress(label, i, len(recipe.stages))
        t0 = time.perf_counter()
        new, history = run_stage(current, stage, task, progress, seed=seed * 1000 + i)
        seconds = time.perf_counter() - t0
        m = measure(new, task.inputs, latency=False, evaluate=lambda mm: task.evaluate(mm, original), name=label)
        la, lb = _timed_pair(current, new, task, threads)
        m = dataclasses.replace(m, latency=lb)
        res = StageResult(label, stage.config.kind, m, compare(dataclasses.replace(prev_meas, latency=la), m), seconds, history)
        stages.append(res)
        _log_stage(writer, i, res)
        if work is not None:
            _checkpoint(work, i, stage, new, res)
        current, prev_meas = new, m
        if progress:
            progress(label, i + 1, len(recipe.stages))
    if writer is not None:
        writer.close()
    if progress:
        progress("final timing", 0, 1)
    lo, lf = _timed_pair(original, current, task, threads)
    before = dataclasses.replace(base, latency=lo)
    final = dataclasses.replace(stages[-1].measurement if stages else base, latency=lf)
    note = (f"latency: batch {task.inputs[0].shape[0]}, {lo.threads} thread(s), original and final timed "
            f"interleaved in one run, median of {lo.runs} runs after warm-up")
    result = RunResult(current, before, final, stages, compare(before, final), out_path, note, task.primary, resumed_from)
    if work is not None and out_path is not None:
        _finish(result, recipe, str(spec), work, out_path)
    return result


def _finish(result: RunResult, recipe: Recipe, spec: str, work: Path, out: Path) -> None:
    final_model = work / "model"
    if final_model.exists():
        shutil.rmtree(final_model)
    final_model.mkdir()
    write_model_files(result.model, final_model, recipe=recipe.to_dict())
    write_reports(work, result.to_dict(recipe, spec))
    (work / "run.json").unlink()
    commit_dir(work, out)
