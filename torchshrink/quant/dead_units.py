"""Dead units after pruning: a hidden neuron (or conv channel) whose every outgoing weight is zero
cannot change the output, so its incoming weights and bias are zeroed too. The model's outputs
stay exactly the same; the saved file loses their codes and positions.

Only pairs inside one ``Sequential`` are touched: clustered Linear -> Linear or Conv2d -> Conv2d
(groups 1), with only per-channel modules (activations, pooling, dropout, BatchNorm, Identity)
between them, so channel ``j`` of the first layer feeds only input ``j`` of the second.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from torchshrink.quant.kmeans import ClusteredLayer

log = logging.getLogger(__name__)

_PER_CHANNEL = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.ELU,
    nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
)


def _pairs(seq: nn.Sequential) -> list[tuple[ClusteredLayer, ClusteredLayer]]:
    out = []
    kids = list(seq.children())
    for i, a in enumerate(kids):
        if not isinstance(a, ClusteredLayer):
            continue
        for b in kids[i + 1:]:
            if isinstance(b, ClusteredLayer):
                if a.op == b.op and b.conv.get("groups", 1) == 1 and a.conv.get("groups", 1) == 1 and b.shape[1] == a.shape[0]:
                    out.append((a, b))
                break
            if type(b) not in _PER_CHANNEL:
                break
    return out


@torch.no_grad()
def zero_dead_units(model: nn.Module) -> int:
    """Zero the incoming weights and bias of units no later layer reads. Returns how many units."""
    total = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for a, b in _pairs(seq):
            if not a.zero_code:  # code 0 is not an exact zero in ``a``: nothing to zero with
                continue
            w_next = b.weight_tensor()
            reads = w_next.transpose(0, 1).reshape(w_next.shape[1], -1).ne(0).any(1)
            dead = ~reads
            n = int(dead.sum())
            if n == 0:
                continue
            a.codes[dead] = 0
            if a.bias is not None:
                a.bias[dead] = 0.0
            a._cache = None
            total += n
    if total:
        log.info("kmeans: zeroed %d dead units (no outgoing weights)", total)
    return total
