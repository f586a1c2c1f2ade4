"""``torchshrink.deploy``: build every precision x runtime candidate of a model, check each one's quality
on held-out data against a budget, time them all interleaved on this machine, and write the fastest one
that passes, with how to load it and the whole table."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core.data import Batch, as_batch
from torchshrink.core.errors import ConfigError, DataError, OutputExistsError, TorchshrinkError
from torchshrink.deploy.candidates import AS_GIVEN, RUNTIMES, Candidate, Settings, build_all, one_line
from torchshrink.measure.counts import run_model
from torchshrink.measure.latency import Timing, time_interleaved
from torchshrink.measure.latency import threads as pinned
from torchshrink.measure.machine import machine_info
from torchshrink.measure.quality import cosine_rows, fidelity, main_output
from torchshrink.recipe.task import Task, task_for

MIN_SECONDS = 2.0
# each candidate's turn is BURST calls back to back, the ones after the first timed: the latency of a model serving
# requests one after another, rather than of a call made right after every other candidate ran. MiniLM 16 x 128 on
# 2 cores, first run: OpenVINO bf16 167 ms single vs 143 ms back to back, torchshrink's INT8 66 vs 64; later runs
# moved either way by up to ~10% (benchmarks/results/deploy.md records both timings)
BURST = 3


class DeployError(TorchshrinkError):
    """No candidate met the quality budget, or the written artifact did not reproduce its candidate."""


@dataclasses.dataclass
class DeployResult:
    candidates: list[Candidate]
    winner: Candidate
    baseline: Candidate  # the model as given, in torch eager
    reference: Timing | None  # the reference (original) model in torch eager, timed in the same run
    budget: str  # the quality rule every candidate was held to
    provenance: dict[str, str]
    machine: dict[str, Any]
    example: list[list[int]]  # the shapes timed
    threads: int
    out: Path | None = None
    files: list[str] = dataclasses.field(default_factory=list)
    architecture: str | None = None  # the user's class the written torch folder loads into (None: rebuilt alone)

    @property
    def module(self) -> nn.Module:
        """The chosen candidate, callable like the model (tensors in, tensor out)."""
        assert self.winner.module is not None
        return self.winner.module

    def speedup(self, c: Candidate, over: Timing | None = None) -> float | None:
        base = over or self.baseline.timing
        return base.p50_ms / c.timing.p50_ms if base and c.timing else None

    def snippet(self) -> str:
        text = self.winner.snippet.format(dir=str(self.out) if self.out else "OUT")
        if self.architecture:  # torchshrink cannot build the user's class from the folder: their code gives it
            load = f"ts.load('{self.out if self.out else 'OUT'}/model')"
            text = text.replace(load, f"{load[:-1]}, model={self.architecture}(...))  # {self.architecture}: your "
                                      "class, built as you built the model you deployed; the folder holds its weights "
                                      "and every change")
        return text

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for c in self.candidates:
            out.append({"runtime": c.runtime, "precision": c.precision, "status": c.status,
                        "p50_ms": c.timing.p50_ms if c.timing else None,
                        "p90_ms": c.timing.p90_ms if c.timing else None,
                        "speedup_vs_given": self.speedup(c),
                        "speedup_vs_reference": self.speedup(c, self.reference) if self.reference else None,
                        "quality": c.quality, "build_s": round(c.build_s, 2), "chosen": c is self.winner})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.winner.name, "budget": self.budget, "threads": self.threads, "example": self.example,
                "machine": self.machine, "provenance": self.provenance,
                "reference_p50_ms": self.reference.p50_ms if self.reference else None,
                "candidates": self.rows(), "files": self.files, "snippet": self.snippet()}


def _task(model: nn.Module, example: tuple[torch.Tensor, ...] | None, data: Any) -> Task:
    if data is None:
        return task_for(model, example)
    if isinstance(data, str | Path):
        from torchshrink.recipe.userdata import DataSpec, task_from_data

        return task_from_data(DataSpec.from_dict(str(data), "data"), model)
    if dataclasses.is_dataclass(data) and type(data).__name__ == "DataSpec":
        from torchshrink.recipe.userdata import task_from_data

        return task_from_data(data, model)
    batches = [as_batch(b) for b in data]  # held-out input batches given in Python
    if not batches:
        raise DataError("deploy was given empty data; give held-out input batches (or leave data out)")
    inputs = example or batches[0].inputs
    n = sum(b.size for b in batches)
    return Task(name="given", inputs=tuple(inputs), calibration=batches[:4],
                quality=lambda m, ref: {k: v for k, v in fidelity(m, ref, [b.inputs for b in batches]).items()
                                        if k.startswith("cosine")},
                primary="cosine_mean",
                provenance={"quality": f"output cosine vs the reference on the {n} samples given as data "
                                       f"({len(batches)} batches)",
                            "calibration": f"the first {min(4, len(batches))} of those batches"})


def _judge(task: Task, reference: nn.Module, min_cosine: float, max_drop: float) -> tuple[str, Any]:
    key = task.primary
    if any(w in key for w in ("cosine", "agreement")):
        return f"{key} >= {min_cosine}", lambda q: q.get(key, -1.0) >= min_cosine
    ref = task.evaluate(reference, reference)[key]
    return (f"{key} >= {ref - max_drop:.4f} (the reference's {ref:.4f} minus {max_drop})",
            lambda q: q.get(key, -1.0) >= ref - max_drop)


def _check_args(runtimes: Sequence[str], min_cosine: float, max_drop: float, out: Path | None, force: bool) -> None:
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or not runtimes:
        raise ConfigError(f"runtime {bad[0] if bad else '(none)'!r} is not one deploy knows; allowed: {', '.join(RUNTIMES)}")
    if not 0.0 < min_cosine <= 1.0:
        raise ConfigError(f"min_cosine={min_cosine}: must be in (0, 1]")
    if not 0.0 <= max_drop < 1.0:
        raise ConfigError(f"max_drop={max_drop}: must be in [0, 1) (a fraction: 0.005 is half a point of accuracy)")
    check_out(out, force)


def check_out(out: Path | None, force: bool) -> None:
    """``out`` is new or empty, or (with ``force``) a folder an earlier deploy wrote; else one line."""
    if out is not None and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
        if not force:
            raise OutputExistsError(f"output {out} already exists and is not empty; choose a new path or pass "
                                    "force=True (--force)")
        if not (out / "deploy.json").is_file():  # force replaces a deploy output, never a folder of the user's
            raise OutputExistsError(f"output {out} was not written by torchshrink deploy (no deploy.json); --force "
                                    "replaces only a deploy output: choose another folder")


def deploy(model: nn.Module, example: Sequence[torch.Tensor] | None = None, *, data: Any = None,
           reference: nn.Module | None = None, out: str | Path | None = None, force: bool = False,
           min_cosine: float = 0.995, max_drop: float = 0.005, threads: int | None = None,
           runtimes: Sequence[str] = RUNTIMES, compile: bool = True, runs: int = 10, warmup: int = 3) -> DeployResult:
    """Choose, by measurement on this machine, the fastest way to run ``model`` whose quality stays in budget.

    ``example``: the inputs to time (default: the model's own / the task's); ``data``: held-out data for the
    quality check (a ``--data`` path, a DataSpec, or batches), default the task torchshrink knows for the model
    (random inputs, labelled as such, where it knows none); ``reference``: what quality is measured against
    (default the model itself; pass the original to hold a compressed model to the original). Similarity
    tasks need ``min_cosine``; accuracy tasks allow ``max_drop`` below the reference. ``out``: a folder for
    the chosen artifact, ``deploy.md`` and ``deploy.json``, written atomically."""
    out_path = Path(out) if out is not None else None
    _check_args(runtimes, min_cosine, max_drop, out_path, force)
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise ConfigError(f"{type(model).__name__} is a causal language model: deploy it with "
                          "torchshrink.deploy.deploy_lm(model, tokenizer) (generation timed, perplexity as the quality; "
                          "`torchshrink deploy -m` routes a language model there)")
    model = model.eval()
    ref = (reference if reference is not None else model).eval()
    task = _task(model, tuple(example) if example is not None else None, data)
    ex = tuple(example) if example is not None else tuple(task.inputs)
    run_model(model, ex)  # an input that does not fit the model is one InputShapeError line, before any candidate
    n = threads or torch.get_num_threads()
    budget, passes = _judge(task, ref, min_cosine, max_drop)
    calib = [as_batch(b) for b in (task.calibration or [])] or [Batch(ex)]  # ex: inputs, never (inputs, labels)
    with tempfile.TemporaryDirectory(prefix="torchshrink-deploy-") as scratch, pinned(n), torch.inference_mode():
        cands = build_all(model, ex, [b.inputs for b in calib], calib,
                          Settings(threads=n, runtimes=tuple(runtimes), compile=compile, scratch=Path(scratch)))
        for c in cands:
            if c.ok:
                try:
                    c.quality = task.evaluate(c.module, ref)
                    c.status = "passed" if passes(c.quality) else "below budget"
                except Exception as e:  # a runtime that cannot run this model is a row, not an error
                    c.status = f"failed: {one_line(e)}"
        timed = {c.name: c.module for c in cands if c.status == "passed" or (c.runtime, c.precision) == ("torch", AS_GIVEN)}
        if reference is not None:
            timed["reference"] = ref
        # at least MIN_SECONDS of rounds: a model of microseconds gets hundreds of runs, not ten
        times = time_interleaved(timed, ex, n_threads=n, warmup=warmup, runs=runs, min_seconds=MIN_SECONDS,
                                 burst=BURST)
        for c in cands:
            c.timing = times.get(c.name) if c.name in timed else None
        passed = [c for c in cands if c.status == "passed"]
        given = next(c for c in cands if (c.runtime, c.precision) == ("torch", AS_GIVEN))
        if given.status.startswith("failed"):  # the model itself could not be judged: say why, not "below budget"
            raise DeployError(f"the quality check could not run on the model as given: {given.status[len('failed: '):]}")
        if not passed:
            raise DeployError(f"no candidate met the quality budget ({budget}); loosen it (--min-cosine / --max-drop) "
                              "or check the model")
        ranked = sorted(passed, key=lambda c: c.timing.p50_ms)
        result = DeployResult(cands, ranked[0], given, times.get("reference"), budget, dict(task.provenance),
                              machine_info(), [list(t.shape) for t in ex], n)
        if out_path is not None:
            _write_fastest(result, ranked, out_path, ex)
    return result


def _write_fastest(result: DeployResult, ranked: list[Candidate], out: Path, ex: tuple[torch.Tensor, ...]) -> None:
    """Write the fastest candidate that can be written: one whose artifact cannot be saved or does not reproduce
    (a graph calling a function torchshrink does not save, say) keeps its row, marked, and the next one is tried."""
    from torchshrink.deploy.report import write_output

    for c in ranked:
        result.winner = c
        try:
            write_output(result, out, ex)
            return
        except (OutputExistsError, KeyboardInterrupt):
            raise
        except Exception as e:
            c.status = f"passed; not written: {one_line(e)}"
    raise DeployError(f"no candidate that passed could be written; the fastest, {ranked[0].name}: "
                      f"{ranked[0].status.removeprefix('passed; not written: ')}")


def outputs_match(a: Any, b: Any) -> float:
    """Cosine of two models' main outputs (flattened)."""
    return float(cosine_rows(main_output(a).float().reshape(1, -1), main_output(b).float().reshape(1, -1))[0])


__all__ = ["DeployError", "DeployResult", "deploy", "outputs_match"]
