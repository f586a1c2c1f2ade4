"""Multi-objective search over per-layer settings with Optuna (NSGA-II or TPE) or the greedy
baseline, under a budget. Trials live in an Optuna storage (SQLite file by default; any RDB URL,
e.g. PostgreSQL, works the same), so a killed search resumes without repeating finished trials and
several worker processes can share one study."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import warnings
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from torchshrink.core.errors import ConfigError, TorchshrinkError
from torchshrink.recipe.recipe import Finetune, Recipe
from torchshrink.recipe.task import Task, task_for
from torchshrink.search.budget import Budget, parse_budget
from torchshrink.search.evaluate import Evaluator, Point
from torchshrink.search.greedy import greedy, static_infeasibility
from torchshrink.search.profile import LayerProfile, profile_layers
from torchshrink.search.space import FLOAT, SearchSpace, build_space, describe

log = logging.getLogger(__name__)
Method = Literal["nsga2", "tpe", "greedy"]
Progress = Callable[[str, int, int], None]


class InfeasibleBudgetError(TorchshrinkError):
    """No point found meets the budget; the message names the constraint and the closest point."""


@dataclasses.dataclass
class SearchResult:
    chosen: Point
    recipe: Recipe
    feasible: bool
    message: str
    points: list[Point]
    pareto: list[Point]
    base_quality: float
    base_test_quality: float
    base_bytes: int
    budget: Budget
    profile: LayerProfile

    def require_feasible(self) -> SearchResult:
        if not self.feasible:
            raise InfeasibleBudgetError(self.message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"feasible": self.feasible, "message": self.message, "chosen": self.chosen.to_dict(),
                "recipe": self.recipe.to_dict(), "budget": self.budget.to_dict(), "base_quality": self.base_quality,
                "base_test_quality": self.base_test_quality, "base_bytes": self.base_bytes,
                "pareto": [p.to_dict() for p in self.pareto], "trials": [p.to_dict() for p in self.points]}


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("the search needs Optuna: pip install 'torchshrink[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(url: str | None) -> Any:
    """An Optuna RDB storage with heartbeats, so trials of a killed process are marked failed."""
    optuna = _optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    kwargs: dict[str, Any] = {"heartbeat_interval": 5, "grace_period": 20}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are marked experimental
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # sqlalchemy's errors: bad URL, unreachable server
            raise ConfigError(f"cannot open the search storage {url!r}: {str(e).splitlines()[0]}; "
                              "use e.g. sqlite:///search.db or postgresql://user@host/db") from None


def pareto_front(points: list[Point]) -> list[Point]:
    """Points not dominated on (size, predicted latency, -quality)."""
    def key(p: Point) -> tuple[float, float, float]:
        return (p.size_bytes, p.latency_ratio, -p.quality)

    front = []
    for p in points:
        kp = key(p)
        dominated = any(all(a <= b for a, b in zip(key(q), kp, strict=True)) and key(q) != kp for q in points)
        if not dominated and all(key(f) != kp for f in front):
            front.append(p)
    return sorted(front, key=lambda p: p.size_bytes)


def choose(points: list[Point]) -> tuple[Point, bool]:
    """Best feasible point (highest quality, then smallest); else the closest to feasible."""
    feas = [p for p in points if p.feasible]
    if feas:
        return max(feas, key=lambda p: (round(p.quality, 6), -p.size_bytes)), True
    return min(points, key=lambda p: (p.total_violation, -p.quality)), False


def _sampler(method: str, seed: int, n_layers: int) -> Any:
    optuna = _optuna()
    # the budget reaches the samplers through trial.set_constraint (constraint-dominance in NSGA-II,
    # feasibility-aware TPE)
    if method == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, 2 * n_layers)))
    if method == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    raise ConfigError(f"search method {method!r} is not known; allowed: 'nsga2', 'tpe', 'greedy'")


def _objective(evaluator: Evaluator, space: SearchSpace) -> Callable[[Any], tuple[float, float, float]]:
    optuna = _optuna()

    def objective(trial: Any) -> tuple[float, float, float]:
        assign = {layer: trial.suggest_categorical(layer, space.labels(layer)) for layer in space.layers}
        # a sampler may propose a point that was already run: reuse its measurements
        for old in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if old.params == assign and "point" in old.user_attrs:
                point = Point.from_dict(old.user_attrs["point"])
                break
        else:
            point = evaluator(assign, source=trial.user_attrs.get("source", "optuna"))
        trial.set_user_attr("point", point.to_dict())
        for key, value in point.violations.items():
            trial.set_constraint(key, float(value))
        return float(point.size_bytes), float(point.latency_ratio), float(point.quality)

    return objective


def _points(study: Any) -> list[Point]:
    optuna = _optuna()
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "point" in t.user_attrs:
            p = Point.from_dict(t.user_attrs["point"])
            p.number = t.number
            out.append(p)
    return out


def _optimize(study: Any, evaluator: Evaluator, space: SearchSpace, n_trials: int, progress: Progress | None) -> None:
    optuna = _optuna()
    complete = (optuna.trial.TrialState.COMPLETE,)

    def cb(study: Any, trial: Any) -> None:
        if progress:
            progress("search trials", len(study.get_trials(deepcopy=False, states=complete)), n_trials)

    if len(study.get_trials(deepcopy=False, states=complete)) >= n_trials:
        return
    cb(study, None)
    study.optimize(_objective(evaluator, space), n_trials=n_trials,
                   callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=complete), cb])


def _worker(model: nn.Module, budget: Budget, profile: LayerProfile, space: SearchSpace, finetune: Finetune | None,
            method: str, n_trials: int, storage: str, study_name: str, seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    optuna = _optuna()
    task = task_for(model)
    evaluator = Evaluator(model, task, space, profile, budget, finetune, seed)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage),
                              sampler=_sampler(method, seed + 7919 * (mp.current_process().pid or 1), len(space.layers)))
    _optimize(study, evaluator, space, n_trials, None)


def search(
    model: nn.Module,
    budget: Budget | str,
    *,
    task: Task | None = None,
    method: Method = "nsga2",
    n_trials: int = 30,
    storage: str | None = None,
    study_name: str = "torchshrink-search",
    finetune: Finetune | None = None,
    allowed: list[str] | None = None,
    min_params: int = 0,
    workers: int = 1,
    seed: int = 0,
    threads: int = 1,
    profile: LayerProfile | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Find per-layer settings for ``model`` under ``budget``.

    ``method``: ``nsga2`` / ``tpe`` (Optuna, multi-objective: file bytes, predicted latency ratio,
    validation quality, with the budget as constraints; the greedy point is enqueued first) or
    ``greedy`` (sensitivity table only, one evaluation). ``storage`` is an Optuna RDB URL (e.g.
    ``sqlite:///search.db``); the same ``study_name`` resumes. ``workers`` > 1 runs extra processes
    on the same storage (needs an RDB storage and a model whose task ``task_for`` can rebuild).
    """
    budget = parse_budget(budget)
    if budget.is_empty():
        raise ConfigError("the budget has no constraint; example: --max-size 0.25x --max-accuracy-drop 1.0")
    model = model.eval()
    task = task or task_for(model)
    if finetune is not None and task.train is None:
        log.warning("task %r has no training data: trials run without fine-tuning", task.name)
        finetune = None
    space = build_space(model, allowed=allowed, min_params=min_params)
    val_key = task.steer_key

    def val_quality(m: nn.Module) -> float:
        return 100.0 * task.evaluate(m, model)[val_key]

    profile = profile or profile_layers(model, space, task.inputs, data=task.calibration, quality=val_quality,
                                        n_threads=threads, progress=progress)
    space = space.without(profile.skipped)  # options that failed to apply are left out, with their reason
    evaluator = Evaluator(model, task, space, profile, budget, finetune, seed)
    problems = static_infeasibility(space, profile, budget)
    start = greedy(space, profile, budget)
    if problems:
        closest = evaluator(start, source="greedy")
        raise InfeasibleBudgetError(f"budget {budget.describe(profile.model_bytes)} is infeasible: {'; '.join(problems)}. "
                                    f"Closest point: {describe(start)} ({closest.size_ratio:.3f}x size, "
                                    f"{closest.latency_ratio:.3f}x latency, quality drop {closest.quality_drop:.2f} pp)")
    if method == "greedy":
        points = [evaluator(start, source="greedy")]
    else:
        optuna = _optuna()
        if workers > 1 and storage is None:
            raise ConfigError("workers > 1 need a shared storage URL, e.g. sqlite:///search.db")
        study = optuna.create_study(study_name=study_name, storage=open_storage(storage), load_if_exists=True,
                                    directions=["minimize", "minimize", "maximize"],
                                    sampler=_sampler(method, seed, len(space.layers)))
        if not study.get_trials(deepcopy=False):
            study.set_user_attr("budget", budget.to_dict())
            study.enqueue_trial(start, user_attrs={"source": "greedy"})
            for label in sorted({o.label for layer in space.layers for o in space.options[layer]} - {FLOAT}):
                uniform = {layer: label if label in space.labels(layer) else FLOAT for layer in space.layers}
                if uniform != start:  # every uniform setting is tried too: the search never ends below one
                    study.enqueue_trial(uniform, user_attrs={"source": f"uniform {label}"})
        procs = []
        if workers > 1:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_worker, args=(model, budget, profile, space, finetune, method, n_trials,
                                                       storage, study_name, seed + i + 1, threads)) for i in range(workers - 1)]
            for p in procs:
                p.start()
        try:
            _optimize(study, evaluator, space, n_trials, progress)
        finally:
            for p in procs:
                p.join()
        points = _points(study)
    chosen, feasible = choose(points)
    recipe = evaluator.recipe(chosen.assignment, name=f"searched-{method}")
    if feasible:
        message = (f"found {describe(chosen.assignment)}: {chosen.size_ratio:.3f}x size, {chosen.latency_ratio:.3f}x "
                   f"latency (predicted), quality drop {chosen.quality_drop:.2f} pp on "
                   f"{task.provenance.get('search') or task.provenance.get('quality', 'the task data')}")
    else:
        names = sorted({k for k, v in chosen.violations.items() if v > 0})
        message = (f"no point met the budget {budget.describe(profile.model_bytes)} in {len(points)} trial(s); "
                   f"constraint(s) not met: {', '.join(names)}. Closest point: {describe(chosen.assignment)} "
                   f"({chosen.size_ratio:.3f}x size, {chosen.latency_ratio:.3f}x latency, quality drop "
                   f"{chosen.quality_drop:.2f} pp); try more trials or a looser budget")
    return SearchResult(chosen, recipe, feasible, message, points, pareto_front(points), evaluator.base_quality,
                        evaluator.base_test_quality, evaluator.base_bytes, budget, profile)
