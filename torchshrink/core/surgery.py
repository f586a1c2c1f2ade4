"""Module surgery: get or replace a submodule by its qualified name."""

from __future__ import annotations

import difflib

from torch import nn

from torchshrink.core.errors import LayerNotFoundError


def get_module(model: nn.Module, name: str) -> nn.Module:
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise LayerNotFoundError(f"no layer named {name!r} in {type(model).__name__}{hint}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``name`` with ``new``; returns the old module."""
    if not name:
        raise LayerNotFoundError("cannot replace the root module by name; pass a qualified layer name")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    old = get_module(model, name)
    if isinstance(parent, nn.ModuleList | nn.Sequential) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return get_module(model, parent_name), child
