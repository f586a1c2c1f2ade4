"""Data-aware importance of attention heads and FFN neurons, from the inputs their output
projection sees on calibration batches.

A unit (a head, an FFN neuron) reaches the rest of the model only through columns ``J`` of one
consumer projection ``W`` (``o_proj`` for a head, ``down_proj`` for a neuron). With ``x`` the
consumer's input over calibration tokens:

- ``activation``: ``sum_j ||W[:, j]||^2 * E[x_j^2]``, the expected squared size of what the unit adds
  (features taken as uncorrelated; the activation-weighted magnitude of Wanda, Sun et al. 2023, summed
  over a structured unit as in Wanda-sp).
- ``fluctuation``: ``sum_j ||W[:, j]||^2 * Var[x_j]``, and the removed units' mean contribution
  ``W[:, J] @ E[x_J]`` is added to the consumer's bias (FLAP, An et al. 2024): what removal loses is
  then only the part that varies from token to token. Consumers without a bias get no compensation.

Both need calibration data; ``auto`` uses ``fluctuation`` when data is given, else ``l1``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from torchshrink.core.data import calibrate

DATA_AWARE = ("activation", "fluctuation")
CALIB_BATCHES = 64


@dataclasses.dataclass
class InputStats:
    """Per input feature of a projection: mean and mean square over calibration tokens."""

    mean: torch.Tensor
    sq: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        return (self.sq - self.mean.pow(2)).clamp_min(0)


def resolve(criterion: str, data: Any) -> str:
    """``auto`` -> ``fluctuation`` with calibration data, ``l1`` without."""
    if criterion != "auto":
        return criterion
    return "fluctuation" if data is not None and not (isinstance(data, list | tuple) and not data) else "l1"


def input_stats(model: nn.Module, consumers: list[nn.Module], data: Any) -> dict[int, InputStats]:
    """Mean and mean square of every consumer's input features (by ``id`` of the module) over the
    tokens of up to ``CALIB_BATCHES`` calibration batches."""
    names = {id(m): n for n, m in model.named_modules()}
    acc: dict[int, list[Any]] = {id(m): [0.0, 0.0, 0] for m in consumers}

    def make(key: int) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            a = acc[key]
            a[0] = a[0] + x.sum(0)
            a[1] = a[1] + x.pow(2).sum(0)
            a[2] += x.shape[0]
        return hook

    calibrate(model, data, {names[id(m)]: make(id(m)) for m in consumers}, pre=True, limit=CALIB_BATCHES,
              inference=False)
    out = {}
    for key, (s, sq, n) in acc.items():
        if n:
            out[key] = InputStats((s / n).float(), (sq / n).float())
    return out


def _cols(m: nn.Module) -> torch.Tensor:
    """The consumer's weight as (out, in) whatever its storage (HF Conv1D keeps (in, out))."""
    w = m.weight.detach()
    return w if isinstance(m, nn.Linear) else w.T


def feature_scores(m: nn.Module, stats: InputStats, criterion: str) -> torch.Tensor:
    """One score per input feature of consumer ``m``."""
    col_sq = _cols(m).float().pow(2).sum(0)
    return col_sq * (stats.var if criterion == "fluctuation" else stats.sq)


@torch.no_grad()
def compensate(m: nn.Module, stats: InputStats, removed: torch.Tensor) -> bool:
    """Fold the removed input features' mean contribution into ``m``'s bias; False where it has none."""
    if getattr(m, "bias", None) is None or removed.numel() == 0:
        return False
    w = _cols(m)
    m.bias.add_((w[:, removed].float() @ stats.mean[removed]).to(m.bias.dtype))
    return True


@torch.no_grad()
def zero_inputs(m: nn.Module, removed: torch.Tensor) -> None:
    """Zero input features ``removed`` of a projection (the masked original of a unit removal)."""
    dim = 1 if isinstance(m, nn.Linear) else 0
    m.weight.index_fill_(dim, removed, 0)
