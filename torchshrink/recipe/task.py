"""A task says what data a model trains / calibrates on and how its quality is measured.

- digits models: labelled train/val/test splits; quality = test accuracy.
- sentence encoders (zoo:minilm): real sentences; quality = embedding cosine vs the original on
  held-out sentences never used for calibration or training.
- your own data (``--data``): see :mod:`torchshrink.recipe.userdata`.
- anything else, without data: no training; quality = agreement (output cosine) with the original on
  64 random inputs, calibration on 32 other random inputs -- labelled as such, never as validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.data import Batch
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
    # where each figure comes from: {"quality": "top-1 accuracy on ...", "calibration": ..., "train": ...,
    # "search": the data a search steers by}
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)
    search_key: str = ""  # the quality key a search steers by (a validation split's), default: primary

    @property
    def steer_key(self) -> str:
        return self.search_key or self.primary

    def evaluate(self, model: nn.Module, reference: nn.Module) -> dict[str, float]:
        return self.quality(model, reference) if self.quality else {}

    def require_train(self, what: str = "fine-tuning and distillation") -> Any:
        if self.train is None:
            why = "no labelled training data in it" if self.name.startswith("data:") else "no data was given"
            raise DataError(f"{what} needs training data and {why}: give --data (a folder of CLASS/ images, "
                            "a .csv / .npz with labels, a .txt / .jsonl text file, or package.module:factory)")
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
        search_key="val_accuracy",
        provenance={"search": "the digits validation split",
                    "quality": f"top-1 accuracy on the digits test split ({sum(len(y) for _, y in test)} images; "
                               "val_accuracy on the validation split)",
                    "calibration": "4 validation batches", "train": "the digits training split"},
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
        provenance={"quality": f"embedding cosine vs the original on {len(heldout)} held-out sentences",
                    "calibration": "128 training sentences", "train": f"{n_train} training sentences"},
    )


N_AGREEMENT = 64  # random inputs the no-data agreement is measured on


def _random_like(model: nn.Module, inputs: tuple[torch.Tensor, ...] | None, n: int, seed: int
                 ) -> tuple[torch.Tensor, ...]:
    """``n`` random samples shaped like ``inputs`` (what the caller will time: a ResNet given a 96x96 example is
    judged on 96x96, not on the 224x224 it declares), else like the model's declared input."""
    if inputs is None:
        return example_inputs(model, batch=n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, *t.shape[1:], generator=g, dtype=t.dtype) if t.is_floating_point()
                 else _random_ints(t, n, g) for t in inputs)


def _random_ints(t: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` rows of integers drawn from the values ``t`` holds (token ids stay in the vocabulary the example
    used, a 0/1 mask stays 0/1, an all-ones mask all ones); bool stays bool."""
    if t.dtype == torch.bool or t.numel() == 0:
        return t[:1].expand(n, *t.shape[1:]).clone() if t.numel() else t.new_zeros(n, *t.shape[1:])
    values = t.reshape(-1).unique()
    return values[torch.randint(len(values), (n, *t.shape[1:]), generator=g)]


def generic_task(model: nn.Module, inputs: tuple[torch.Tensor, ...] | None = None) -> Task:
    """No data: quality is agreement with the original on random inputs that calibration never sees."""
    given = inputs
    inputs = inputs or example_inputs(model)
    judge = _random_like(model, given, N_AGREEMENT, seed=1)
    # Batch, not a bare tuple: a 2-tuple would read as (inputs, labels) and a two-input model would lose its second
    calib = [Batch(_random_like(model, given, 8, seed=2 + i)) for i in range(4)]
    return Task(
        name="no-data",
        inputs=inputs,
        calibration=calib,
        quality=lambda m, ref: {k.replace("cosine", "agreement"): v for k, v in fidelity(m, ref, [judge]).items()
                                if k.startswith("cosine")},
        primary="agreement_mean",
        provenance={"quality": f"agreement with the original (output cosine) on {N_AGREEMENT} random inputs: no data "
                               "was given, so this is not accuracy on real data (give --data)",
                    "calibration": "32 other random inputs (4 batches of 8)", "train": "none"},
    )


def task_for(model: nn.Module, inputs: tuple[torch.Tensor, ...] | None = None) -> Task:
    source = state.get(model, "source", "")
    if source.startswith("zoo:digits"):
        return digits_task()
    if source == "zoo:minilm":
        return sentences_task(model)
    return generic_task(model, inputs)
