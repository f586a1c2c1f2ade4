"""Inference-time folding of a packed binary layer's float parameters into its neighbours, so the
binarized layer stores (almost) nothing but its bits.

- ``layer -> BatchNorm``: ``BN(s * z + b)`` equals a BN with ``weight * s`` and running mean
  ``(mean - b) / s`` applied to ``z``; the layer's per-channel scale ``s`` and bias ``b`` move into the
  BN's existing tensors (exact up to float rounding; needs ``s != 0``; the BN must be used in eval
  mode, as every inference model is).
- ``layer -> ReLU / MaxPool / Dropout / Identity ... -> float Linear / Conv2d``: for ``s > 0``,
  ``relu(s * z + b) = s * relu(z + b / s)``, so ``s`` multiplies the next layer's input columns
  and the layer keeps only ``b / s``.

XNOR-Net's input-dependent ``beta`` is a per-position factor and commutes with both folds. Only
neighbours inside an ``nn.Sequential`` are folded (the order of its children is the data flow).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from torchshrink.binary.modules import _PackedBinary

log = logging.getLogger(__name__)
# elementwise ops with f(s * x) = s * f(x) for s > 0 (per channel), which a scale may pass through
_HOMOGENEOUS = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


def _drop(m: _PackedBinary, name: str) -> None:
    del m._buffers[name]
    if name == "bias":
        m.bias = None
    else:
        m.scaled = False


@torch.no_grad()
def _into_batchnorm(m: _PackedBinary, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> bool:
    if bn.running_mean is None or bn.running_var is None or bn.num_features != m.n_out:
        return False
    s = m._f32("scale")
    if s is not None and (not bn.affine or bool((s == 0).any())):
        s = None  # cannot move the scale; the bias still can
    b = m._f32("bias")
    if s is None and b is None:
        return False
    mean = bn.running_mean.double()
    if b is not None:
        mean = mean - b.double()
    if s is not None:
        mean = mean / s.double()
        bn.weight.mul_(s.to(bn.weight.dtype))
        _drop(m, "scale")
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    if b is not None:
        _drop(m, "bias")
    return True


@torch.no_grad()
def _into_next(m: _PackedBinary, nxt: nn.Module) -> bool:
    s = m._f32("scale")
    if s is None or bool((s <= 0).any()):
        return False
    if type(nxt) is nn.Linear and nxt.in_features == m.n_out and not m.is_conv:
        nxt.weight.mul_(s.to(nxt.weight.dtype)[None, :])
    elif type(nxt) is nn.Conv2d and nxt.in_channels == m.n_out and nxt.groups == 1 and m.is_conv:
        nxt.weight.mul_(s.to(nxt.weight.dtype)[None, :, None, None])
    else:
        return False
    b = m._f32("bias")
    if b is not None:
        m.bias.copy_((b / s).to(m.bias.dtype))  # type: ignore[union-attr]
    _drop(m, "scale")
    return True


def fold_into_neighbours(model: nn.Module) -> list[str]:
    """Fold the per-channel scale / bias of every packed binary layer into the next BatchNorm or the
    next float layer where that is exact (see the module docstring); returns the folded layer names."""
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        kids = list(parent.children())
        for i, m in enumerate(kids):
            if not isinstance(m, _PackedBinary):
                continue
            rest = kids[i + 1:]
            done = False
            if rest and isinstance(rest[0], nn.BatchNorm1d | nn.BatchNorm2d):
                done = _into_batchnorm(m, rest[0])
            else:
                j = 0
                while j < len(rest) and isinstance(rest[j], _HOMOGENEOUS):
                    j += 1
                done = j < len(rest) and _into_next(m, rest[j])
            if done:
                folded.append(f"{parent_name}.{i}" if parent_name else str(i))
    if folded:
        log.info("folded binary layer scales / biases into their neighbours: %s", folded)
    return folded
