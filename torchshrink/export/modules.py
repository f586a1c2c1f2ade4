"""How to rebuild a module from JSON: constructor arguments of torch built-ins, plus the
compressed modules that techniques register (``register_module``)."""

from __future__ import annotations

import functools
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
_deconv = _attrs("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups", "bias",
                 "dilation", "padding_mode")
_rnn = _attrs("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
for _cls, _fn in [
    (nn.Linear, _attrs("in_features", "out_features", "bias")),
    (nn.Conv1d, _conv),
    (nn.Conv2d, _conv),
    (nn.Conv3d, _conv),
    (nn.ConvTranspose1d, _deconv),
    (nn.ConvTranspose2d, _deconv),
    (nn.ConvTranspose3d, _deconv),
    (nn.BatchNorm1d, _bn),
    (nn.BatchNorm2d, _bn),
    (nn.BatchNorm3d, _bn),
    (nn.InstanceNorm1d, _bn),
    (nn.InstanceNorm2d, _bn),
    (nn.InstanceNorm3d, _bn),
    (nn.GRU, _rnn),
    (nn.LSTM, _attrs("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                     "proj_size")),
    (nn.RNN, _attrs("input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first", "dropout",
                    "bidirectional")),
    (nn.EmbeddingBag, _attrs("num_embeddings", "embedding_dim", "max_norm", "norm_type", "scale_grad_by_freq", "mode",
                             "include_last_offset", "padding_idx")),
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


def _packed_linear() -> type[nn.Module]:
    from torchshrink.llm.modules import PackedLinear

    return PackedLinear


# Types from optional libraries, registered on first use so importing torchshrink stays light.
_LAZY: dict[str, tuple[Callable[[], type[nn.Module]], Callable[[nn.Module], dict[str, Any]]]] = {
    "transformers.pytorch_utils.Conv1D": (_hf_conv1d, _attrs("nf", "nx")),
    "torchshrink.llm.modules.PackedLinear": (_packed_linear, lambda m: m.init_args()),
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


@functools.cache
def _torch_nn_classes() -> dict[str, type[nn.Module]]:
    """torch.nn's own module classes by qualified name (``torch.nn.modules.conv.Conv2d`` ...)."""
    import torch.nn as tnn

    return {type_name(c): c for c in vars(tnn).values()
            if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__.startswith("torch.nn.modules.")}


def rebuildable(tname: str) -> bool:
    _lazy_entry(tname)
    return tname in _BUILDERS or tname in _torch_nn_classes()


def _kwargs(tname: str, args: Any, torch_nn: bool) -> dict[str, Any]:
    """Keyword arguments from JSON. torch.nn classes get numbers, strings and flat lists only;
    torchshrink's own classes (which validate their arguments) may also take nested JSON."""
    if not isinstance(args, dict):
        raise ModelLoadError(f"constructor arguments of {tname} must be an object, got {type(args).__name__}")
    out = {}
    for k, v in args.items():
        if not k.isidentifier() or k.startswith("_") or (torch_nn and k in ("device", "dtype")):
            raise ModelLoadError(f"constructor argument {k[:40]!r} of {tname} is not allowed")
        if not torch_nn:
            out[k] = tuple(v) if isinstance(v, list) else v
            continue
        if isinstance(v, list) and not all(x is None or isinstance(x, bool | int | float | str) for x in v):
            raise ModelLoadError(f"constructor argument {k!r} of {tname} holds a nested value")
        if not (v is None or isinstance(v, bool | int | float | str | list)):
            raise ModelLoadError(f"constructor argument {k!r} of {tname} must be a number, string or list")
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def build_module(tname: str, args: dict[str, Any]) -> nn.Module:
    """A module of a registered torchshrink type or a torch.nn type, from its constructor arguments.
    Any other type name is refused: nothing is imported or called by name."""
    if not isinstance(tname, str) or not rebuildable(tname):
        raise ModelLoadError(
            f"cannot rebuild a module of type {str(tname)[:120]}: only torch.nn and registered torchshrink "
            "modules are rebuilt from a saved file"
        )
    cls = _BUILDERS[tname][0] if tname in _BUILDERS else _torch_nn_classes()[tname]
    kwargs = _kwargs(tname, args, tname not in _BUILDERS)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, OverflowError, KeyError, IndexError) as e:
        raise ModelLoadError(f"cannot rebuild a {cls.__name__} from the saved arguments ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
