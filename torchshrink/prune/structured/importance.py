"""Channel importance for a group of coupled tensors.

Each criterion scores every channel of every member tensor; the group's score per channel is the
mean / max / sum over members. Criteria:

- ``l1``: sum of |w| over the channel's slice (Li et al. 2017, "Pruning Filters for Efficient
  ConvNets": the L1 norm of each filter).
- ``l2``: the slice's L2 norm.
- ``bn_scale``: |gamma| of the BatchNorm / norm layers in the group (Liu et al. 2017, "Learning
  Efficient Convolutional Networks through Network Slimming"); groups without a norm use ``l1``.
- ``taylor``: |sum(w * dL/dw)| over the slice, first-order Taylor (Molchanov et al. 2019),
  gradients accumulated over the calibration batches.
- ``random``: seeded uniform scores (a baseline).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.prune.structured.groups import Group
from torchshrink.prune.structured.trace import Graph

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random")
REDUCTIONS = ("mean", "max", "sum")


def _is_norm_weight(model: nn.Module, name: str) -> bool:
    mod_name, _, attr = name.rpartition(".")
    m = model.get_submodule(mod_name) if mod_name else model
    return attr == "weight" and isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm)


def _per_channel(g: Graph, group: Group, member: Any, t: torch.Tensor, fn: str) -> torch.Tensor:
    """Score per channel of ``group`` from tensor ``t`` along ``member.dim``."""
    ch = torch.arange(group.size)
    idx = group.indices(g, member, ch)
    k = max(idx.numel() // group.size, 1)
    sl = torch.index_select(t.detach().float(), member.dim, idx).movedim(member.dim, 0).reshape(idx.numel(), -1)
    if fn == "l2":
        per = sl.pow(2).sum(1)
        return per.reshape(group.size, k).sum(1).sqrt()
    if fn == "taylor":
        per = sl.sum(1)
        return per.reshape(group.size, k).sum(1).abs()
    return sl.abs().sum(1).reshape(group.size, k).sum(1)


def group_scores(
    model: nn.Module, g: Graph, group: Group, criterion: str, reduction: str, *,
    grads: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    if criterion == "random":
        return torch.rand(group.size, generator=generator)
    params = dict(model.named_parameters())
    members = [m for m in group.members if m.name in params]
    if criterion == "bn_scale":
        norms = [m for m in members if _is_norm_weight(model, m.name)]
        if norms:
            members, criterion = norms, "l1"
        else:
            criterion = "l1"
    scores = []
    for m in members:
        t = params[m.name]
        if criterion == "taylor":
            if grads is None or m.name not in grads:
                continue
            t = t.detach() * grads[m.name]
        scores.append(_per_channel(g, group, m, t, criterion if criterion in ("l2", "taylor") else "l1"))
    if not scores:
        return torch.zeros(group.size)
    s = torch.stack(scores)
    if reduction == "max":
        return s.max(0).values
    if reduction == "sum":
        return s.sum(0)
    return s.mean(0)


def taylor_grads(model: nn.Module, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Accumulated gradients over calibration batches. With labels ``(x, y)`` the loss is cross
    entropy; without labels it is the mean squared output (a label-free proxy)."""
    from torchshrink.core.data import calibration
    from torchshrink.measure.quality import main_output

    batches = calibration(batches, what="importance='taylor'")
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()
    with torch.enable_grad():
        for b in batches:
            out = main_output(b(model))
            if b.labels is not None and not b.labels.is_floating_point() and out.dim() == 2:
                loss = F.cross_entropy(out, b.labels)
            else:
                loss = out.float().pow(2).mean()
            loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.train(was)
    return grads
