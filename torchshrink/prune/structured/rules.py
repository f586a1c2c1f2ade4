"""How channel layouts flow through each op the tracer sees. A rule returns False when it cannot
say for sure; the tracer then blocks every space the op touches."""

from __future__ import annotations

import math
from typing import Any

import torch

_ELEMENTWISE = {
    "add", "sub", "mul", "div", "true_divide", "relu", "gelu", "silu", "sigmoid", "tanh", "hardswish",
    "hardsigmoid", "hardtanh", "relu6", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "clamp", "clip", "neg", "exp", "pow", "sqrt", "rsqrt", "abs", "erf", "where",
    "contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "detach", "softplus", "mish",
    "leaky_relu", "elu", "selu", "celu", "glu_", "log", "reciprocal", "square", "maximum", "minimum",
    "masked_fill", "threshold", "prelu_", "clamp_min", "clamp_max", "logsigmoid", "hardshrink", "sign",
    "floor", "ceil", "round", "requires_grad_", "copy_", "fill_", "zero_", "type", "cpu", "cuda",
}
_POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool2d_with_indices", "interpolate",
    "upsample", "pad", "lp_pool2d", "fractional_max_pool2d",
}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm", "prod", "nansum"}
_MIX_DIM = {"softmax", "log_softmax", "cumsum", "cumprod", "normalize", "argmax", "argmin"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel"}


def _norm(name: str) -> str:
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] in ("i", "r") and name[1:] in ("add", "sub", "mul", "truediv", "and", "or"):
            name = name[1:]
        return {"truediv": "div"}.get(name, name)
    if name.endswith("_") and not name.endswith("__") and name not in ("requires_grad_", "copy_", "fill_", "zero_"):
        return name[:-1]
    return name


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _dims(d: Any, ndim: int) -> list[int]:
    if d is None:
        return list(range(ndim))
    if isinstance(d, int):
        d = [d]
    return [x % ndim for x in d]


def apply_rule(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    g = tr.g
    name = _norm(name)
    if not isinstance(out, torch.Tensor) and name not in ("split", "chunk", "tensor_split", "unbind", "max", "min"):
        return False
    if name in _ELEMENTWISE:
        return _elementwise(tr, args, kwargs, out)
    if name == "linear":
        x, w = args[0], _arg(args, kwargs, 1, "weight")
        b = _arg(args, kwargs, 2, "bias")
        lx, wname = tr.layout(x), tr.names.get(id(w))
        if wname is None or w.dim() != 2:
            return False
        g.attach(wname, 1, lx[-1])
        lo = g.produce(wname, 0, w.shape[0])
        if b is not None:
            bname = tr.names.get(id(b))
            if bname is None:
                return False
            g.attach(bname, 0, lo)
        tr.set(out, [*lx[:-1], lo])
        return True
    if name in ("conv1d", "conv2d", "conv3d"):
        return _conv(tr, args, kwargs, out)
    if name == "batch_norm":
        x = args[0]
        lx = tr.layout(x)
        for i, key in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
            t = _arg(args, kwargs, i, key)
            if t is not None:
                n = tr.names.get(id(t))
                if n is None:
                    return False
                g.attach(n, 0, lx[1])
        tr.set(out, lx)
        return True
    if name in ("layer_norm", "group_norm"):
        x = args[0]
        lx = tr.layout(x)
        if name == "layer_norm":
            shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
            if len(shape) != 1:
                return False
            dim, w, b = x.dim() - 1, _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
            mixing = True
        else:
            groups, dim = int(_arg(args, kwargs, 1, "num_groups")), 1
            w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
            if groups not in (1, x.shape[1]):
                g.block(lx[1], f"GroupNorm with {groups} groups in {tr.where()}")
            mixing = groups == 1
        for t in (w, b):
            if t is not None:
                n = tr.names.get(id(t))
                if n is None:
                    return False
                g.attach(n, 0, lx[dim])
        if mixing:
            for s, _ in lx[dim]:
                g.space(s).mixing = True
        tr.set(out, lx)
        return True
    if name == "embedding":
        idx, w = args[0], args[1]
        wname = tr.names.get(id(w))
        if wname is None:
            return False
        g.attach(wname, 0, g.blocked_layout(w.shape[0]))
        tr.set(out, [*tr.layout(idx), g.produce(wname, 1, w.shape[1])])
        return True
    if name == "pad":
        return _pad(tr, args, kwargs, out)
    if name in _POOL:
        x = args[0]
        res = out[0] if isinstance(out, tuple) else out
        if x.dim() < 2 or res.dim() != x.dim() or res.shape[:2] != x.shape[:2]:
            return False
        lx = tr.layout(x)
        for lay in lx[2:]:  # channels-first ops: what sits in the spatial dims is never pruned through them
            g.block(lay, f"{name} over dims 2+ in {tr.where()}")
        tr.set(res, [lx[0], lx[1], *[g.blocked_layout(n) for n in res.shape[2:]]])
        return True
    if name in _REDUCE or name in _MIX_DIM:
        return _reduce(tr, name, args, kwargs, out)
    if name in _RESHAPE:
        return _reshape(tr, args[0], out)
    if name in ("permute", "transpose", "swapaxes", "t", "movedim"):
        x = args[0]
        lx = tr.layout(x)
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], list | tuple) else args[1:]
            dims = _dims(list(kwargs.get("dims", dims)), x.dim())
        elif name == "t":
            dims = [1, 0] if x.dim() == 2 else [0]
        elif name == "movedim":
            src = _dims(_arg(args, kwargs, 1, "source"), x.dim())
            dst = _dims(_arg(args, kwargs, 2, "destination"), x.dim())
            rest = iter(d for d in range(x.dim()) if d not in src)
            where = dict(zip(dst, src, strict=True))
            dims = [where[j] if j in where else next(rest) for j in range(x.dim())]
        else:
            a, b = _dims(args[1], x.dim())[0], _dims(args[2], x.dim())[0]
            dims = list(range(x.dim()))
            dims[a], dims[b] = dims[b], dims[a]
        tr.set(out, [lx[d] for d in dims])
        return True
    if name in ("cat", "concat", "concatenate"):
        ts = list(_arg(args, kwargs, 0, "tensors"))
        d = _dims(_arg(args, kwargs, 1, "dim", 0), out.dim())[0]
        ls = [tr.layout(t) for t in ts]
        res = []
        for j in range(out.dim()):
            if j == d:
                res.append(tuple(seg for lay in ls for seg in lay[j]))
            else:
                acc = ls[0][j]
                for lay in ls[1:]:
                    acc = g.unify(acc, lay[j], f"cat in {tr.where()}")
                res.append(acc)
        tr.set(out, res)
        return True
    if name in ("split", "chunk", "tensor_split", "unbind", "narrow", "getitem"):
        return _slice(tr, name, args, kwargs, out)
    if name in ("expand", "expand_as"):
        lx = tr.layout(args[0])
        off = out.dim() - len(lx)
        res = [g.blocked_layout(n) for n in out.shape[:off]]
        for j, lay in enumerate(lx):
            res.append(lay if args[0].shape[j] == out.shape[off + j] else g.blocked_layout(out.shape[off + j]))
        tr.set(out, res)
        return True
    return False


def _elementwise(tr: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    g = tr.g
    ins = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if any(t.dim() > out.dim() for t in ins):
        return False
    res = []
    for j in range(out.dim()):
        acc = None
        for t in ins:
            k = j - (out.dim() - t.dim())
            if k < 0 or t.shape[k] != out.shape[j] or out.shape[j] == 1:
                continue
            lay = tr.layout(t)[k]
            acc = lay if acc is None else g.unify(acc, lay, f"elementwise op in {tr.where()}")
        res.append(acc if acc is not None else g.blocked_layout(out.shape[j]))
    tr.set(out, res)
    return True


def _conv(tr: Any, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    g = tr.g
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    b = _arg(args, kwargs, 2, "bias")
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    wname = tr.names.get(id(w))
    bname = tr.names.get(id(b)) if b is not None else None
    if wname is None or (b is not None and bname is None) or x.dim() != w.dim():
        return False
    lx = tr.layout(x)
    cin, cout = x.shape[1], w.shape[0]
    if groups == 1:
        g.attach(wname, 1, lx[1])
        lo = g.produce(wname, 0, cout)
    elif groups == cin == cout and w.shape[1] == 1:  # depthwise: one channel space end to end
        lo = g.attach(wname, 0, lx[1])
        g.attach(wname, 1, g.blocked_layout(1))
    else:
        reason = f"grouped conv ({groups} groups) {wname}"
        g.block(lx[1], reason)
        lo = g.attach(wname, 0, g.blocked_layout(cout))
        g.block(lo, reason)
    if bname is not None:
        g.attach(bname, 0, lo)
    for d in range(2, w.dim()):
        g.attach(wname, d, g.blocked_layout(w.shape[d]))
    tr.set(out, [lx[0], lo, *[g.blocked_layout(n) for n in out.shape[2:]]])
    return True


def _reduce(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    g = tr.g
    x = args[0]
    lx = tr.layout(x)
    d = _arg(args, kwargs, 1, "dim")
    if isinstance(d, torch.Tensor) or (d is not None and not isinstance(d, int | list | tuple)):
        return False
    dims = _dims(d, x.dim())
    for k in dims:
        g.block(lx[k], f"{name} over dim {k} in {tr.where()}")
    res = out[0] if isinstance(out, tuple) else out
    if not isinstance(res, torch.Tensor):
        return False
    if res.shape == x.shape:
        tr.set(res, lx)
    else:
        keep = [lx[k] for k in range(x.dim()) if k not in dims]
        if len(keep) != res.dim():
            return False
        tr.set(res, keep)
    if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
        tr.set(out[1], [g.blocked_layout(n) for n in out[1].shape])
    return True


def _reshape(tr: Any, x: torch.Tensor, out: torch.Tensor) -> bool:
    g = tr.g
    lx = tr.layout(x)
    a = [(i, n) for i, n in enumerate(x.shape) if n != 1]
    b = [(j, n) for j, n in enumerate(out.shape) if n != 1]
    res: list[Any] = [None] * out.dim()
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pa, pb = [a[i][0]], [b[j][0]], a[i][1], b[j][1]
        while pa != pb:
            if pa < pb:
                i += 1
                gi.append(a[i][0])
                pa *= a[i][1]
            else:
                j += 1
                gj.append(b[j][0])
                pb *= b[j][1]
        i += 1
        j += 1
        if len(gi) == 1 and len(gj) == 1:
            res[gj[0]] = lx[gi[0]]
        elif len(gi) == 1 and _splits_off_inner(g, lx[gi[0]], math.prod(out.shape[k] for k in gj[1:])):
            inner = math.prod(out.shape[k] for k in gj[1:])  # unflatten of what flatten merged
            res[gj[0]] = tuple((s, k // inner) for s, k in lx[gi[0]])
            for k in gj[1:]:
                res[k] = g.blocked_layout(out.shape[k])
        elif len(gj) == 1 and all(g.is_blocked(lx[k]) for k in gi[1:]):
            inner = math.prod(x.shape[k] for k in gi[1:])
            first = lx[gi[0]]
            res[gj[0]] = first if g.is_blocked(first) else tuple((s, k * inner) for s, k in first)
        else:
            for k in gi:
                g.block(lx[k], f"reshape {tuple(x.shape)} -> {tuple(out.shape)} in {tr.where()}")
            for k in gj:
                res[k] = g.blocked_layout(out.shape[k])
    for k in range(out.dim()):
        if res[k] is None:
            res[k] = g.blocked_layout(out.shape[k])
    tr.set(out, res)
    return True


def _splits_off_inner(g: Any, lay: tuple, inner: int) -> bool:
    """A dim of channel segments each spanning a multiple of ``inner`` indices (a flatten of channels
    with blocked inner dims) splits back into (channels, inner) without cutting a channel."""
    return inner > 1 and all(k % inner == 0 for _, k in lay) and not g.is_blocked(lay)


def _pad(tr: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """``F.pad`` pads the LAST len(pad) // 2 dims, whatever the layout (channels-last included)."""
    g, x = tr.g, args[0]
    pad = list(_arg(args, kwargs, 1, "pad"))
    lx = tr.layout(x)
    if len(pad) % 2 or len(pad) // 2 > x.dim() or out.dim() != x.dim():
        return False
    res = list(lx)
    for i in range(len(pad) // 2):
        d = x.dim() - 1 - i
        if pad[2 * i] or pad[2 * i + 1]:
            g.block(lx[d], f"pad of dim {d} in {tr.where()}")
            res[d] = g.blocked_layout(out.shape[d])
    tr.set(out, res)
    return True


def _segment_range(g: Any, lay: tuple, start: int, stop: int) -> tuple | None:
    """The segments covering [start, stop) of a dim, or None when the range cuts a segment."""
    pos, segs = 0, []
    for s, k in lay:
        n = g.space(s).size * k
        if pos >= start and pos + n <= stop:
            segs.append((s, k))
        elif pos < stop and pos + n > start:
            return None
        pos += n
    return tuple(segs)


def _slice(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    g = tr.g
    x = args[0]
    lx = tr.layout(x)
    if name == "getitem":
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(i is Ellipsis for i in idx) or any(not isinstance(i, slice | int | type(None)) for i in idx):
            return False
        res, d = [], 0
        for i in idx:
            if i is None:
                res.append(g.blocked_layout(1))
                continue
            if isinstance(i, int):
                g.block(lx[d], f"indexing in {tr.where()}")
            elif i == slice(None):
                res.append(lx[d])
            else:
                start, stop, step = i.indices(x.shape[d])
                seg = _segment_range(g, lx[d], start, stop) if step == 1 else None
                if seg is None:
                    g.block(lx[d], f"slicing in {tr.where()}")
                    seg = g.blocked_layout(len(range(start, stop, step)))
                res.append(seg)
            d += 1
        res.extend(lx[d:])
        if not isinstance(out, torch.Tensor) or len(res) != out.dim():
            return False
        tr.set(out, res)
        return True
    outs = list(out) if isinstance(out, tuple | list) else [out]
    if name == "narrow":
        d = _dims(args[1], x.dim())[0]
    elif name == "unbind":
        d = _dims(_arg(args, kwargs, 1, "dim", 0), x.dim())[0]
        g.block(lx[d], f"unbind in {tr.where()}")
        for o in outs:
            tr.set(o, [lay for k, lay in enumerate(lx) if k != d])
        return True
    else:
        d = _dims(_arg(args, kwargs, 2, "dim", 0), x.dim())[0]
    starts = [int(args[2])] if name == "narrow" else []
    if name != "narrow":
        pos = 0
        for o in outs:
            starts.append(pos)
            pos += o.shape[d]
    for o, st in zip(outs, starts, strict=True):
        seg = _segment_range(g, lx[d], st, st + o.shape[d])
        if seg is None:
            g.block(lx[d], f"{name} in {tr.where()}")
            seg = g.blocked_layout(o.shape[d])
        tr.set(o, [seg if k == d else lay for k, lay in enumerate(lx)])
    return True
