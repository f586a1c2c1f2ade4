"""The shared training loop of every technique that trains (QAT, gradual pruning, binary training,
distillation, recovery fine-tuning), its settings (:class:`Finetune`) and the recovery-loss registry.

It lives in core so that techniques and the orchestrators (recipe runner, DDP, search) share it
without a technique depending on an orchestrator.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.config import check_range
from torchshrink.core.data import Batch, as_batches
from torchshrink.core.errors import ConfigError, DataError, TorchshrinkError
from torchshrink.measure.quality import main_output

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Finetune:
    """Settings of the shared fine-tune loop."""

    epochs: int = 1
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    # distillation recovery: temperature and weight of the soft loss
    temperature: float = 4.0
    alpha: float = 0.7
    # "bf16": forward passes under torch.autocast (bfloat16 matmuls; fast on CPUs with AVX-512 BF16 / AMX),
    # weights, gradients and the optimizer stay float32
    autocast: Literal["none", "bf16"] = "none"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"finetune.{name}={getattr(self, name)!r} must be an integer")
        for name in ("lr", "weight_decay", "temperature", "alpha"):
            v = getattr(self, name)
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise ConfigError(f"finetune.{name}={v!r} must be a number") from None
                object.__setattr__(self, name, v)
        check_range("finetune.epochs", self.epochs, 0, 10_000)
        check_range("finetune.lr", self.lr, 0, 10, lo_open=True)
        check_range("finetune.batch_size", self.batch_size, 1, 1_000_000)
        check_range("finetune.temperature", self.temperature, 0, 1e4, lo_open=True)
        check_range("finetune.alpha", self.alpha, 0, 1)
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"finetune.optimizer={self.optimizer!r}; allowed: 'adam', 'adamw', 'sgd'")
        if self.autocast not in ("none", "bf16"):
            raise ConfigError(f"finetune.autocast={self.autocast!r}; allowed: 'none', 'bf16'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finetune:
        allowed = {f.name for f in dataclasses.fields(cls)}
        bad = [k for k in d if k not in allowed]
        if bad:
            close = difflib.get_close_matches(bad[0], sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown finetune field {bad[0]!r}{hint}; allowed: {', '.join(sorted(allowed))}")
        return cls(**d)


class TrainingError(TorchshrinkError):
    """Fine-tuning failed (e.g. the loss became NaN)."""


# loss(student, batch) -> scalar, for a core.data.Batch: batch(student) runs the model on the batch's
# positional and keyword inputs, batch.labels are its labels (or None)
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
# factory(teacher or None, settings) -> LossFn
RecoveryFactory = Callable[[nn.Module | None, Finetune], LossFn]
_RECOVERY: dict[str, RecoveryFactory] = {}


def register_recovery(name: str, factory: RecoveryFactory) -> None:
    _RECOVERY[name] = factory


def known_recoveries() -> list[str]:
    return sorted(_RECOVERY)


def recovery_loss(name: str, teacher: nn.Module | None, settings: Finetune) -> LossFn:
    if name not in known_recoveries():
        raise DataError(f"unknown recovery {name!r}; allowed: {', '.join(known_recoveries())}")
    return _RECOVERY[name](teacher, settings)


def as_loss(fn: Callable[..., torch.Tensor]) -> LossFn:
    """A loss as the loop calls it, ``fn(student, batch)``; a loss written ``fn(student, inputs, labels)``
    is adapted (it gets the positional inputs; batches with keyword inputs then raise one clear line)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return fn
    if len(params) != 3:
        return fn

    def adapted(student: nn.Module, b: Batch) -> torch.Tensor:
        if b.kwargs:
            raise DataError(f"this loss takes (student, inputs, labels) but the batches carry keyword inputs "
                            f"({', '.join(b.kwargs)}); write it as loss(student, batch) and run batch(student)")
        return fn(student, b.inputs, b.labels)

    return adapted


def _cross_entropy(teacher: nn.Module | None, settings: Finetune) -> LossFn:
    def loss(student: nn.Module, b: Batch) -> torch.Tensor:
        if b.labels is None:
            raise DataError("plain fine-tuning needs labelled data; this task has none (use recovery: distill)")
        return F.cross_entropy(main_output(b(student)), b.labels)

    return loss


register_recovery("finetune", _cross_entropy)


def make_optimizer(params: Iterable[nn.Parameter], s: Finetune) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)
    cls = torch.optim.Adam if s.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=s.lr, weight_decay=s.weight_decay)


def finetune(
    model: nn.Module,
    data: Iterable[Any],
    settings: Finetune,
    *,
    loss_fn: LossFn | None = None,
    on_step: Callable[[nn.Module, int, int], None] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    extra_params: Iterable[nn.Parameter] = (),
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``settings.epochs`` over ``data`` batches.

    ``on_step(model, step, total)`` runs before every optimizer step (gradual pruning schedules,
    mask updates); ``evaluate`` after every epoch. Returns the per-epoch history.
    """
    loss_fn = as_loss(loss_fn) if loss_fn is not None else _cross_entropy(None, settings)
    batches = list(data) if not hasattr(data, "__len__") else data
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise DataError("fine-tuning was given no data")
    total = settings.epochs * steps_per_epoch
    torch.manual_seed(settings.seed)
    opt = make_optimizer([*model.parameters(), *extra_params], settings)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(settings.epochs):
        model.train()
        running, n = 0.0, 0
        for b in as_batches(batches):
            if on_step is not None:
                on_step(model, step, total)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.autocast == "bf16"):
                loss = loss_fn(model, b)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"fine-tuning diverged at step {step} (loss {float(loss)}); lower finetune.lr "
                    f"(now {settings.lr}) or avoid training float16 weights with Adam"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            n += 1
            step += 1
            if progress:
                progress(step, total)
        model.eval()
        rec = {"epoch": epoch + 1, "loss": running / max(n, 1)}
        if evaluate is not None:
            rec.update(evaluate(model))
        log.info("epoch %d: %s", epoch + 1, rec)
        history.append(rec)
    if on_step is not None:
        on_step(model, total, total)
    model.eval()
    return history
