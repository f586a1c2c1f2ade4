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

from torchshrink.core.data import Batch
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.core.surgery import set_module
from torchshrink.export.modules import register_module
from torchshrink.quant import kernels
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
def check_fused(model: nn.Module, batch: Batch) -> str | None:
    """Run one batch; None when every fused block handed over, else the error's first line."""
    _parked().clear()
    try:
        batch(model)
    except UnsupportedLayerError as e:
        return str(e).splitlines()[0]
    finally:
        _parked().clear()
    return None


# --------------------------------------------------------------------------- dense -> add -> LayerNorm


@register_module
class LinearAddNorm(nn.Module):
    """The tail of a post-LN transformer sub-block, ``LayerNorm(dense(x) + residual)`` (BERT's
    ``SelfOutput`` / ``Output``), on an INT8 dynamic ``dense``: after the integer GEMM, the per-row
    epilogue, the residual add and the LayerNorm run in one C sweep per row (``kernels.add_layernorm``)
    instead of three to four passes. Keeps the original's child names (``dense``, ``LayerNorm``) so the
    state dict is unchanged. Inference only: the block's dropout (identity in eval) is not kept."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-12,
                 **linear_args: Any) -> None:
        super().__init__()
        self.dense = Int8DynamicLinear(in_features, out_features, bias, **linear_args)
        self.LayerNorm = nn.LayerNorm(out_features, eps=eps)

    def init_args(self) -> dict[str, Any]:
        args = self.dense.init_args()
        args["eps"] = self.LayerNorm.eps
        return args

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        shape, dense, n = hidden_states.shape, self.dense, self.dense.out_features
        x2 = hidden_states.reshape(-1, shape[-1]).float()
        res = input_tensor.reshape(-1, n).float()
        if dense.kernel == "onednn" and dense.smooth is None and dense.post_op == "none":
            acc, grid = dense.gemm(x2.contiguous(), hidden_states)
            lin_bias = None if grid is None or dense.bias is None else dense.bias.float()
        else:
            acc, grid, lin_bias = dense(x2).contiguous(), None, None
        out = kernels.add_layernorm(acc, res, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                    grid, lin_bias)
        return out.reshape(*shape[:-1], n).to(hidden_states.dtype)

    def logical_params(self) -> int:
        return self.dense.logical_params() + sum(p.numel() for p in self.LayerNorm.parameters())

    def macs(self, args: tuple, output: Any) -> int:
        return self.dense.macs(args[:1], output)


def add_norm_blocks(model: nn.Module) -> list[str]:
    """Modules made of an INT8 dynamic ``dense``, an affine ``LayerNorm`` of its width and at most a
    ``dropout`` (BERT-family SelfOutput / Output naming) -- candidates for :class:`LinearAddNorm`."""
    out = []
    for name, mod in model.named_modules():
        kids = dict(mod.named_children())
        dense, norm = kids.pop("dense", None), kids.pop("LayerNorm", None)
        drop = kids.pop("dropout", None)
        if (type(dense) is Int8DynamicLinear and type(norm) is nn.LayerNorm and not kids
                and (drop is None or isinstance(drop, nn.Dropout)) and norm.elementwise_affine
                and norm.bias is not None and tuple(norm.normalized_shape) == (dense.out_features,)):
            out.append(name)
    return out


def first_calls(model: nn.Module, names: list[str], batch: Batch) -> dict[str, tuple[tuple, dict, Any]]:
    """(args, kwargs, output) of each named module's first call while ``model`` runs ``batch`` in eval mode."""
    seen: dict[str, tuple[tuple, dict, Any]] = {}
    hooks = []
    for n in names:
        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any, n: str = n) -> None:  # returns None: output kept
            seen.setdefault(n, (args, kwargs, out))
        hooks.append(model.get_submodule(n).register_forward_hook(hook, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        batch(model)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return seen


@torch.no_grad()
def fuse_add_norms(model: nn.Module, batch: Batch | None, rtol: float = 1e-4) -> tuple[list[str], dict[str, str]]:
    """Swap every :func:`add_norm_blocks` module for a :class:`LinearAddNorm` where, on ``batch``,
    the fused module called with the block's own inputs gives the block's output (within ``rtol`` of
    its largest magnitude) -- so a block that is not ``LayerNorm(dense(x) + residual)`` (pre-LN, no
    residual, another order) stays as it is. Returns (fused names, {skipped name: reason})."""
    names = add_norm_blocks(model)
    skipped: dict[str, str] = {}
    if not names:
        return [], skipped
    if batch is None:
        return [], dict.fromkeys(names, "no calibration batch to check the block's computation on")
    seen = first_calls(model, names, batch)
    fused = []
    for n in names:
        if n not in seen:
            skipped[n] = "not called by the calibration batch"
            continue
        args, kwargs, ref = seen[n]
        blk = model.get_submodule(n)
        cand = LinearAddNorm(**blk.dense.init_args(), eps=blk.LayerNorm.eps)
        cand.dense, cand.LayerNorm = blk.dense, blk.LayerNorm
        try:
            got = cand(*args, **kwargs)
        except (TypeError, RuntimeError, ValueError) as e:
            skipped[n] = f"its inputs do not fit LayerNorm(dense(x) + residual): {str(e).splitlines()[0]}"
            continue
        if not isinstance(ref, torch.Tensor) or got.shape != ref.shape:
            skipped[n] = "its output is not one tensor of the dense layer's shape"
            continue
        err = float((got - ref).abs().max())
        if err > rtol * max(float(ref.abs().max()), 1e-12):
            skipped[n] = f"it does not compute LayerNorm(dense(x) + residual) (max difference {err:.3g})"
            continue
        set_module(model, n, cand)
        fused.append(n)
    for n, why in skipped.items():
        log.info("dense + add + LayerNorm of %r not fused: %s", n, why)
    return fused, skipped


# --------------------------------------------------------------------------- code hand-over


def _takes_codes(m: nn.Module) -> Int8DynamicLinear | None:
    """The per-token oneDNN Linear that would quantize this module's first input, if any."""
    lin = m.dense if isinstance(m, LinearAddNorm) else m
    if (isinstance(lin, Int8DynamicLinear) and lin.kernel == "onednn" and lin.activation == "token"
            and lin.smooth is None and not (isinstance(m, LinearAddNorm) and lin.post_op != "none")):
        return lin
    return None


@torch.inference_mode()  # no version counters: a stale hand-over shows up as a changed output below
def link_codes(model: nn.Module, batch: Batch | None) -> tuple[list[str], str | None]:
    """Let each per-token oneDNN Linear whose output is read directly by another per-token layer (e.g.
    BERT's FFN input -> FFN output) write that layer's uint8 codes in its epilogue's sweep
    (``emit_codes``), so the output is not read again to be quantized. The pairs are found on
    ``batch`` by tensor identity; the model's output on the batch must stay bit-identical (checked in
    inference mode, where tensors have no version counter to catch an in-place change), or every
    link is undone. Returns (producer names, reason nothing was linked or None)."""
    if batch is None:
        return [], "no calibration batch to find the producer -> consumer pairs on"
    mods = dict(model.named_modules())
    producers = {n: m for n, m in mods.items() if _takes_codes(m) is m}  # the same layers can write codes
    consumers = {n: lin for n, m in mods.items() if (lin := _takes_codes(m)) is not None}
    consumers = {n: lin for n, lin in consumers.items() if not any(n.startswith(f"{p}.") for p in consumers if p != n)}
    if not producers or not consumers:
        return [], "no per-token oneDNN layers"
    outs: list[tuple[torch.Tensor, str]] = []
    pairs: dict[str, int] = {}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: outs.append((o, n))) for n in producers]

    def pre(m: nn.Module, args: tuple, n: str) -> None:
        for o, p in outs:
            if args and o is args[0] and p not in pairs:
                pairs[p] = consumers[n].qmax
    hooks += [mods[n].register_forward_pre_hook(lambda m, a, n=n: pre(m, a, n)) for n in consumers]
    was = model.training
    model.eval()
    try:
        ref = batch(model)
    finally:
        for h in hooks:
            h.remove()
    outs.clear()
    if not pairs:
        model.train(was)
        return [], "no layer reads another per-token layer's output directly"
    for p, qmax in pairs.items():
        producers[p].emit_codes = qmax
    try:
        got = batch(model)
    finally:
        model.train(was)
    same = all(torch.equal(a, b) for a, b in zip(_tensors(ref), _tensors(got), strict=True))
    if not same:
        for p in pairs:
            producers[p].emit_codes = 0
        return [], "the output changed with the hand-over"
    return sorted(pairs), None


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for x in out for t in _tensors(x)]
    return []
