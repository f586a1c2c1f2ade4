"""How to rebuild a module from JSON: constructor arguments of torch built-ins, plus the
compressed modules that techniques register (``register_module``)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from torchshrink.core.errors import ModelLoadError

# type name -> (class, init_args(module) -> dict)
_BUILDERS: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]]]] = {}


def type_name(module: nn.Module | type) -> str:
    cls = module if isinstance(module, type) else type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def register_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator for compressed modules. The class implements ``init_args() -> dict``
    (JSON-able) so that ``cls(**init_args())`` builds an empty module whose state dict has
    the same keys, shapes and dtypes; the saved tensors then fill it."""
    if not hasattr(cls, "init_args"):
        raise TypeError(f"{cls.__name__} must define init_args() to be saved and reloaded")
    _BUILDERS[type_name(cls)] = (cls, lambda m: m.init_args())
    return cls


def _attrs(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    def get(m: nn.Module) -> dict[str, Any]:
        out = {}
        for n in names:
            v = getattr(m, n)
            if n == "bias" and not isinstance(v, bool):
                v = v is not None
            if n == "elementwise_affine" and not isinstance(v, bool):
                v = bool(v)
            out[n] = list(v) if isinstance(v, tuple) else v
        return out

    return get


def _ln_args(m: nn.Module) -> dict[str, Any]:
    return {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": m.bias is not None,
    }


_conv = _attrs("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias", "padding_mode")
_bn = _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")
for _cls, _fn in [
    (nn.Linear, _attrs("in_features", "out_features", "bias")),
    (nn.Conv1d, _conv),
    (nn.Conv2d, _conv),
    (nn.BatchNorm1d, _bn),
    (nn.BatchNorm2d, _bn),
    (nn.LayerNorm, _ln_args),
    (nn.GroupNorm, _attrs("num_groups", "num_channels", "eps", "affine")),
    (nn.Embedding, _attrs("num_embeddings", "embedding_dim", "padding_idx")),
    (nn.Identity, lambda m: {}),
    (nn.Sequential, lambda m: {}),
    (nn.ModuleList, lambda m: {}),
    (nn.ModuleDict, lambda m: {}),
    (nn.Module, lambda m: {}),  # plain containers, e.g. the hierarchy torch.fx rebuilds
]:
    _BUILDERS[type_name(_cls)] = (_cls, _fn)


def _hf_conv1d() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


# Types from optional libraries, registered on first use so importing torchshrink stays light.
_LAZY: dict[str, tuple[Callable[[], type[nn.Module]], Callable[[nn.Module], dict[str, Any]]]] = {
    "transformers.pytorch_utils.Conv1D": (_hf_conv1d, _attrs("nf", "nx")),
}


def _lazy_entry(tname: str) -> None:
    if tname in _LAZY and tname not in _BUILDERS:
        get_cls, get_args = _LAZY[tname]
        _BUILDERS[tname] = (get_cls(), get_args)


def _generic_torch_args(m: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments of a parameter-free torch.nn module (activations, pooling, dropout,
    flatten, ...): every __init__ parameter must be readable as an attribute of the same name."""
    cls = type(m)
    if not cls.__module__.startswith("torch.nn.modules.") or any(True for _ in m.parameters(recurse=False)):
        return None
    out: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(m, name):
            if p.default is p.empty:
                return None
            continue
        v = getattr(m, name)
        if isinstance(v, tuple):
            v = list(v)
        if not (v is None or isinstance(v, bool | int | float | str | list)):
            return None
        out[name] = v
    return out


def init_args(module: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments for a rebuildable module, or None if torchshrink can't rebuild it."""
    _lazy_entry(type_name(module))
    entry = _BUILDERS.get(type_name(module))
    if entry is None:
        return _generic_torch_args(module)
    return entry[1](module)


def build_module(tname: str, args: dict[str, Any]) -> nn.Module:
    _lazy_entry(tname)
    entry = _BUILDERS.get(tname)
    if entry is None:
        # a registered technique module whose package was not imported yet
        mod_name = tname.rsplit(".", 1)[0]
        try:
            importlib.import_module(mod_name)
        except ImportError:
            pass
        entry = _BUILDERS.get(tname)
    if entry is None and tname.startswith("torch.nn.modules."):
        mod_name, _, cls_name = tname.rpartition(".")
        cls = getattr(importlib.import_module(mod_name), cls_name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    if entry is None:
        raise ModelLoadError(f"cannot rebuild a module of type {tname}: it is not a registered torchshrink module")
    cls = entry[0]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return cls(**kwargs)
