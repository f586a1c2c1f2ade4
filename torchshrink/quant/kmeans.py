"""Weight sharing by k-means (Deep Compression, Han et al. 2016): each selected layer's weights
are replaced by ``2**bits`` shared centroids and a code per weight. Pruned zeros stay exactly zero
(code 0 is pinned to 0.0). Centroids are trainable: the gather's backward sums the gradients of
all weights in a cluster, which is the paper's centroid fine-tuning. Codes are saved entropy-coded
(relative-index streams in the compact container, see ``quant/entropy.py``).

Before clustering, a BatchNorm that directly follows a selected conv in a ``Sequential`` is folded
into it (``fold_bn``), so its four vectors do not cost bytes of their own; after fine-tuning,
centroids and biases are rounded to float16 (``half_params``) and stored in 2 bytes each, and
units that no later layer reads lose their incoming weights (``drop_dead``, see ``dead.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core import state
from torchshrink.core.config import Config, check_range, register
from torchshrink.core.select import Select, config_for, select_modules
from torchshrink.core.surgery import get_module, set_module
from torchshrink.export.modules import register_module


def kmeans_1d(values: torch.Tensor, k: int, *, init: str = "linear", iters: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars. Returns (centroids[k], assignment per value).

    ``linear`` initialization spreads centroids evenly over [min, max], which the paper found best
    because it keeps the rare large weights represented; ``density`` uses quantiles; ``random``
    samples values.
    """
    v = values.detach().double().reshape(-1)
    k = max(1, min(k, v.numel()))
    if init == "linear":
        c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    elif init == "density":
        c = torch.quantile(v, torch.linspace(0, 1, k, dtype=torch.float64))
    else:
        g = torch.Generator().manual_seed(seed)
        c = v[torch.randperm(v.numel(), generator=g)[:k]].clone()
    for _ in range(iters):
        idx = torch.bucketize(v, (c[1:] + c[:-1]) / 2) if k > 1 else torch.zeros_like(v, dtype=torch.long)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, v)
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, torch.ones_like(v))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        new, _ = torch.sort(new)
        if torch.allclose(new, c):
            c = new
            break
        c = new
    idx = torch.bucketize(v, (c[1:] + c[:-1]) / 2) if k > 1 else torch.zeros_like(v, dtype=torch.long)
    return c.float(), idx


@register_module
class ClusteredLayer(nn.Module):
    """A Linear or Conv2d whose weight is ``centroids[codes]``; code 0 means an exact zero."""

    def __init__(self, op: str = "linear", shape: tuple[int, ...] = (1, 1), k: int = 2, has_bias: bool = True,
                 conv: dict[str, Any] | None = None, bits: int = 1, zero_code: bool = False) -> None:
        super().__init__()
        self.op, self.shape, self.k, self.bits = op, tuple(shape), int(k), int(bits)
        self.conv = dict(conv or {})
        self.centroids = nn.Parameter(torch.zeros(self.k))
        self.register_buffer("codes", torch.zeros(self.shape, dtype=torch.uint8 if self.k <= 256 else torch.int16))
        self.zero_code = bool(zero_code)  # code 0 is pinned to an exact zero (pruned weights)
        live = torch.ones(self.k)
        live[0] = 0.0 if self.zero_code else 1.0
        self.register_buffer("live", live, persistent=False)
        self.bias = nn.Parameter(torch.zeros(self.shape[0])) if has_bias else None
        state.put(self, formats={"codes": "relidx", "centroids": "half-exact", "bias": "half-exact"})
        self._cache: torch.Tensor | None = None

    def init_args(self) -> dict[str, Any]:
        return {"op": self.op, "shape": list(self.shape), "k": self.k, "has_bias": self.bias is not None,
                "conv": self.conv, "bits": self.bits, "zero_code": self.zero_code}

    @classmethod
    def from_layer(cls, layer: nn.Module, bits: int, init: str, keep_zeros: bool, iters: int) -> ClusteredLayer:
        w = layer.weight.detach()
        op = "linear" if isinstance(layer, nn.Linear) else "conv2d"
        conv = {} if op == "linear" else {"stride": list(layer.stride), "padding": list(layer.padding),
                                         "dilation": list(layer.dilation), "groups": layer.groups}
        k = 2 ** bits
        flat = w.reshape(-1)
        zero = flat == 0
        m = cls(op, tuple(w.shape), k, layer.bias is not None, conv, bits, zero_code=keep_zeros and bool(zero.any()))
        codes = torch.zeros(flat.numel(), dtype=torch.long)
        cents = torch.zeros(k)
        if keep_zeros and bool(zero.any()):
            c, idx = kmeans_1d(flat[~zero], k - 1, init=init, iters=iters)
            cents[1:1 + c.numel()] = c
            codes[~zero] = idx + 1
        else:
            c, idx = kmeans_1d(flat, k, init=init, iters=iters)
            cents[: c.numel()] = c
            codes = idx
        with torch.no_grad():
            m.centroids.copy_(cents)
            m.codes.copy_(codes.reshape(w.shape).to(m.codes.dtype))
            if layer.bias is not None:
                m.bias.copy_(layer.bias.detach())
        return m

    def weight_tensor(self) -> torch.Tensor:
        return (self.centroids * self.live)[self.codes.long()]

    def train(self, mode: bool = True) -> ClusteredLayer:
        self._cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            w = self.weight_tensor()
        else:  # inference: decode the shared weights once
            if self._cache is None:
                self._cache = self.weight_tensor().detach()
            w = self._cache
        if self.op == "linear":
            return F.linear(x, w, self.bias)
        c = self.conv
        return F.conv2d(x, w, self.bias, tuple(c["stride"]), tuple(c["padding"]), tuple(c["dilation"]), c["groups"])

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def logical_params(self) -> int:
        return int(self.codes.numel()) + (self.bias.numel() if self.bias is not None else 0)

    def logical_nonzero(self) -> int:
        w = self.weight_tensor().detach()
        return int(torch.count_nonzero(w)) + (int(torch.count_nonzero(self.bias)) if self.bias is not None else 0)


def fold_batchnorms(model: nn.Module, conv_names: set[str]) -> list[str]:
    """Fold each eval-mode BatchNorm2d that directly follows one of ``conv_names`` inside a
    ``Sequential`` into that conv (replacing the BN by Identity). Returns the folded conv names."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = []
    for parent_name, parent in list(model.named_modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        kids = list(parent._modules.items())
        for (cname, conv), (bname, bn) in itertools.pairwise(kids):
            full = f"{parent_name}.{cname}" if parent_name else cname
            if (full in conv_names and type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d
                    and bn.track_running_stats and bn.running_mean is not None):
                parent._modules[cname] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                parent._modules[bname] = nn.Identity()
                folded.append(full)
    return folded


def apply_kmeans(model: nn.Module, config: KMeansConfig, *, select: Select | None = None, data: Any = None, **_: Any) -> nn.Module:
    chosen = select_modules(model, select, ("Linear", "Conv2d"), replaces=True)
    if config.fold_bn and fold_batchnorms(model, {n for n, m in chosen if isinstance(m, nn.Conv2d)}):
        chosen = [(n, get_module(model, n)) for n, _ in chosen]
    for name, layer in chosen:
        cfg = config_for(name, config, select)
        bits = cfg.bits if isinstance(layer, nn.Linear) else (cfg.conv_bits or cfg.bits)
        set_module(model, name, ClusteredLayer.from_layer(layer, bits, cfg.init, cfg.keep_zeros, cfg.iters))
    return model


def finalize_kmeans(model: nn.Module, config: KMeansConfig) -> nn.Module:
    if config.drop_dead:
        from torchshrink.quant.dead_units import zero_dead_units

        zero_dead_units(model)
    for m in model.modules():
        if isinstance(m, ClusteredLayer):
            m._cache = None
            if config.half_params:  # values float16 holds exactly, so the file stores 2 bytes each
                with torch.no_grad():
                    for p in (m.centroids, m.bias):
                        if p is not None:
                            p.copy_(p.half().float())
    return model


@dataclasses.dataclass(frozen=True, kw_only=True)
class KMeansConfig(Config):
    """k-means weight sharing: ``bits`` per code for Linear (Deep Compression used 5 for FC layers),
    ``conv_bits`` for Conv2d (8 in the paper; default: same as ``bits``). ``fold_bn`` folds a
    BatchNorm that follows a clustered conv into it first; ``half_params`` rounds centroids and
    biases to float16 values at the end (stored in 2 bytes each); ``drop_dead`` then zeroes the
    incoming weights of units whose outgoing weights are all zero (outputs unchanged)."""

    kind = "kmeans"
    family = "quantize"
    bits: int = 5
    conv_bits: int | None = None
    init: Literal["linear", "density", "random"] = "linear"
    keep_zeros: bool = True
    iters: int = 30
    fold_bn: bool = True
    half_params: bool = True
    drop_dead: bool = True

    def validate(self) -> None:
        check_range("kmeans.bits", self.bits, 1, 8)
        if self.conv_bits is not None:
            check_range("kmeans.conv_bits", self.conv_bits, 1, 8)
        check_range("kmeans.iters", self.iters, 1, 1000)


register(KMeansConfig, apply_kmeans, finalize=finalize_kmeans)
