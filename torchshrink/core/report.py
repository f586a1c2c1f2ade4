"""One report per applied kind: what it changed, what it skipped and why, and kind-wide notes.

``ts.prepare`` opens a :class:`Report` for the kind before its handler runs; the handler (and its
finalize) write into :func:`current`; ``ts.report(model)`` returns the list, oldest first. This
replaces the per-technique ``_torchshrink_*_report`` attributes: one place (core/state.py), one shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from torchshrink.core import state


@dataclasses.dataclass
class Report:
    """What one kind did to a model."""

    kind: str
    changed: dict[str, Any] = dataclasses.field(default_factory=dict)  # layer -> what was done
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # layer -> why it was left alone
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # kind-wide: kernel backend, history, ...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def report(model: nn.Module) -> list[Report]:
    """The reports of every kind applied to ``model``, oldest first."""
    return list(state.get(model, "reports", []))


def open_report(model: nn.Module, kind: str) -> Report:
    rep = Report(kind)
    state.put(model, reports=[*state.get(model, "reports", []), rep])
    return rep


def current(model: nn.Module) -> Report:
    """The report of the kind being applied (a handler called outside ``ts.prepare`` gets a fresh one)."""
    reps = state.get(model, "reports")
    return reps[-1] if reps else open_report(model, "?")


def carry(src: nn.Module, dst: nn.Module) -> None:
    """Hand the reports over when a handler returns a new module (a traced graph, a student). What
    was already noted on the new module without a report of its own is merged into the current one."""
    if dst is src or not state.get(src, "reports"):
        return
    reps = list(state.get(src, "reports"))
    for r in state.get(dst, "reports", []):
        if any(r is x or r == x for x in reps):
            continue
        if r.kind == "?" and reps:
            reps[-1].changed.update(r.changed)
            reps[-1].skipped.update(r.skipped)
            reps[-1].notes.update(r.notes)
        else:
            reps.append(r)
    state.put(dst, reports=reps)


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}


def note_changes(before: nn.Module, after: nn.Module) -> None:
    """Fill the current report's ``changed`` with what differs between the input and the finished
    model, layer by layer (type, weight shape, nonzero weights), where the handler noted nothing."""
    rep = current(after)
    old = _leaves(before)
    for name, m in _leaves(after).items():
        if name in rep.changed or name in rep.skipped:
            continue
        prev = old.get(name)
        if prev is None:
            continue
        if type(prev) is not type(m):
            rep.changed[name] = f"{type(prev).__name__} -> {type(m).__name__}"
            continue
        w0, w1 = getattr(prev, "weight", None), getattr(m, "weight", None)
        if not (hasattr(w0, "shape") and hasattr(w1, "shape")):
            continue
        if w0.shape != w1.shape:
            rep.changed[name] = f"weight {tuple(w0.shape)} -> {tuple(w1.shape)}"
        elif w0.dtype != w1.dtype:
            rep.changed[name] = f"weight {w0.dtype} -> {w1.dtype}".replace("torch.", "")
        else:
            nz0, nz1 = int(w0.count_nonzero()), int(w1.count_nonzero())
            if nz1 != nz0:
                rep.changed[name] = f"nonzero weights {nz0:,} -> {nz1:,}"
    every = dict(after.named_modules())
    for name, prev in old.items():
        if name in rep.changed or name in rep.skipped:
            continue
        if name in every and type(every[name]) is not type(prev):  # wrapped (e.g. a cast)
            rep.changed[name] = f"{type(prev).__name__} -> {type(every[name]).__name__}"
        elif name not in every:  # named_modules lists every ancestor, so nothing below it is left either
            rep.changed[name] = "removed"
