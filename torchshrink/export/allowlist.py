"""What a saved torch.fx graph may call: exact names, each mapped to the one object it means.

A saved graph is data. Loading looks every call target up in this table by its full qualified name
(no attribute walk, no import): a name that is not listed is refused, and a listed name always means
the object recorded here. The lists hold pure tensor computations only:

- ``torch.NAME``: the ATen operators of the ``torch`` namespace (``torch._C._VariableFunctions``,
  generated from ATen's operator list) and the Python tensor functions of ``torch.functional``;
  ``torch.from_file`` (reads a path) is left out;
- ``torch.nn.functional.NAME``: the public functions of ``torch.nn.functional`` but its
  ``__torch_function__`` dispatch helpers;
- ``operator.NAME`` / ``math.NAME``: the arithmetic, comparison and indexing functions named below
  (never ``attrgetter`` / ``methodcaller`` / ``call``, which turn strings into calls);
- ``builtins.getattr`` with an attribute from :data:`TENSOR_ATTRS` only;
- ``torch.ops.NS.OP[.OVERLOAD]`` for the operator namespaces in :data:`OP_NAMESPACES`;
- ``torch._assert`` (fx's traceable assert: raises AssertionError, nothing else);
- the torchvision functions listed in ``_TORCHVISION`` (tensor functions its models call, kept as calls by fx).

Methods (``call_method`` nodes) must be in :data:`METHODS`: the tensor methods ATen generates, less
those that hand out raw memory or call back into Python.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import operator
import re
from typing import Any

import torch

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# one part of a module path (manifest module names, a graph's call_module / get_attr targets): an identifier that
# may hold '-' (torchvision's RegNet names its blocks "block1-0") or a number. Parts are looked up in the module
# dicts; fx writes a part that is no identifier as getattr(module, "part"), a quoted string, never as code
MODULE_PART = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_-]*|[0-9]+)\Z")

_OPERATOR = (
    "add sub mul truediv floordiv mod pow matmul neg pos abs invert not_ and_ or_ xor lshift rshift "
    "eq ne lt le gt ge getitem setitem contains is_ is_not truth index concat "
    "iadd isub imul itruediv ifloordiv imod ipow imatmul iand ior ixor ilshift irshift"
).split()
_MATH = (
    "sqrt ceil floor trunc exp log log2 log10 log1p expm1 pow sin cos tan asin acos atan atan2 sinh cosh "
    "tanh erf erfc fabs isfinite isnan isinf gcd prod fsum hypot copysign radians degrees"
).split()
_F_EXCLUDED = {"Optional", "boolean_dispatch", "handle_torch_function", "has_torch_function",
               "has_torch_function_unary", "has_torch_function_variadic", "assert_int_or_pair"}
_TORCH_EXCLUDED = {"from_file"}
# torchvision's pure tensor functions that its models call and that torch.fx keeps as calls (they are marked
# torch.fx.wrap): a traced ConvNeXt / EfficientNet / Swin / MViT holds them. Fixed names, looked up in the modules
# named here only when torchvision is installed; a saved graph picks among them, never names a module itself.
_TORCHVISION = {
    "torchvision.ops.stochastic_depth": ("stochastic_depth",),
    "torchvision.ops.drop_block": ("drop_block2d", "drop_block3d"),
    "torchvision.models.swin_transformer": ("_patch_merging_pad", "_get_relative_position_bias",
                                            "shifted_window_attention"),
    "torchvision.models.video.swin_transformer": ("_get_window_and_shift_size", "_get_relative_position_bias",
                                                  "_compute_pad_size_3d", "_compute_attention_mask_3d",
                                                  "shifted_window_attention_3d"),
    "torchvision.models.video.mvit": ("_unsqueeze", "_squeeze"),
}
# attributes a graph may read with getattr(x, NAME): tensor metadata, nothing that reaches code
TENSOR_ATTRS = frozenset(
    "shape dtype device ndim T mT H mH real imag data is_cuda is_sparse is_quantized layout requires_grad "
    "itemsize nbytes".split()
)
_METHOD_EXCLUDED = {"apply_", "map_", "map2_", "set_", "untyped_storage", "storage", "data_ptr",
                    "const_data_ptr", "record_stream", "share_memory_", "register_hook",
                    "register_post_accumulate_grad_hook", "retain_grad", "backward", "pin_memory",
                    "numpy", "tolist", "new_tensor", "is_shared", "storage_type", "resize_", "resize_as_"}
_PY_TENSOR_METHODS = ("split", "unflatten", "norm", "unique", "unique_consecutive", "stft", "istft", "lu",
                      "align_to", "refine_names", "rename", "type", "to", "size", "dim", "view", "reshape")
OP_NAMESPACES = ("aten", "quantized", "torchshrink")


@functools.cache
def _functions() -> dict[str, Any]:
    import builtins

    import torch.functional as tf
    import torch.nn.functional as F

    # torch._assert: fx's traceable assert (raises AssertionError when its condition is false; nothing else).
    # timm's models call it on input sizes, so their traced static-INT8 graphs hold it
    table: dict[str, Any] = {"builtins.getattr": builtins.getattr, "torch._assert": torch._assert}
    for n in _OPERATOR:
        if hasattr(operator, n):
            table[f"operator.{n}"] = getattr(operator, n)
    for n in _MATH:
        if hasattr(math, n):
            table[f"math.{n}"] = getattr(math, n)
    for n in dir(torch._C._VariableFunctions):
        if not n.startswith("_") and n not in _TORCH_EXCLUDED and callable(getattr(torch, n, None)):
            table[f"torch.{n}"] = getattr(torch, n)
    for n in tf.__all__:
        if callable(getattr(torch, n, None)):
            table[f"torch.{n}"] = getattr(torch, n)
    for n, obj in vars(F).items():
        if n.startswith("_") or n in _F_EXCLUDED or not callable(obj) or inspect.isclass(obj) or inspect.ismodule(obj):
            continue
        table[f"torch.nn.functional.{n}"] = obj
    if importlib.util.find_spec("torchvision") is not None:
        for mod, names in _TORCHVISION.items():
            module = importlib.import_module(mod)
            for n in names:
                table[f"{mod}.{n}"] = getattr(module, n)
    return table


@functools.cache
def _names() -> dict[int, str]:
    # several names may list one object (torch.relu and torch.nn.functional.relu are not, but
    # aliases exist): the first listed name is the one written
    out: dict[int, str] = {}
    for name, obj in _functions().items():
        out.setdefault(id(obj), name)
    return out


@functools.cache
def methods() -> frozenset[str]:
    base = {n for n in dir(torch._C.TensorBase) if not n.startswith("_")}
    return frozenset((base | set(_PY_TENSOR_METHODS)) - _METHOD_EXCLUDED)


def _op_overload(name: str) -> Any:
    parts = name.split(".")
    if len(parts) not in (4, 5) or parts[:2] != ["torch", "ops"] or parts[2] not in OP_NAMESPACES:
        return None
    if not all(IDENT.match(p) and not p.startswith("__") for p in parts[3:]):
        return None
    try:
        packet = getattr(getattr(torch.ops, parts[2]), parts[3])
        obj = getattr(packet, parts[4]) if len(parts) == 5 else packet
    except (AttributeError, RuntimeError):
        return None
    kinds = (torch._ops.OpOverloadPacket, torch._ops.OpOverload)
    return obj if isinstance(obj, kinds) else None


def resolve(name: Any) -> Any:
    """The allowed callable a saved graph names, or None when the name is not on the list."""
    if not isinstance(name, str):
        return None
    obj = _functions().get(name)
    if obj is not None:
        return obj
    return _op_overload(name) if name.startswith("torch.ops.") else None


def name_of(fn: Any) -> str | None:
    """The listed name of a callable, or None when the callable may not be saved."""
    name = _names().get(id(fn))
    if name is not None and _functions()[name] is fn:
        return name
    if isinstance(fn, torch._ops.OpOverloadPacket | torch._ops.OpOverload):
        ns, _, rest = fn._qualified_op_name.partition("::") if isinstance(fn, torch._ops.OpOverloadPacket) \
            else fn.name().partition("::")
        overload = getattr(fn, "_overloadname", None)
        cand = f"torch.ops.{ns}.{rest.split('.')[0]}" + (f".{overload}" if overload else "")
        return cand if _op_overload(cand) is fn else None
    return None
