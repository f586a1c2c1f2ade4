"""Fused Q/K/V projections for INT8 dynamic attention: one integer GEMM ``in -> 3 * out`` quantizes
the shared input once instead of three times and runs one larger GEMM.

The attention block keeps calling ``query(x)``, ``key(x)``, ``value(x)``: ``query`` becomes a
:class:`FusedQKV` (the concatenated weights) that computes all three and parks the result for this
input; ``key`` / ``value`` become :class:`QKVPart` modules (no weights) that return their slice of
it. The hand-over is checked by tensor identity, so a part called with any other input raises
instead of returning stale numbers; :func:`fuse_qkv` runs a calibration batch through the model and
undoes the fusion where the block does not call ``query`` first on one shared input.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.core.surgery import set_module
from torchshrink.export.modules import register_module
from torchshrink.quant.modules import Int8DynamicLinear

log = logging.getLogger(__name__)
_PARKED = threading.local()  # group -> [input, fused output, parts still to collect]


def _parked() -> dict[str, list[Any]]:
    if not hasattr(_PARKED, "d"):
        _PARKED.d = {}
    return _PARKED.d


@register_module
class FusedQKV(nn.Module):
    """The query slot of a fused attention projection; returns the query part."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group: str = "", parts: int = 3,
                 **linear_args: Any) -> None:
        super().__init__()
        self.group, self.parts, self.out_features = group, parts, out_features
        self.linear = Int8DynamicLinear(in_features, out_features * parts, bias, **linear_args)

    def init_args(self) -> dict[str, Any]:
        args = self.linear.init_args()
        args.update(out_features=self.out_features, group=self.group, parts=self.parts)
        return args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        _parked()[self.group] = [x, y, self.parts - 1]
        return y[..., : self.out_features]

    def logical_params(self) -> int:
        return self.linear.logical_params()

    def macs(self, args: tuple, output: Any) -> int:
        return self.linear.macs(args, output)


@register_module
class QKVPart(nn.Module):
    """Slice ``index`` of the output that the group's :class:`FusedQKV` computed for the same input."""

    def __init__(self, group: str = "", index: int = 1, out_features: int = 0) -> None:
        super().__init__()
        self.group, self.index, self.out_features = group, index, out_features

    def init_args(self) -> dict[str, Any]:
        return {"group": self.group, "index": self.index, "out_features": self.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        got = _parked().get(self.group)
        if got is None or got[0] is not x:
            raise UnsupportedLayerError(
                f"fused Q/K/V part {self.index} of {self.group!r} was called without its query call on the same "
                "input; this attention block does not fit fusion (quantize with fuse_qkv=False)")
        got[2] -= 1
        if got[2] <= 0:  # every part collected: drop the parked tensors
            del _parked()[self.group]
        n = self.out_features
        return got[1][..., self.index * n: (self.index + 1) * n]

    def logical_params(self) -> int:
        return 0


def qkv_blocks(model: nn.Module) -> list[str]:
    """Modules holding plain ``query`` / ``key`` / ``value`` Linears of equal shape (BERT-style self-attention)."""
    out = []
    for name, mod in model.named_modules():
        lins = [mod._modules.get(k) for k in ("query", "key", "value")]
        if all(type(m) is nn.Linear for m in lins):
            shapes = {(m.in_features, m.out_features, m.bias is not None) for m in lins}  # type: ignore[union-attr]
            if len(shapes) == 1:
                out.append(name)
    return out


def fuse_block(model: nn.Module, name: str, **linear_args: Any) -> FusedQKV:
    """Swap ``name``'s query/key/value Linears for one FusedQKV and two QKVParts; returns the fused module."""
    blk = model.get_submodule(name)
    q, k, v = blk.query, blk.key, blk.value
    cat = nn.Linear(q.in_features, 3 * q.out_features, q.bias is not None)
    with torch.no_grad():
        cat.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if q.bias is not None:
            cat.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    fused = FusedQKV(q.in_features, q.out_features, q.bias is not None, group=name, **linear_args)
    fused.linear = Int8DynamicLinear.from_float(cat, **linear_args)
    prefix = f"{name}." if name else ""
    set_module(model, prefix + "query", fused)
    set_module(model, prefix + "key", QKVPart(name, 1, q.out_features))
    set_module(model, prefix + "value", QKVPart(name, 2, q.out_features))
    return fused


def unfuse_block(model: nn.Module, name: str, originals: tuple[nn.Module, nn.Module, nn.Module]) -> None:
    prefix = f"{name}." if name else ""
    for part, mod in zip(("query", "key", "value"), originals, strict=True):
        set_module(model, prefix + part, mod)


@torch.no_grad()
def check_fused(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> str | None:
    """Run one batch; None when every fused block handed over, else the error's first line."""
    _parked().clear()
    try:
        model(*batch)
    except UnsupportedLayerError as e:
        return str(e).splitlines()[0]
    finally:
        _parked().clear()
    return None
