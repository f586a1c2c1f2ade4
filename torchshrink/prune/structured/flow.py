"""Transformer units found from data flow, not from names or width guesses.

Each projection ``P`` of a layer (a Linear or HF Conv1D) is probed: the model runs on the check batch
with one output channel ``j`` of ``P`` pushed far from its value, and every other projection of the
layer records which of its input channels changed. What reaches a consumer ``C`` tells the unit:

- ``C``'s input changes at channel ``j`` only: ``P`` feeds ``C`` channel by channel (an FFN's up/gate
  projection and its down projection; an attention's value and output projections).
- a whole aligned block of ``d`` channels changes: ``P`` feeds one attention head of width ``d``
  (query and key: a changed score moves the whole head's output); a block of ``g * d`` channels is a
  key shared by ``g`` query heads (grouped-query attention), and ``g`` channels ``d`` apart a shared value.
- a producer whose push also changes the input of another producer of ``C`` reaches ``C`` only
  through it (e.g. through the residual stream) and is not a direct producer.

A consumer with query/key blocks and a value is an attention (a producer whose thirds behave as
query, key and value is a fused ``[q | k | v]`` projection); a consumer fed only channel by channel is
an FFN. Any other layout refuses with the projection's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.prune.structured.trace import call_model
from torchshrink.prune.structured.transformer import (
    Attention,
    find_attentions,
    guess_ffn,
    in_features,
    is_proj,
    out_features,
)


def _projs(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in layer.named_modules() if is_proj(m)]


def _push(j: int) -> Any:
    """A forward hook moving output channel ``j`` far from its value, by a different amount per token
    (a constant shift of a key is lost in the softmax), on the module's first call only."""
    calls = [0]

    def hook(mod: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
        calls[0] += 1
        if calls[0] > 1:
            return None
        y = y.clone()
        noise = torch.randn(y[..., j].shape, generator=torch.Generator().manual_seed(j))
        y[..., j] += (1 + 4 * y.detach().abs().amax().item()) * noise.to(y.dtype)
        return y
    return hook


def probe(model: nn.Module, layer: nn.Module, batch: Any) -> dict[tuple[str, str], list[torch.Tensor]]:
    """{(producer, consumer): [changed input channels of the consumer, per probed producer channel]},
    relative names within ``layer``; only pairs where something changed."""
    projs = _projs(layer)
    seen: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:  # first call only: a shared layer runs again
            if name not in seen:
                seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in projs]
    was = model.training
    model.eval()
    out: dict[tuple[str, str], list[torch.Tensor]] = {}
    try:
        with torch.no_grad():
            call_model(model, batch)
            base = dict(seen)
            for pname, p in projs:
                n = out_features(p)
                for j in _probed(n):
                    seen.clear()
                    h = p.register_forward_hook(_push(j))
                    try:
                        call_model(model, batch)
                    finally:
                        h.remove()
                    for cname, x in seen.items():
                        b = base.get(cname)
                        if cname == pname or b is None or b.shape != x.shape:
                            continue
                        tol = 1e-5 * (b.abs().amax().item() + 1e-3)
                        out.setdefault((pname, cname), []).append(((x - b).abs().amax(0) > tol).nonzero().flatten())
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {k: v for k, v in out.items() if any(len(c) for c in v)}


def _probed(n: int) -> list[int]:
    """The output channels probed of a projection with ``n`` outputs (the start of each third)."""
    return sorted({0, n // 3, 2 * n // 3})


def _identity(results: list[torch.Tensor], n: int) -> bool:
    """Channel ``j`` of the producer reached channel ``j`` of the consumer and nothing else (a probe that
    changed nothing, e.g. a dead ReLU unit, says nothing)."""
    js = _probed(n)
    return len(results) == len(js) and any(len(c) for c in results) and \
        all(len(c) == 0 or (len(c) == 1 and int(c[0]) == j) for j, c in zip(js, results, strict=True))


def _role(changed: torch.Tensor) -> tuple[str, int]:
    """('point' | 'block' | 'strided' | 'none', size) of one probe's changed channels."""
    k = len(changed)
    if k == 0:
        return "none", 0
    if k == 1:
        return "point", 1
    lo = int(changed[0])
    if int(changed[-1]) - lo + 1 == k and lo % k == 0:
        return "block", k
    return "strided", k


@dataclasses.dataclass
class FlowAttention:
    q: str | None
    k: str | None
    v: str | None
    o: str
    fused: str | None
    head_dim: int


@dataclasses.dataclass
class FlowFfn:
    ups: list[str]
    downs: list[str]


@dataclasses.dataclass
class Units:
    attentions: list[FlowAttention]
    ffns: list[FlowFfn]
    problems: list[str]  # attentions found but not in a layout head-prune follows, one line each


def units(layer: nn.Module, links: dict[tuple[str, str], list[torch.Tensor]]) -> Units:
    """Attentions and FFNs of ``layer`` from its probe results."""
    mods = dict(_projs(layer))
    atts: list[FlowAttention] = []
    problems: list[str] = []
    ffns: dict[tuple[str, ...], list[str]] = {}
    for c in mods:
        cand = [p for (p, cc) in links if cc == c]
        direct = [p for p in cand if not any((p, q) in links for q in cand if q != p)]
        if not direct:
            continue
        roles = {p: [_role(x) for x in links[(p, c)]] for p in direct}
        blocks = [s for p in direct for r, s in roles[p] if r == "block"]
        values = [p for p in direct if any(r in ("point", "strided") for r, _ in roles[p])]
        if blocks and not values:  # fed through a norm or a residual sum, not a unit
            continue
        if not blocks:
            if all(_identity(links[(p, c)], out_features(mods[p])) and out_features(mods[p]) == in_features(mods[c]) for p in direct):
                ffns.setdefault(tuple(sorted(direct)), []).append(c)
            continue
        d = min(blocks)
        try:
            atts.append(_attention(c, direct, roles, {p: links[(p, c)] for p in direct}, d, mods))
        except UnsupportedLayerError as e:
            problems.append(str(e))
    return Units(atts, [FlowFfn(list(u), downs) for u, downs in ffns.items()], problems)


def _is_key(name: str) -> bool:
    leaf = name.rpartition(".")[2].lower()
    return leaf in ("k", "key", "k_proj", "k_lin")


def _attention(c: str, direct: list[str], roles: dict[str, list[tuple[str, int]]],
               links_of: dict[str, list[torch.Tensor]], d: int, mods: dict[str, nn.Module]) -> FlowAttention:
    width = in_features(mods[c])
    q = k = v = fused = None
    for p in direct:  # in registration order: the first of two same-sized head blocks is the query
        kinds = [r for r, _ in roles[p] if r != "none"]
        sizes = {s for r, s in roles[p] if r == "block"}
        if kinds == ["block", "block", "point"] and out_features(mods[p]) == 3 * width:
            firsts = [int(x[0]) for x in links_of[p]]
            if firsts != [0, 0, 0]:  # q, k of head 0 and value channel 0 when the thirds are [q | k | v]
                raise UnsupportedLayerError(
                    f"fused projection '{p}' interleaves q/k/v per head; head-prune follows only [q | k | v]")
            fused = p
        elif kinds and all(r == "block" for r in kinds) and len(sizes) == 1:
            if sizes == {d} and q is None and out_features(mods[p]) == width:
                q = p
            elif k is None:
                k = p
            else:
                q = q or p
            if q and k and out_features(mods[q]) == out_features(mods[k]) and _is_key(q) and not _is_key(k):
                q, k = k, q  # the same flow either way; names only order the pair (OPT registers k first)
        elif kinds and all(r in ("point", "strided") for r in kinds) and v is None:
            v = p
        else:
            raise UnsupportedLayerError(
                f"projection '{p}' feeds attention output '{c}' in a layout head-prune does not follow "
                "(only separate q/k/v or a fused [q | k | v] projection)")
    if fused is None and not (q and k and v):
        raise UnsupportedLayerError(f"attention output '{c}' has no query, key and value projections by data flow")
    if width % d:
        raise UnsupportedLayerError(f"attention output '{c}': {width} inputs are not whole heads of {d}")
    return FlowAttention(q, k, v, c, fused, d)


def layer_units(model: nn.Module, layers: list[nn.Module], batch: Any) -> dict[int, Units]:
    """Units of each layer (by ``id``), probing once per layout (relative names, types and shapes)."""
    cache: dict[tuple, Units] = {}
    out = {}
    for layer in layers:
        sig = tuple((n, type(m).__name__, tuple(m.weight.shape)) for n, m in _projs(layer))
        if sig not in cache:
            cache[sig] = units(layer, probe(model, layer, batch))
        out[id(layer)] = cache[sig]
    return out


def _owner(layer: nn.Module, names: list[str]) -> nn.Module:
    """The innermost module holding all ``names`` (a lone fused projection: its parent)."""
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return layer.get_submodule(".".join(common)) if common else layer


def to_attention(layer: nn.Module, fa: FlowAttention) -> Any:
    """A :class:`~torchshrink.prune.structured.transformer.Attention` from a flow-found one."""
    get = layer.get_submodule
    o = get(fa.o)
    heads = in_features(o) // fa.head_dim
    owner = _owner(layer, [n for n in (fa.q, fa.k, fa.v, fa.fused) if n])
    kv = out_features(get(fa.v)) // fa.head_dim if fa.v else heads
    for a in ("num_attention_heads", "num_heads", "n_heads"):
        n = getattr(owner, a, None)
        if isinstance(n, int) and not isinstance(n, bool) and n != heads:
            raise UnsupportedLayerError(f"attention '{fa.o}': its module says {a}={n}, its data flow {heads} heads")
    return Attention(owner, fa.q and get(fa.q), fa.k and get(fa.k), fa.v and get(fa.v), o,
                     fa.fused and get(fa.fused), heads, kv, fa.head_dim)


def layer_attentions(model: nn.Module, layers: list[nn.Module], batch: Any) -> list[list[Any]]:
    """The attentions of each layer, by data flow on ``batch``; by projection names without one."""
    if batch is None:
        return [find_attentions(layer) for layer in layers]
    found = layer_units(model, layers, batch)
    out = []
    for layer in layers:
        u = found[id(layer)]
        if u.problems:
            raise UnsupportedLayerError(u.problems[0])
        if not u.attentions:
            raise UnsupportedLayerError(f"no attention (query/key/value feeding an output projection) found by data "
                                        f"flow in {type(layer).__name__}")
        out.append([to_attention(layer, a) for a in u.attentions])
    return out


def layer_ffns(model: nn.Module, prefix: str, layers: list[nn.Module], batch: Any
               ) -> list[tuple[list[nn.Module], list[nn.Module]]]:
    """(up projections, down projections) of each FFN of each layer, by data flow on ``batch``; by
    widths and names without one."""
    if batch is None:
        return [guess_ffn(model, prefix, layer) for layer in layers]
    found = layer_units(model, layers, batch)
    out = []
    for layer in layers:
        ffns = found[id(layer)].ffns
        if not ffns:
            raise UnsupportedLayerError(f"no FFN (projections feeding another channel by channel) found by data "
                                        f"flow in {type(layer).__name__}")
        out.extend(([layer.get_submodule(n) for n in f.ups], [layer.get_submodule(n) for n in f.downs]) for f in ffns)
    return out
