"""Everything torchshrink keeps on a model or on one of its modules, in ONE attribute (``_torchshrink``)
holding a :class:`State`: typed, documented here, copied with the module by ``copy.deepcopy``.

Read with :func:`get`, write with :func:`put`; nothing else in torchshrink sets attributes on a
user's modules. A handler that returns a new module (a traced graph, a student) hands the model-level
fields over with :func:`inherit` (``ts.prepare`` / ``ts.finalize`` do it for every kind).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

ATTR = "_torchshrink"


@dataclasses.dataclass
class State:
    # --- on a model
    source: str | None = None  # the spec it was built from: "zoo:digits-cnn", "torchvision:resnet18", a folder
    input: dict[str, Any] | None = None  # the example input it declares ({"shape", "dtype"} or tokens)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # applied configs, oldest first
    recipe: Any = None  # the recipe a saved model was made with
    reports: list[Any] = dataclasses.field(default_factory=list)  # core.report.Report per applied kind
    pending: list[Any] = dataclasses.field(default_factory=list)  # configs prepared and not yet finalized
    prune_applied: Any = None  # the sparsity target the unstructured masks were last cut to
    student: dict[str, Any] | None = None  # how a distillation student was made from its teacher
    # --- on a module
    prune: dict[str, Any] | None = None  # unstructured-prune settings the module's mask is held with
    formats: dict[str, str] | None = None  # tensor name -> storage format the exporter must use
    lowrank: str | None = None  # on a factorized Sequential torchshrink made: its method (svd, tucker2, ...)
    fused_from: str | None = None  # on a fused module torchshrink made: the user's layers it replaces (conv1+bn1+relu)


FIELDS = tuple(f.name for f in dataclasses.fields(State))
# what a new module that replaces a model (a traced graph, a student) takes over from it
MODEL_FIELDS = ("source", "input", "history", "recipe")


def peek(m: nn.Module) -> State | None:
    return m.__dict__.get(ATTR)


def get(m: nn.Module, field: str, default: Any = None) -> Any:
    """``field`` of ``m``'s state, or ``default`` where it has none (or it is None)."""
    st = m.__dict__.get(ATTR)
    value = getattr(st, field) if st is not None else None
    return default if value is None else value


def put(m: nn.Module, **fields: Any) -> State:
    """Set fields of ``m``'s state (created on first use)."""
    st = m.__dict__.get(ATTR)
    if st is None:
        st = State()
        object.__setattr__(m, ATTR, st)
    for k, v in fields.items():
        if k not in FIELDS:
            raise AttributeError(f"torchshrink state has no field {k!r}; fields: {', '.join(FIELDS)}")
        setattr(st, k, v)
    return st


def inherit(src: nn.Module, dst: nn.Module, fields: tuple[str, ...] = MODEL_FIELDS) -> None:
    """Model-level fields ``dst`` (which replaces ``src``) does not have yet take ``src``'s values."""
    if dst is src or peek(src) is None:
        return
    for f in fields:
        value = get(src, f)
        if value is not None and not get(dst, f):
            put(dst, **{f: value})
