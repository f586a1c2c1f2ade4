"""The ``distill`` config kind: build a student from the model (or take a given one) and, if
``epochs > 0``, distill the teacher into it. In a recipe the stage's model is the teacher; with
``finetune: {...}`` and ``recovery: distill`` the runner trains the student against it."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Literal

from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.data import as_batches
from torchshrink.core.errors import ConfigError, DataError
from torchshrink.core.report import carry, current
from torchshrink.core.select import Select
from torchshrink.core.train import Finetune
from torchshrink.distill.distiller import Distiller, FeaturePair
from torchshrink.distill.losses import check_kd_settings
from torchshrink.distill.self_distill import reinitialize
from torchshrink.distill.students import as_student, drop_layers, shrink_width

log = logging.getLogger(__name__)


def _apply(
    model: nn.Module,
    config: DistillConfig,
    *,
    select: Select | None = None,
    data: Any = None,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    train_data: Any = None,
    example: Any = None,
    evaluate: Any = None,
    **_: Any,
) -> nn.Module:
    """``teacher=`` given: ``model`` is the student. Otherwise ``model`` is the teacher and the
    student is built as ``config.student`` says (or taken from ``student=``)."""
    if select is not None:
        log.warning("distill ignores `select`; name feature taps with `features` instead")
    if teacher is not None:
        the_teacher, the_student = teacher, as_student(model, teacher)
    else:
        the_teacher = model
        the_student = _build_student(model, config, student, example if example is not None else data)
    carry(model, the_student)  # the student's report is this kind's
    if config.epochs > 0:
        batches = train_data if train_data is not None else data
        if batches is None:
            raise DataError("distill with epochs > 0 needs data: pass data=[batches] or train_data=loader")
        d = Distiller(
            the_teacher, the_student, temperature=config.temperature, alpha=config.alpha,
            output_loss=config.output_loss, output_weight=config.output_weight,
            features=[FeaturePair.parse(f, config.feature_loss, config.feature_weight) for f in config.features],
            cache=config.cache_teacher,
        )
        settings = Finetune(epochs=config.epochs, lr=config.lr, seed=config.seed,
                            temperature=config.temperature, alpha=config.alpha)
        history = d.fit(batches, settings, evaluate=evaluate)
        current(the_student).notes["history"] = history
    return the_student.eval()


def _first_inputs(data: Any) -> tuple[Any, ...] | None:
    first = next(as_batches(data, limit=1), None)
    return first.inputs if first is not None else None


def _build_student(teacher: nn.Module, config: DistillConfig, given: nn.Module | None, example: Any) -> nn.Module:
    if config.student == "given":
        if given is None:
            raise ConfigError("student='given' needs the student module: distill(teacher, cfg, student=my_module)")
        return as_student(given, teacher)
    if given is not None:
        raise ConfigError(f"a student module was passed but student={config.student!r}; use student='given'")
    if config.student == "layers":
        keep: Any = list(config.keep) if config.keep else config.keep_rule
        return drop_layers(teacher, keep)
    if config.student == "copy":
        return reinitialize(copy.deepcopy(teacher), seed=config.seed)
    inputs = _first_inputs(example)
    if inputs is None:
        from torchshrink.models import example_inputs

        try:
            inputs = example_inputs(teacher)
        except Exception:
            raise DataError("student='width' needs an example input: pass data=[batch] or example=tensor") from None
    return shrink_width(teacher, config.width, inputs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """Knowledge distillation from a teacher into a student.

    - ``student``: ``width`` (chain CNN/MLP with hidden widths x ``width``, fresh weights),
      ``layers`` (transformer with the ``keep`` layers or ``keep_rule``, weights from the teacher),
      ``copy`` (same architecture, re-initialized: born-again), ``given`` (pass ``student=``).
    - loss: ``output_weight * output_loss + feature_weight * sum(feature losses)``, with
      ``features`` as ``"student_module=teacher_module"`` strings.
    - ``epochs`` > 0 trains here on ``data`` / ``train_data``; 0 only builds the student (in a
      recipe, ``finetune:`` with ``recovery: distill`` trains it against the stage's model).
    """

    kind = "distill"
    family = "distill"

    student: Literal["width", "layers", "copy", "given"] = "width"
    width: float = 0.5
    keep: tuple[int, ...] = ()
    keep_rule: Literal["every_other", "every_other_last", "spread"] = "every_other"
    temperature: float = 4.0
    alpha: float = 0.7
    output_loss: Literal["kd", "mse", "cosine", "none"] = "kd"
    output_weight: float = 1.0
    features: tuple[str, ...] = ()
    feature_loss: Literal["hint", "attention", "cosine"] = "hint"
    feature_weight: float = 1.0
    epochs: int = 0
    lr: float = 1e-3
    seed: int = 0
    cache_teacher: bool = False

    def validate(self) -> None:
        check_kd_settings(self.temperature, self.alpha)
        check_range("distill.width", self.width, 0, 1, lo_open=True)
        check_range("distill.epochs", self.epochs, 0, 100_000)
        check_range("distill.lr", self.lr, 0, 10, lo_open=True)
        check_range("distill.output_weight", self.output_weight, 0, 1e6)
        check_range("distill.feature_weight", self.feature_weight, 0, 1e6)
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in self.keep):
            raise ConfigError(f"distill.keep={list(self.keep)!r} must be non-negative layer indices")
        for f in self.features:
            if not isinstance(f, str):
                raise ConfigError(f"distill.features entries must be 'student_module=teacher_module' strings, got {f!r}")
            FeaturePair.parse(f)
        if self.output_loss == "none" and not self.features:
            raise ConfigError("distill.output_loss='none' needs `features`, or nothing is distilled")


register(DistillConfig, _apply)
