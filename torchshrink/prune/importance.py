"""Importance criteria as plain functions, and the mask rules built on them.

Every criterion maps a weight (and, where needed, its gradient or an accumulated score) to a
tensor of scores of the same shape: a higher score means "keep". Masks keep the top scores.
"""

from __future__ import annotations

import math

import torch

from torchshrink.core.errors import ConfigError, DataError


def magnitude(weight: torch.Tensor, **_: object) -> torch.Tensor:
    """|w| (Han et al., 2015)."""
    return weight.detach().abs()


def l2(weight: torch.Tensor, **_: object) -> torch.Tensor:
    """w^2 divided by the layer's mean w^2: ranks a layer like magnitude, but is scale-free, so a
    global threshold compares layers by their relative, not absolute, weight sizes."""
    w2 = weight.detach().float().pow(2)
    return w2 / w2.mean().clamp_min(torch.finfo(torch.float32).tiny)


def random(weight: torch.Tensor, *, seed: int = 0, **_: object) -> torch.Tensor:
    """Uniform random scores (a baseline), reproducible for a seed and shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(weight.shape, generator=g).to(weight.device)


def taylor(weight: torch.Tensor, *, grad: torch.Tensor | None = None, **_: object) -> torch.Tensor:
    """First-order Taylor estimate of the loss change from removing w: |w * dL/dw| (Molchanov et al., 2019)."""
    if grad is None:
        raise DataError("criterion 'taylor' needs gradients: pass data=[batches] to prune(), or use 'magnitude'")
    return (weight.detach() * grad.detach()).abs()


def movement(weight: torch.Tensor, *, score: torch.Tensor | None = None, grad: torch.Tensor | None = None,
             **_: object) -> torch.Tensor:
    """Movement score -sum_t w * dL/dw accumulated during fine-tuning (Sanh et al., 2020): weights moving
    away from zero score high. With no accumulated score, a single gradient gives the first estimate."""
    if score is not None:
        return score.detach().clone()
    if grad is None:
        raise DataError("criterion 'movement' needs gradients: pass data=[batches] or prune during fine-tuning")
    return -(weight.detach() * grad.detach())


CRITERIA = {"magnitude": magnitude, "l2": l2, "random": random, "taylor": taylor, "movement": movement}
NEEDS_GRAD = frozenset({"taylor", "movement"})


def scores_for(criterion: str, weight: torch.Tensor, **kwargs: object) -> torch.Tensor:
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion={criterion!r} is not known; allowed: {', '.join(CRITERIA)}")
    return CRITERIA[criterion](weight, **kwargs).float()


def percentile_threshold(scores: torch.Tensor, sparsity: float) -> float:
    """The seed's rule: the threshold is the ``sparsity``-percentile of the scores (the k-th smallest,
    k = round(sparsity * n)); entries at or below it are pruned."""
    flat = scores.reshape(-1)
    k = round(sparsity * flat.numel())
    if k <= 0:
        return -math.inf
    return float(flat.kthvalue(k).values)


def n_pruned(numel: int, sparsity: float) -> int:
    return min(numel, max(0, round(sparsity * numel)))


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping exactly ``keep`` entries with the highest scores (ties broken by position)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep = max(0, min(keep, flat.numel()))
    if keep:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def sparsity_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the top (1 - sparsity) share of entries: the percentile rule, made exact under ties."""
    return topk_mask(scores, scores.numel() - n_pruned(scores.numel(), sparsity))


def input_last(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear [out, in] / Conv [out, in, *k] weight with the input channel as the last dim."""
    return weight if weight.dim() == 2 else weight.movedim(1, -1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Semi-structured N:M mask: in every group of ``m`` consecutive inputs (per output and kernel
    position) exactly ``n`` entries are kept, those with the highest scores."""
    if not 0 < n <= m:
        raise ConfigError(f"N:M needs 0 < n <= m, got n={n}, m={m}")
    s = input_last(scores)
    if s.shape[-1] % m:
        raise ConfigError(f"the input dimension {s.shape[-1]} is not a multiple of m={m}")
    groups = s.reshape(-1, m)
    idx = torch.topk(groups, n, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).reshape(s.shape)
    return mask if scores.dim() == 2 else mask.movedim(-1, 1).contiguous()
