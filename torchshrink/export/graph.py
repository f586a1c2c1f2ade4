"""Safe JSON serialization of torch.fx graphs, so models that techniques rewrite with fx (fused,
statically quantized) save and reload like any other.

Loading builds the graph with the fx Graph API from validated pieces only; nothing from the file
is ever pasted into source text, imported or looked up by attribute walk:

- node names, placeholder names and keyword names must be plain Python identifiers;
- ``call_module`` / ``get_attr`` targets must name a submodule / parameter / buffer that the
  rebuilt module tree really has;
- ``call_function`` targets are looked up by exact name in :mod:`torchshrink.export.allowlist`;
  ``call_method`` targets must be listed tensor methods; ``getattr`` reads tensor metadata only;
- constants are JSON scalars, strings, slices, dtypes, devices and memory formats.

torch.fx then generates the forward from these checked parts (strings appear in it only through
``repr``)."""

from __future__ import annotations

import keyword
from typing import Any

import torch
from torch import fx, nn

from torchshrink.core.errors import ModelLoadError
from torchshrink.export.allowlist import IDENT, MODULE_PART, TENSOR_ATTRS, methods, name_of, resolve
from torchshrink.export.schema import DTYPES

MAX_NODES = 1_000_000
_OPS = ("placeholder", "output", "call_function", "call_module", "call_method", "get_attr")
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")}


class GraphSaveError(TypeError):
    pass


def _bad(msg: str) -> ModelLoadError:
    return ModelLoadError(f"saved graph refused: {msg}")


def _identifier(s: Any, what: str) -> str:
    if not isinstance(s, str) or not IDENT.match(s) or keyword.iskeyword(s) or s.startswith("__"):
        raise _bad(f"{what} {str(s)[:60]!r} is not a plain Python identifier")
    return s


def _module_path(root: nn.Module, s: Any, what: str, *, tensor_ok: bool) -> str:
    """A dotted path that names a real submodule (or, for get_attr, parameter/buffer) of ``root``."""
    if not isinstance(s, str) or not s:
        raise _bad(f"{what} target must be a non-empty string")
    parts = s.split(".")
    if not all(MODULE_PART.match(p) and not p.startswith("__") for p in parts):
        raise _bad(f"{what} target {s[:60]!r} is not a dotted path of module names")
    mod: nn.Module = root
    for i, p in enumerate(parts):
        child = mod._modules.get(p)
        if child is not None:
            mod = child
            continue
        last = i == len(parts) - 1
        if tensor_ok and last and (p in mod._parameters or p in mod._buffers):
            return s
        raise _bad(f"{what} target {s[:60]!r} names nothing in the saved module tree")
    return s


def _target_name(fn: Any) -> str:
    name = name_of(fn)
    if name is None:
        qual = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        raise GraphSaveError(f"cannot save a graph that calls {qual}: only listed tensor functions are saved "
                             "(torchshrink/export/allowlist.py)")
    return name


def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, dict):
        if not all(isinstance(k, str) for k in a):
            raise GraphSaveError("cannot serialize a graph dict argument with non-string keys")
        return {"dict": {k: _enc(v) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if a is Ellipsis:
        return {"ellipsis": True}
    if a is None or isinstance(a, bool | int | float | str):
        return a
    raise GraphSaveError(f"cannot serialize graph argument of type {type(a).__name__}")


def _dec(a: Any, env: dict[str, fx.Node], depth: int = 0) -> Any:
    if depth > 64:
        raise _bad("arguments nested deeper than 64 levels")
    if isinstance(a, list):
        return [_dec(x, env, depth + 1) for x in a]
    if a is None or isinstance(a, bool | int | float | str):
        return a
    if not isinstance(a, dict) or len(a) != 1:
        raise _bad(f"unknown graph argument {str(a)[:60]!r}")
    (tag, v), = a.items()
    if tag == "node":
        if not isinstance(v, str) or v not in env:
            raise _bad(f"argument refers to node {str(v)[:60]!r} before it is defined")
        return env[v]
    if tag == "tuple" and isinstance(v, list):
        return tuple(_dec(x, env, depth + 1) for x in v)
    if tag == "dict" and isinstance(v, dict):
        return {str(k): _dec(x, env, depth + 1) for k, x in v.items()}
    if tag == "slice" and isinstance(v, list) and len(v) == 3:
        return slice(*(_dec(x, env, depth + 1) for x in v))
    if tag == "dtype" and isinstance(v, str) and v in DTYPES:
        return DTYPES[v]
    if tag == "device" and isinstance(v, str) and len(v) < 32:
        try:
            return torch.device(v)
        except (RuntimeError, ValueError):
            raise _bad(f"unknown device {v!r}") from None
    if tag == "memory_format" and isinstance(v, str) and v in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[v]
    if tag == "ellipsis" and v is True:
        return Ellipsis
    raise _bad(f"unknown graph argument {str(a)[:60]!r}")


def graph_to_json(gm: fx.GraphModule) -> list[dict[str, Any]]:
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            target = _target_name(n.target)
            if n.target is getattr and not (len(n.args) == 2 and n.args[1] in TENSOR_ATTRS):
                raise GraphSaveError(f"cannot save a graph that reads attribute {n.args[1:]!r} with getattr; "
                                     f"allowed: {', '.join(sorted(TENSOR_ATTRS))}")
        else:
            target = n.target
        if n.op == "call_method" and target not in methods():
            raise GraphSaveError(f"cannot save a graph that calls method {target!r}: not a listed tensor method")
        nodes.append({"name": n.name, "op": n.op, "target": target, "args": _enc(n.args), "kwargs": _enc(n.kwargs)})
    return nodes


def graph_from_json(nodes: Any, root: nn.Module) -> fx.Graph:
    """Rebuild a graph over the module tree ``root`` (whose submodules the graph may call)."""
    if not isinstance(nodes, list) or len(nodes) > MAX_NODES:
        raise _bad(f"fx_graph must be a list of at most {MAX_NODES:,} nodes")
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    outputs = 0
    for spec in nodes:
        if not isinstance(spec, dict) or set(spec) != {"name", "op", "target", "args", "kwargs"}:
            raise _bad("each node must be an object with exactly name, op, target, args, kwargs")
        op, target, name = spec["op"], spec["target"], spec["name"]
        if op not in _OPS:
            raise _bad(f"unknown graph op {str(op)[:40]!r}; allowed: {', '.join(_OPS)}")
        _identifier(name, "node name")
        if name in env:
            raise _bad(f"node name {name!r} is used twice")
        args, kwargs = _dec(spec["args"], env), _dec(spec["kwargs"], env)
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise _bad(f"node {name!r}: args must be a list and kwargs an object")
        for k in kwargs:
            _identifier(k, "keyword argument")
        args = tuple(args)
        if op == "output":
            if len(args) != 1 or kwargs or outputs:
                raise _bad("the graph must have exactly one output node with one argument")
            g.output(args[0])
            outputs += 1
            continue
        if op == "placeholder":
            if not isinstance(target, str):
                raise _bad("placeholder target must be a string")
            _identifier(target.lstrip("*") if target.count("*") <= 2 else target, "placeholder")
            if len(args) > 1 or kwargs:
                raise _bad(f"placeholder {name!r} takes at most a default value")
        elif op == "call_function":
            fn = resolve(target)
            if fn is None:
                raise _bad(f"graph calls {str(target)[:80]!r}, which is not on torchshrink's allow-list")
            if fn is getattr and not (len(args) == 2 and args[1] in TENSOR_ATTRS and not kwargs):
                raise _bad(f"getattr may read only {', '.join(sorted(TENSOR_ATTRS))}")
            target = fn
        elif op == "call_method":
            if target not in methods():
                raise _bad(f"graph calls method {str(target)[:60]!r}, which is not a listed tensor method")
            if not args:
                raise _bad(f"method call {name!r} has no object")
        elif op == "call_module":
            _module_path(root, target, "call_module", tensor_ok=False)
        else:  # get_attr
            _module_path(root, target, "get_attr", tensor_ok=True)
        node = g.create_node(op, target, args, kwargs, name=name)
        env[name] = node
    if outputs != 1:
        raise _bad("the graph has no output node")
    return g
