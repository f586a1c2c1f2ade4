"""Run a recipe on a model, stage by stage, measuring before/after each.

Output folder layout (everything appears at ``OUT`` only when the run has finished):

    OUT/model/            the compressed model (torchshrink.save format)
    OUT/stages/NN-kind/   checkpoint of every stage: model + stage.json
    OUT/recipe.yaml, report.json, report.md, report.html
    OUT/run.json, OUT/.torchshrink-run   the run's model, recipe and seed; the marker of a torchshrink folder

While running, work happens in ``.OUT.partial/`` beside it, which appears (atomically) with its
run.json already inside. Each stage checkpoint is written to a temp folder and renamed into place
when complete, so a killed run (even SIGKILL) leaves only finished checkpoints, and ``resume=True``
(``--resume``) continues from the last one; renaming ``.OUT.partial`` to ``OUT`` is the commit (see
``workdir`` for every state a kill can leave). Every stage re-seeds torch and the data order from
(seed, stage index), so a resumed run ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from torchshrink.core import state
from torchshrink.core.api import prepare, run, trains
from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.core.files import commit, kill_point, temp_dir, write_atomic
from torchshrink.core.select import check_names
from torchshrink.export.io import load, write_model_files
from torchshrink.measure.counts import run_model
from torchshrink.measure.latency import time_interleaved
from torchshrink.measure.machine import machine_info
from torchshrink.measure.report import Measurement, compare, measure
from torchshrink.models import load_model
from torchshrink.recipe.advice import faster_variant, run_warnings
from torchshrink.recipe.recipe import Recipe, Stage, order_warnings, recipe_from_yaml
from torchshrink.recipe.report import layer_summary, report_html, report_markdown
from torchshrink.recipe.task import Task, task_for
from torchshrink.recipe.train import finetune, recovery_loss
from torchshrink.recipe.userdata import DataSpec, task_from_data
from torchshrink.recipe.workdir import (
    check_output,
    commit_run,
    folder_bytes,
    plan_work,
    read_run_key,
    stage_errors,
    start_work,
    work_dir,
    writing,
)

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
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)  # Task.provenance
    warnings: list[str] = dataclasses.field(default_factory=list)  # slower stages, quality falls

    def to_dict(self, recipe: Recipe, spec: str) -> dict[str, Any]:
        return {
            "model": spec, "recipe": recipe.to_dict(), "machine": machine_info(), "timing": self.timing_note,
            "primary": self.primary, "provenance": self.provenance, "original": self.original.to_dict(),
            "final": self.final.to_dict(), "summary": self.summary, "stages": [s.to_dict() for s in self.stages],
            "layers": layer_summary(self.model), "resumed_from_stage": self.resumed_from,
            "warnings": [*order_warnings(recipe), *self.warnings],
        }


def _timed_pair(a: nn.Module, b: nn.Module, task: Task, threads: int | None) -> tuple[Any, Any]:
    t = time_interleaved({"a": a, "b": b}, task.inputs, n_threads=threads, warmup=10, runs=30, min_seconds=1.0)
    return t["a"], t["b"]


def _reseed(task: Task, seed: int) -> None:
    torch.manual_seed(seed)
    gen = getattr(task.train, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)


def _stage_options(stage: Stage, task: Task) -> dict[str, Any]:
    return {"train_data": task.train} if stage.config.family == "distill" else {}


def prepare_stage(model: nn.Module, stage: Stage, task: Task, seed: int = 0) -> nn.Module:
    """Re-seed (so a resumed run repeats this stage exactly) and prepare the stage's config on a copy."""
    _reseed(task, seed)
    return prepare(model, stage.config, select=stage.select, data=task.calibration, **_stage_options(stage, task))


def run_stage(model: nn.Module, stage: Stage, task: Task, progress: Progress | None = None, seed: int = 0) -> tuple[nn.Module, list]:
    """One stage on a copy of ``model`` through the shared driver (prepare -> fine-tune -> finalize)."""
    trainer = None
    if stage.finetune is not None and stage.finetune.epochs > 0:
        ft = dataclasses.replace(stage.finetune, seed=stage.finetune.seed + seed)
        loss = recovery_loss(stage.recovery, model, ft)
        cb = (lambda s, t: progress(f"{stage.config.kind}: fine-tune", s, t)) if progress else None

        def trainer(new: nn.Module, hook: Callable[[nn.Module, int, int], None]) -> list[dict[str, float]]:
            return finetune(new, task.require_train(), ft, loss_fn=loss, on_step=hook,
                            evaluate=(lambda m: task.evaluate(m, model)) if task.primary == "accuracy" else None,
                            progress=cb)

    _reseed(task, seed)
    return run(model, stage.config, select=stage.select, data=task.calibration, train=trainer,
               **_stage_options(stage, task))


def _run_key(spec: str, recipe: Recipe, seed: int) -> dict[str, Any]:
    return {"model": spec, "recipe": recipe.to_dict(), "seed": seed}


def _resume_recipe(out: Path) -> Recipe:
    """The recipe of the unfinished run at ``out`` (from its run.json); the reason when there is none."""
    key = read_run_key(work_dir(out)) if work_dir(out).is_dir() else None
    if key is None or not isinstance(key.get("recipe"), dict):
        plan_work(out, {}, force=False, resume=True)  # raises the reason: missing, abandoned, finished
        raise ConfigError(f"the unfinished run at {work_dir(out)} names no recipe; pass --recipe")
    return recipe_from_yaml(yaml.safe_dump(key["recipe"], sort_keys=False), source=str(work_dir(out) / "run.json"))


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


def _stage_dir(work: Path, index: int, stage: Stage) -> Path:
    return work / "stages" / f"{index + 1:02d}-{stage.config.kind}"


def _checkpoint(work: Path, index: int, stage: Stage, model: nn.Module, res: StageResult, before: Measurement) -> StageResult:
    """Write the stage's model and stage.json into a temp folder, rename it into place. The stage's file
    size becomes the bytes of its model files on disk (``before``: what its ratios compare against)."""
    n = index + 1
    final = _stage_dir(work, index, stage)
    tmp = temp_dir(final)
    try:
        (tmp / "model").mkdir()
        write_model_files(model, tmp / "model", recipe=stage.to_dict())
        kill_point(f"stage{n}:model-written")
        m = dataclasses.replace(res.measurement, file_bytes=folder_bytes(tmp / "model"))
        res = dataclasses.replace(res, measurement=m, vs_previous=compare(before, m))
        write_atomic(tmp / "stage.json", json.dumps(res.to_dict(), indent=1, default=str), point=f"stage{n}:stage-json")
        kill_point(f"stage{n}:before-commit")
        if final.exists():  # without stage.json (else it was resumed from): not a finished checkpoint
            shutil.rmtree(final)
        commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kill_point(f"stage{n}:committed")
    return res


def _finished(work: Path | None, recipe: Recipe) -> list[StageResult]:
    """The results of the leading stages an interrupted run finished (each has its stage.json)."""
    done: list[StageResult] = []
    for i, stage in enumerate(recipe.stages):
        path = _stage_dir(work, i, stage) / "stage.json" if work is not None else None
        if path is None or not path.is_file():
            break
        done.append(StageResult.from_dict(json.loads(path.read_text())))
    return done


def _resumed_model(work: Path, index: int, stage: Stage, original: nn.Module) -> nn.Module:
    """The model of a finished stage, rebuilt on a copy of the model the user named (the architecture
    of a ``pkg.module:factory`` model is never read from a file)."""
    return load(_stage_dir(work, index, stage) / "model", model=copy.deepcopy(original))


def compress(
    model: str | nn.Module,
    recipe: Recipe | None,
    out: str | Path | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    threads: int | None = None,
    task: Task | None = None,
    data: DataSpec | str | None = None,
    input_shape: list[int] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    trust_code: bool = False,
) -> RunResult:
    """Run ``recipe`` on ``model``. The data: ``task``, else ``data`` (``--data``: see recipe/userdata.py),
    else the recipe's ``data:`` block, else the zoo model's own, else none (quality is then agreement with
    the original on random inputs, and stages that train are refused before any work)."""
    spec = model if isinstance(model, str) else state.get(model, "source", type(model).__name__)
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.name in ("", ".", ".."):
        out_path = Path(os.path.abspath(out_path))  # `--out .`: the folder's own name, beside which .partial goes
        if not out_path.name:
            raise ConfigError(f"--out {out} is the file system root; give a folder to create")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r}: must be a whole number >= 1 (or None for torch's default)")
    if resume and out_path is None:
        raise ConfigError("resume needs the output folder of the interrupted run")
    if out_path is not None:
        check_output(out_path, str(spec), force=force, resume=resume)
    if recipe is None:
        if not resume or out_path is None:
            raise ConfigError("a recipe is required (a YAML file or a built-in name)")
        recipe = _resume_recipe(out_path)
    key = _run_key(str(spec), recipe, seed)
    action = plan_work(out_path, key, force=force, resume=resume) if out_path is not None else ""
    original = load_model(model, trust_code=trust_code) if isinstance(model, str) else model
    original.eval()
    if input_shape:
        state.put(original, input={"shape": list(input_shape), "dtype": "float32"})
    task = task or _task(original, data, recipe)
    run_model(original, task.inputs)  # a wrong input fails here, before any work
    for i, stage in enumerate(recipe.stages):  # so does a misspelled layer name, or training without data
        check_names(original, stage.select)
        kind = f"stage {i + 1} ({stage.config.kind})"
        if stage.finetune is not None and stage.finetune.epochs > 0:
            task.require_train(f"{kind} fine-tunes: it")
        elif stage.config.family == "distill" or trains(stage.config):
            task.require_train(f"{kind} trains: it")
        if stage.config.kind == "int8-static":  # it traces the model with torch.fx: a transformer does not trace,
            from torchshrink.quant.static import fx_trace  # and finding out after the earlier stages' training

            try:
                fx_trace(original)
            except UnsupportedLayerError as e:
                raise UnsupportedLayerError(f"{kind}: {e}") from None
    for warning in order_warnings(recipe):
        log.warning("%s", warning)
    kill_point("validated")
    work, created = None, None  # created: the work folder this process made (removed again on a write error)
    if out_path is not None:
        created = None if action == "resume" else work_dir(out_path)
        with writing(out_path, created):
            work = start_work(out_path, key, recipe.to_yaml(), action)
    base = measure(original, task.inputs, latency=False, evaluate=lambda m: task.evaluate(m, original), name="original")
    current, prev_meas = original, base
    writer = _tensorboard(work)
    stages = _finished(work, recipe)
    resumed_from = len(stages)
    if work is not None and stages:
        current = _resumed_model(work, resumed_from - 1, recipe.stages[resumed_from - 1], original)
        prev_meas = stages[-1].measurement
    kept: list[str] = []  # variants kept because the whole model timed faster
    with stage_errors(out_path, created, stages):
        current, prev_meas = _run_stages(recipe, resumed_from, current, prev_meas, stages, kept, task, original,
                                         threads, seed, progress, work, out_path, created, writer)
    if writer is not None:
        writer.close()
    if progress:
        progress("final timing", 0, 1)
    lo, lf = _timed_pair(original, current, task, threads)
    kill_point("final:timed")
    before = dataclasses.replace(base, latency=lo)
    final = dataclasses.replace(stages[-1].measurement if stages else base, latency=lf)
    note = (f"latency: batch {task.inputs[0].shape[0]}, {lo.threads} thread(s), original and final timed "
            f"interleaved in one run, median of {lo.runs} runs after warm-up")
    result = RunResult(current, before, final, stages, compare(before, final), out_path, note, task.primary, resumed_from,
                       dict(task.provenance), [*kept, *run_warnings(stages, before, final, task)])
    if work is not None and out_path is not None:
        with writing(out_path, created):
            _finish(result, recipe, str(spec), work, out_path)
    return result


def _run_stages(recipe: Recipe, resumed_from: int, current: nn.Module, prev_meas: Any, stages: list[StageResult],
                kept: list[str], task: Task, original: nn.Module, threads: int | None, seed: int, progress: Any,
                work: Path | None, out_path: Path | None, created: Path | None, writer: Any) -> tuple[nn.Module, Any]:
    for i, stage in enumerate(recipe.stages[resumed_from:], start=resumed_from):
        label = f"{i + 1}/{len(recipe.stages)} {stage.config.kind}"
        if progress:
            progress(label, i, len(recipe.stages))
        t0 = time.perf_counter()
        new, history = run_stage(current, stage, task, progress, seed=seed * 1000 + i)
        seconds = time.perf_counter() - t0
        m = measure(new, task.inputs, latency=False, evaluate=lambda mm: task.evaluate(mm, original), name=label)
        la, lb = _timed_pair(current, new, task, threads)
        new, lb, why = faster_variant(new, la, lb, lambda x, y: _timed_pair(x, y, task, threads), label)
        if why:
            kept.append(why)
            m = measure(new, task.inputs, latency=False, evaluate=lambda mm: task.evaluate(mm, original), name=label)
        kill_point(f"stage{i + 1}:trained")
        m = dataclasses.replace(m, latency=lb)
        before = dataclasses.replace(prev_meas, latency=la)
        res = StageResult(label, stage.config.kind, m, compare(before, m), seconds, history)
        if work is not None and out_path is not None:
            with writing(out_path, created):
                res = _checkpoint(work, i, stage, new, res, before)
        stages.append(res)
        _log_stage(writer, i, res)
        current, prev_meas = new, res.measurement
        if progress:
            progress(label, i + 1, len(recipe.stages))
    return current, prev_meas


def _task(model: nn.Module, data: DataSpec | str | None, recipe: Recipe) -> Task:
    if data is not None:
        return task_from_data(data if isinstance(data, DataSpec) else DataSpec.from_dict(data, "--data"), model)
    if recipe.data is not None:
        return task_from_data(DataSpec(**recipe.data), model, from_file=True)
    return task_for(model)


def _finish(result: RunResult, recipe: Recipe, spec: str, work: Path, out: Path) -> None:
    """Write the final model and the reports into the work folder, then rename it to ``out`` (the commit).
    The reported final file size is the bytes of the model files as written."""
    final_model = work / "model"
    tmp = temp_dir(final_model)
    try:
        write_model_files(result.model, tmp, recipe=recipe.to_dict())
        kill_point("finish:model-tmp")
        if final_model.exists():  # from a finish step that was killed
            shutil.rmtree(final_model)
        commit(tmp, final_model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.final = dataclasses.replace(result.final, file_bytes=folder_bytes(final_model))
    result.summary = compare(result.original, result.final)
    kill_point("finish:model-written")
    report = result.to_dict(recipe, spec)
    write_atomic(work / "report.json", json.dumps(report, indent=1, default=str), point="finish:report-json")
    write_atomic(work / "report.md", report_markdown(report))
    write_atomic(work / "report.html", report_html(report))
    kill_point("finish:before-rename")
    commit_run(work, out)
    kill_point("finish:renamed")
