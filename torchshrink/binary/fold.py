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

- ``BatchNorm -> MaxPool / Flatten / Dropout / Identity ... -> fully binary layer``: the layer's
  activation threshold ``tau`` (per input channel) moves into the BatchNorm's bias,
  ``sign(bn(z) - tau) = sign(bn'(z))`` with ``bn'.bias = bn.bias - tau`` (a per-channel shift passes
  exactly through max-pooling and flattening); XNOR-Net's ``beta`` is computed from the same shifted
  tensor, so the layer stores no threshold. The data flow comes from a torch.fx trace; every tensor
  on the path must have that one consumer. The binarize stage prepares this (``sign_sources`` with
  ``allow_relu``): a ReLU on such a path is replaced by Identity, XNOR-Net's block order
  BN -> sign -> binary layer, and a Linear after a Flatten shares one threshold per channel.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch
from torch import fx, nn

from torchshrink.binary.layers import FULLY_BINARY, TRAINING_LAYERS
from torchshrink.binary.modules import _PackedBinary

log = logging.getLogger(__name__)
# elementwise ops with f(s * x) = s * f(x) for s > 0 (per channel), which a scale may pass through
_HOMOGENEOUS = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


def _drop(m: _PackedBinary, name: str) -> None:
    del m._buffers[name]
    if name == "bias":
        m.bias = None
    elif name == "act_threshold":
        m.thresholded = False
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
    next float layer, and activation thresholds into the BatchNorm feeding the layer, where that is
    exact (see the module docstring); returns the folded layer names."""
    folded = fold_thresholds(model)
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
            name = f"{parent_name}.{i}" if parent_name else str(i)
            if done and name not in folded:
                folded.append(name)
    if folded:
        log.info("folded binary layer scales / biases into their neighbours: %s", folded)
    return folded


# --------------------------------------------------------------------------- thresholds -> BatchNorm

_SHIFT_COMMUTES = (nn.MaxPool1d, nn.MaxPool2d, nn.Dropout, nn.Identity)  # f(x - t) = f(x) - t per channel (eval)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclasses.dataclass
class SignSource:
    """The BatchNorm whose output reaches a fully binary layer only through shift-commuting ops."""

    bn: str
    channels: int
    flattened: bool
    relus: list[str]
    pooled_features: bool = False  # a pooling op between a Flatten (or BatchNorm1d) and a Linear


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, TRAINING_LAYERS + (_PackedBinary,)) or super().is_leaf_module(m, qualname)


def _has_threshold(m: nn.Module) -> bool:
    if isinstance(m, TRAINING_LAYERS):
        return m.mode in FULLY_BINARY
    return isinstance(m, _PackedBinary) and m.thresholded


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[str(node.target)]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _walk(cur: object, modules: dict[str, nn.Module], calls: Counter, allow_relu: bool) -> SignSource | None:
    """Follow a layer's input back to a BatchNorm through ops that commute with a per-channel shift."""
    relus: list[str] = []
    flattened = pooled_features = False
    while isinstance(cur, fx.Node) and len(cur.users) == 1:
        m = modules.get(str(cur.target)) if cur.op == "call_module" else None
        if isinstance(m, _BN):  # its bias changes: it must run once, feeding only this path
            ok = m.affine and calls[cur.target] == 1
            return SignSource(str(cur.target), m.num_features, flattened, relus, pooled_features) if ok else None
        if _is_flatten(cur, modules) and not flattened:
            flattened = True
        elif isinstance(m, nn.ReLU) and allow_relu and calls[cur.target] == 1:
            relus.append(str(cur.target))
        elif not isinstance(m, _SHIFT_COMMUTES):
            return None
        pooled_features |= not flattened and isinstance(m, nn.MaxPool1d | nn.MaxPool2d)
        cur = cur.args[0] if cur.args else None
    return None


def _fits(layer: nn.Module, src: SignSource) -> bool:
    if layer.is_conv:
        return not src.flattened and src.channels == layer.n_in
    if src.pooled_features:  # pooling a [N, features] tensor mixes the features of different channels
        return False
    if src.flattened:
        return layer.n_in % src.channels == 0
    # a BatchNorm1d feeding a Linear directly is taken to see [N, C] input (BNN MLPs)
    return src.channels == layer.n_in


def sign_sources(model: nn.Module, allow_relu: bool = False) -> dict[str, SignSource]:
    """{fully binary layer name: the BatchNorm its threshold can fold into}. With ``allow_relu`` a
    ReLU (run once) may sit on the path; the caller must then replace it by Identity. A model that
    torch.fx cannot trace gets no entry (its thresholds stay stored)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - arbitrary user models: fall back to stored thresholds
        log.info("%s does not trace with torch.fx (%s): binary thresholds stay stored", type(model).__name__, e)
        return {}
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    out = {}
    for node in graph.nodes:
        layer = modules.get(str(node.target)) if node.op == "call_module" else None
        if layer is None or not _has_threshold(layer) or calls[node.target] != 1 or not node.args:
            continue
        src = _walk(node.args[0], modules, calls, allow_relu)
        if src is not None and _fits(layer, src):
            out[str(node.target)] = src
    return out


@torch.no_grad()
def fold_thresholds(model: nn.Module) -> list[str]:
    """Move each fully binary layer's activation threshold into the BatchNorm that feeds it where
    that is exact (one threshold per BatchNorm channel, no ReLU on the path); returns the layer names.
    A training layer's threshold is zeroed (its packed module then stores none); a packed layer's is
    dropped."""
    folded = []
    for name, src in sign_sources(model).items():
        layer = model.get_submodule(name)
        packed = isinstance(layer, _PackedBinary)
        tau = layer._f32("act_threshold") if packed else layer.threshold_vector().detach()
        per_channel = tau.float().reshape(src.channels, -1)
        if not bool((per_channel == per_channel[:, :1]).all()):
            continue  # thresholds differ across a channel's positions: a per-channel bias cannot hold them
        bn = model.get_submodule(src.bn)
        bn.bias.sub_(per_channel[:, 0].to(bn.bias.dtype))
        if packed:
            _drop(layer, "act_threshold")
        else:
            layer.act_threshold.zero_()
        folded.append(name)
    if folded:
        log.info("folded activation thresholds into the BatchNorm before: %s", folded)
    return folded
