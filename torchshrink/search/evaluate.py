"""Evaluating one point of the search space: build its recipe, run it (with the recipe's own
fine-tuning), and measure the real file size, the task quality and the predicted latency."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from torchshrink.export.io import saved_bytes
from torchshrink.recipe.recipe import Finetune, Recipe
from torchshrink.recipe.runner import run_stage
from torchshrink.recipe.task import Task
from torchshrink.search.budget import Budget
from torchshrink.search.profile import LayerProfile
from torchshrink.search.space import FLOAT, SearchSpace, assignment_to_recipe, describe

log = logging.getLogger(__name__)


def quality_keys(task: Task) -> tuple[str, str]:
    """(search key, report key): validation data steers the search where the task has it, held-out data
    reports it."""
    return task.steer_key, task.primary


@dataclasses.dataclass
class Point:
    """One evaluated assignment. Quality is in percent (accuracy x 100, or cosine x 100)."""

    assignment: dict[str, str]
    size_bytes: int
    size_ratio: float
    latency_ratio: float  # predicted by the layer profile
    quality: float  # on validation data (what the search sees)
    test_quality: float  # on held-out data
    quality_drop: float  # base validation quality - quality, in pp
    violations: dict[str, float]
    source: str = ""
    number: int = -1

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.violations.values())

    @property
    def total_violation(self) -> float:
        return sum(self.violations.values())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "feasible": self.feasible, "summary": describe(self.assignment)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Evaluator:
    """Runs ``assignment -> recipe -> compressed model`` and measures it (see :class:`Point`)."""

    def __init__(self, model: nn.Module, task: Task, space: SearchSpace, profile: LayerProfile, budget: Budget,
                 finetune: Finetune | None = None, seed: int = 0) -> None:
        self.model, self.task, self.space, self.profile, self.budget = model.eval(), task, space, profile, budget
        self.finetune, self.seed = finetune, seed
        self.val_key, self.test_key = quality_keys(task)
        base = task.evaluate(self.model, self.model)
        self.base_quality = 100.0 * base[self.val_key]
        self.base_test_quality = 100.0 * base[self.test_key]
        self.base_bytes = profile.model_bytes

    def recipe(self, assignment: Mapping[str, str], name: str = "searched") -> Recipe:
        return assignment_to_recipe(self.space, assignment, name=name, finetune=self.finetune)

    def compress(self, assignment: Mapping[str, str]) -> nn.Module:
        current = self.model
        if all(v == FLOAT for v in assignment.values()):
            return current
        for i, stage in enumerate(self.recipe(assignment).stages):
            current, _ = run_stage(current, stage, self.task, seed=self.seed * 1000 + i)
        return current

    def __call__(self, assignment: Mapping[str, str], source: str = "") -> Point:
        assignment = {layer: assignment.get(layer, FLOAT) for layer in self.space.layers}
        model = self.compress(assignment)
        q = self.task.evaluate(model, self.model)
        size = saved_bytes(model)
        lat = self.profile.predict_latency_ratio(assignment)
        quality = 100.0 * q[self.val_key]
        raw = {"size_bytes": size, "latency_ratio": lat, "accuracy_drop": self.base_quality - quality}
        point = Point(assignment, size, size / self.base_bytes, lat, quality, 100.0 * q[self.test_key],
                      self.base_quality - quality, self.budget.violations(raw, self.base_bytes), source)
        log.info("%s: %s -> %.3fx size, %.3fx latency, quality %.2f", source, describe(assignment),
                 point.size_ratio, lat, quality)
        return point
