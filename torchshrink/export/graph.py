"""Safe JSON serialization of torch.fx graphs, so models that techniques rewrite with fx (fused,
statically quantized) save and reload like any other. Loading resolves call targets only inside an
allow-list of modules (torch, operator, math, builtins.getattr) — no pickle, no exec of saved code."""

from __future__ import annotations

import builtins
import importlib
import math
import operator
from typing import Any

import torch
from torch import fx

from torchshrink.core.errors import ModelLoadError

_ALLOWED_PREFIXES = ("torch", "operator", "_operator", "math")
_ALLOWED_BUILTINS = {"getattr": builtins.getattr}


def _target_name(fn: Any) -> str:
    if fn in _ALLOWED_BUILTINS.values():
        return f"builtins.{fn.__name__}"
    mod = getattr(fn, "__module__", None) or ""
    if fn in vars(operator).values() and callable(fn):
        return f"operator.{fn.__name__}"
    if fn in vars(math).values() and callable(fn):
        return f"math.{fn.__name__}"
    short = getattr(fn, "__name__", None)
    # torch functions report modules like torch._C._nn; prefer a public path that resolves to them
    for public in ("torch", "torch.nn.functional", "torch.Tensor"):
        if short and _resolve_path(f"{public}.{short}", strict=False) is fn:
            return f"{public}.{short}"
    return f"{mod}.{getattr(fn, '__qualname__', short)}"


def _resolve_path(path: str, strict: bool = True) -> Any:
    if path.startswith("builtins."):
        fn = _ALLOWED_BUILTINS.get(path.split(".", 1)[1])
        if fn is None and strict:
            raise ModelLoadError(f"saved graph calls {path}, which is not on torchshrink's allow-list")
        return fn
    if not path.startswith(tuple(p + "." for p in _ALLOWED_PREFIXES)):
        if strict:
            raise ModelLoadError(f"saved graph calls {path}, which is not on torchshrink's allow-list")
        return None
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    if strict:
        raise ModelLoadError(f"saved graph calls {path}, which this torch does not have")
    return None


def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, dict):
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
    raise TypeError(f"cannot serialize graph argument of type {type(a).__name__}")


def _dec(a: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_dec(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    if "node" in a:
        return env[a["node"]]
    if "tuple" in a:
        return tuple(_dec(x, env) for x in a["tuple"])
    if "dict" in a:
        return {k: _dec(v, env) for k, v in a["dict"].items()}
    if "slice" in a:
        return slice(*(_dec(x, env) for x in a["slice"]))
    if "dtype" in a:
        return getattr(torch, a["dtype"])
    if "device" in a:
        return torch.device(a["device"])
    if "memory_format" in a:
        return getattr(torch, a["memory_format"])
    if "ellipsis" in a:
        return Ellipsis
    raise ModelLoadError(f"unknown graph argument {a!r}")


def graph_to_json(gm: fx.GraphModule) -> list[dict[str, Any]]:
    nodes = []
    for n in gm.graph.nodes:
        target = _target_name(n.target) if n.op == "call_function" else n.target
        nodes.append({"name": n.name, "op": n.op, "target": target, "args": _enc(n.args), "kwargs": _enc(n.kwargs)})
    return nodes


def graph_from_json(nodes: list[dict[str, Any]]) -> fx.Graph:
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for spec in nodes:
        op, target = spec["op"], spec["target"]
        args, kwargs = _dec(spec["args"], env), _dec(spec["kwargs"], env)
        if op == "placeholder":
            node = g.placeholder(target)
        elif op == "output":
            g.output(args[0])
            continue
        elif op == "call_function":
            node = g.call_function(_resolve_path(target), tuple(args), kwargs)
        elif op == "call_module":
            node = g.call_module(target, tuple(args), kwargs)
        elif op == "call_method":
            node = g.call_method(target, tuple(args), kwargs)
        elif op == "get_attr":
            node = g.get_attr(target)
        else:
            raise ModelLoadError(f"unknown graph op {op!r}")
        node.name = spec["name"]
        env[spec["name"]] = node
    return g
