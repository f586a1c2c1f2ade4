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


# nn.TransformerEncoderLayer's children that its inference fast path reads the weights of (handing them to one fused
# kernel) instead of calling them; its composite path calls them.
FAST_PATH_CHILDREN = frozenset({"linear1", "linear2", "norm1", "norm2"})


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
    if isinstance(parent, nn.TransformerEncoderLayer) and child in FAST_PATH_CHILDREN and type(new) is not type(old):
        composite_path(model, parent)
    return old


def composite_path(model: nn.Module, layer: nn.TransformerEncoderLayer) -> None:
    """Make ``layer`` (and the nn.TransformerEncoder holding it) run their composite path, which calls linear1 /
    linear2 / norm1 / norm2, instead of the fused inference kernel that reads their weights and bypasses them: a
    compressed module swapped in there would crash the fast path or be skipped by it. Both fast paths are switched
    off through the attributes torch checks before reading any weight (``activation_relu_or_gelu``,
    ``use_nested_tensor``: plain attributes, so a saved model keeps them). Same math, no fused kernel."""
    from torchshrink.core.report import current

    layer.activation_relu_or_gelu = 0
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(sub is layer for sub in m.layers):
            m.use_nested_tensor = False
    current(model).notes["composite_path"] = (
        "nn.TransformerEncoderLayer runs torch's composite path (its fused inference kernel would bypass the "
        "compressed layers): the same math; with a src_key_padding_mask, outputs at padded positions are computed "
        "rather than zeroed as torch's nested-tensor path leaves them")


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return get_module(model, parent_name), child
