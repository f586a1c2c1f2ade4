"""A task says what data a model trains / calibrates on and how its quality is measured.

- digits models: labelled train/val/test splits; quality = test accuracy.
- sentence encoders (zoo:minilm): real sentences; quality = embedding cosine vs the original on
  held-out sentences never used for calibration or training.
- anything else: no training data; quality = output cosine vs the original on the example input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import DataError
from torchshrink.measure.quality import accuracy, fidelity
from torchshrink.models import example_inputs


@dataclasses.dataclass
class Task:
    name: str
    inputs: tuple[torch.Tensor, ...]
    train: Any = None  # batches for fine-tuning (labelled) / distillation
    calibration: Any = None  # a few batches of inputs for calibration
    quality: Callable[[nn.Module, nn.Module], dict[str, float]] | None = None
    primary: str = ""  # the quality key that matters most, e.g. "accuracy"
    higher_is_better: bool = True

    def evaluate(self, model: nn.Module, reference: nn.Module) -> dict[str, float]:
        return self.quality(model, reference) if self.quality else {}

    def require_train(self) -> Any:
        if self.train is None:
            raise DataError(f"task {self.name!r} has no training data; fine-tuning and distillation need it")
        return self.train


def digits_task(batch_size: int = 64, seed: int = 0) -> Task:
    from torchshrink.zoo.digits import digits_loaders

    train, val, test = digits_loaders(batch_size=batch_size, seed=seed)
    calib = [x for x, _ in list(val)[:4]]
    return Task(
        name="digits",
        inputs=(torch.zeros(1, 1, 8, 8).uniform_(0, 1, generator=torch.Generator().manual_seed(0)),),
        train=train,
        calibration=calib,
        quality=lambda m, ref: {"accuracy": accuracy(m, test), "val_accuracy": accuracy(m, val)},
        primary="accuracy",
    )


def sentences_task(model: nn.Module, batch: int = 16, seq: int = 128, n_train: int = 512) -> Task:
    from torchshrink.zoo.minilm import tokenize
    from torchshrink.zoo.text import sentence_split

    train_s, heldout = sentence_split()
    to_dict = lambda b: {"input_ids": b[0], "attention_mask": b[1]}  # noqa: E731
    train = [to_dict(b) for b in tokenize(train_s[:n_train], batch_size=32)]
    held = tokenize(heldout, batch_size=64)
    return Task(
        name="sentences",
        inputs=example_inputs(model, batch=batch, seq=seq),
        train=train,
        calibration=[to_dict(b) for b in tokenize(train_s[:128], batch_size=32)],
        quality=lambda m, ref: {k: v for k, v in fidelity(m, ref, held).items() if k.startswith("cosine")},
        primary="cosine_mean",
    )


def generic_task(model: nn.Module, inputs: tuple[torch.Tensor, ...] | None = None) -> Task:
    inputs = inputs or example_inputs(model)
    return Task(
        name="output-fidelity",
        inputs=inputs,
        calibration=[inputs],
        quality=lambda m, ref: {k: v for k, v in fidelity(m, ref, inputs).items() if k.startswith("cosine")},
        primary="cosine_mean",
    )


def task_for(model: nn.Module, inputs: tuple[torch.Tensor, ...] | None = None) -> Task:
    source = state.get(model, "source", "")
    if source.startswith("zoo:digits"):
        return digits_task()
    if source == "zoo:minilm":
        return sentences_task(model)
    return generic_task(model, inputs)
