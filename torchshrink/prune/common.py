"""What pruning shares: which layers it can prune, and gradients for gradient-based criteria."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from torchshrink.core.data import as_batches
from torchshrink.core.errors import DataError, UnsupportedLayerError
from torchshrink.core.report import current
from torchshrink.core.select import Select, select_modules
from torchshrink.prune.hold import WeightMask, original_weight

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRUNABLE_NAMES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def prunable_layers(model: nn.Module, select: Select | None) -> list[tuple[str, nn.Module]]:
    """Selected layers with a prunable ``weight``; clear errors when there are none."""
    if not any(isinstance(m, PRUNABLE) for m in model.modules()):
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no prunable layers; pruning works on {', '.join(PRUNABLE_NAMES)} weights"
        )
    chosen = select_modules(model, select, PRUNABLE_NAMES)
    bad = [f"{n} ({type(m).__name__})" for n, m in chosen if not isinstance(m, PRUNABLE)]
    if bad:
        raise UnsupportedLayerError(
            f"cannot prune {', '.join(bad[:3])}: pruning works on {', '.join(PRUNABLE_NAMES)} weights"
        )
    kept = []
    for name, m in chosen:
        if parametrize.is_parametrized(m, "weight") and any(
                not isinstance(p, WeightMask) for p in m.parametrizations.weight):
            # weight_norm (wav2vec2's positional conv) computes the weight from other tensors: zeros set in it
            # would not stay, and the masks cannot wrap it
            current(model).skipped[name] = (f"its weight is computed by a parametrization "
                                            f"({type(m.parametrizations.weight[0]).__name__}); left as it is")
            continue
        kept.append((name, m))
    if not kept:
        raise UnsupportedLayerError(f"every selected layer of {type(model).__name__} has a parametrized weight")
    return kept


def _loss(out: Any, labels: torch.Tensor | None) -> torch.Tensor:
    from torchshrink.measure.quality import main_output

    y = main_output(out).float()
    if labels is not None:
        return F.cross_entropy(y, labels)
    if y.dim() == 2:  # classifier without labels: its own predictions as targets
        return F.cross_entropy(y, y.detach().argmax(-1))
    return 0.5 * y.pow(2).mean()


def accumulate_grads(model: nn.Module, layers: list[tuple[str, nn.Module]], data: Any,
                     max_batches: int = 8) -> dict[str, torch.Tensor]:
    """Sum of dL/dw over up to ``max_batches`` batches for each layer (labels if the batches carry them)."""
    if not data:
        raise DataError("this pruning criterion needs gradients: pass data=[batches] (inputs or (inputs, labels))")
    weights = {n: original_weight(m) for n, m in layers}
    grads = {n: torch.zeros_like(w) for n, w in weights.items()}
    was = model.training
    model.eval()
    try:
        for b in as_batches(data, limit=max_batches):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                _loss(b(model), b.labels).backward()
            for n, w in weights.items():
                if w.grad is not None:
                    grads[n] += w.grad.detach()
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was)
    return grads


def ceil_count(fraction: float, n: int) -> int:
    return min(n, math.ceil(fraction * n - 1e-9))
