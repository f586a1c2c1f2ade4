"""Self-distillation.

- Born-again networks (Furlanello et al., 2018): a trained model teaches a freshly initialized copy
  of itself; the copy teaches the next generation, k times.
- Deep supervision with early exits (Zhang et al., 2019, "Be Your Own Teacher"): classifier heads
  on intermediate layers learn from the labels and from the model's own final output.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.data import Batch, as_batches
from torchshrink.core.errors import ConfigError, DataError
from torchshrink.core.surgery import get_module
from torchshrink.core.train import Finetune
from torchshrink.distill.distiller import Distiller, tap
from torchshrink.distill.losses import check_kd_settings, soft_kl
from torchshrink.measure.quality import main_output

log = logging.getLogger(__name__)


def reinitialize(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Reset every submodule that has ``reset_parameters`` (in place); returns the model."""
    if seed is not None:
        torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(model, "reset_parameters"):
        model.reset_parameters()
    return model


@dataclasses.dataclass
class Generation:
    model: nn.Module
    history: list[dict[str, float]]


def born_again(
    teacher: nn.Module,
    data: Iterable[Any],
    settings: Finetune,
    *,
    generations: int = 2,
    reinit: bool = True,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> list[Generation]:
    """Train ``generations`` successive students, each a fresh copy of the architecture taught by
    the previous generation (the first by ``teacher``) with the combined KD loss. The teacher is
    not modified. Returns the generations in order; the last is usually the one to keep."""
    if not isinstance(generations, int) or generations < 1:
        raise ConfigError(f"generations={generations!r} must be an integer >= 1")
    check_kd_settings(settings.temperature, settings.alpha)
    out: list[Generation] = []
    prev = teacher
    for g in range(generations):
        student = copy.deepcopy(prev)
        if reinit:
            reinitialize(student, seed=settings.seed + 1000 * (g + 1))
        d = Distiller(prev, student, temperature=settings.temperature, alpha=settings.alpha)
        history = d.fit(data, dataclasses.replace(settings, seed=settings.seed + g), evaluate=evaluate)
        log.info("born-again generation %d: %s", g + 1, history[-1] if history else {})
        out.append(Generation(student.eval(), history))
        prev = student
    return out


def _exit_head(feat: torch.Tensor, num_classes: int) -> nn.Module:
    if feat.dim() == 4:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feat.shape[1], num_classes))
    if feat.dim() == 2:
        return nn.Linear(feat.shape[1], num_classes)
    if feat.dim() == 3:
        return _TokenMeanHead(feat.shape[-1], num_classes)
    raise DataError(f"cannot attach an exit to a feature of shape {tuple(feat.shape)}; expected 2, 3 or 4 dimensions")


class _TokenMeanHead(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(1))


class EarlyExits(nn.Module):
    """``backbone`` plus classifier heads on named intermediate modules.

    ``forward`` returns the backbone's output; the exits' logits of the last forward are in
    :attr:`exit_logits` (name -> tensor). :meth:`strip` returns the plain backbone for deployment.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.exit_names = list(heads)
        self.heads = nn.ModuleDict({n.replace(".", "__"): h for n, h in heads.items()})
        self.exit_logits: dict[str, torch.Tensor] = {}

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        with tap(self.backbone, self.exit_names) as feats:
            out = self.backbone(*inputs, **kwargs)
        self.exit_logits = {n: self.heads[n.replace(".", "__")](feats[n]) for n in self.exit_names}
        return out

    def strip(self) -> nn.Module:
        return self.backbone


def add_early_exits(model: nn.Module, at: Sequence[str], example: Sequence[torch.Tensor] | torch.Tensor) -> EarlyExits:
    """Wrap ``model`` with an exit head after each named module (sized by running ``example``)."""
    if not at:
        raise ConfigError("add_early_exits needs at least one module name in `at`")
    for name in at:
        get_module(model, name)  # LayerNotFoundError with close names
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    was = model.training
    model.eval()
    with torch.no_grad(), tap(model, at) as feats:
        out = main_output(model(*example))
    model.train(was)
    if out.dim() != 2:
        raise DataError(f"deep supervision needs class logits [B, classes] as the model output, got {tuple(out.shape)}")
    return EarlyExits(model, {n: _exit_head(feats[n], out.shape[1]) for n in at})


def deep_supervision_loss(temperature: float = 3.0, alpha: float = 0.5) -> Callable[..., torch.Tensor]:
    """``CE(final) + sum_exits [(1 - alpha) CE(exit) + alpha T^2 KL(final(T) || exit(T))]``."""
    check_kd_settings(temperature, alpha)

    def loss(model: nn.Module, b: Batch) -> torch.Tensor:
        if not isinstance(model, EarlyExits):
            raise ConfigError("deep supervision trains an EarlyExits model; wrap yours with add_early_exits()")
        labels = b.labels
        if labels is None:
            raise DataError("deep supervision needs labelled (inputs, labels) batches")
        final = main_output(b(model))
        total = F.cross_entropy(final, labels)
        for logits in model.exit_logits.values():
            total = total + (1 - alpha) * F.cross_entropy(logits, labels) + alpha * soft_kl(logits, final.detach(), temperature)
        return total

    return loss


def train_deep_supervision(
    model: EarlyExits,
    data: Iterable[Any],
    settings: Finetune,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Train backbone and exits together (in place) with the shared fine-tune loop."""
    from torchshrink.core.train import finetune

    return finetune(model, data, settings, loss_fn=deep_supervision_loss(settings.temperature, settings.alpha),
                    evaluate=evaluate)


@torch.inference_mode()
def exit_accuracies(model: EarlyExits, data: Iterable[Any]) -> dict[str, float]:
    """Top-1 accuracy of every exit and of the final output (key ``"final"``)."""
    was = model.training
    model.eval()
    correct: dict[str, int] = {}
    total = 0
    for b in as_batches(data):
        labels = b.labels
        if labels is None:
            raise DataError("exit_accuracies needs (inputs, labels) batches")
        final = main_output(b(model))
        outs = {"final": final, **model.exit_logits}
        for k, v in outs.items():
            correct[k] = correct.get(k, 0) + int((v.argmax(-1) == labels).sum())
        total += labels.numel()
    model.train(was)
    if total == 0:
        raise DataError("exit_accuracies was given no data")
    return {k: v / total for k, v in correct.items()}
