"""Dependency tracing: run the model once under a ``TorchFunctionMode`` and follow every channel
dimension through the ops that actually execute (so data-dependent Python control flow is fine).

Each tensor dimension gets a *layout*: a tuple of segments ``(space, k)``. A space is a set of
coupled channels (a union-find node); ``k`` is how many consecutive indices each channel spans
(after ``flatten`` of ``[N, C, H, W]`` the last dimension is ``((C, H*W),)``). Parameters and
buffers are recognised by identity, so ``F.linear(x, self.weight)`` couples ``weight`` dims with
the activation dims they touch, whatever module made the call.

An op we do not understand *blocks* every space it touches: those channels are never pruned and
the op is named in the report. Blocking is monotonic, so a conservative decision is never undone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torchshrink.prune.structured import rules

log = logging.getLogger(__name__)

Layout = tuple[tuple[int, int], ...]


@dataclasses.dataclass
class Space:
    size: int
    parent: int
    blocked: bool = False
    reason: str = ""
    mixing: bool = False  # normalised over (LayerNorm / GroupNorm(1)): pruning is not output-exact


@dataclasses.dataclass
class Attachment:
    """Dimension ``dim`` of tensor ``name`` (a parameter or buffer) follows a layout."""

    name: str
    dim: int
    producer: bool  # the op creates these channels (conv/linear output, embedding dim)


class Graph:
    """Union-find over channel spaces plus the per-tensor-dimension layouts of parameters."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self.param_layouts: dict[tuple[str, int], Layout] = {}
        self.attachments: dict[tuple[str, int], Attachment] = {}
        self.blocked_ops: list[str] = []

    # --------------------------------------------------------------------- spaces
    def new(self, size: int, *, blocked: bool = False, reason: str = "") -> int:
        self.spaces.append(Space(size, len(self.spaces), blocked, reason))
        return len(self.spaces) - 1

    def find(self, i: int) -> int:
        while self.spaces[i].parent != i:
            self.spaces[i].parent = self.spaces[self.spaces[i].parent].parent
            i = self.spaces[i].parent
        return i

    def space(self, i: int) -> Space:
        return self.spaces[self.find(i)]

    def block(self, layout: Layout, reason: str) -> None:
        for s, _ in layout:
            sp = self.space(s)
            if not sp.blocked:
                sp.blocked, sp.reason = True, reason

    def blocked_layout(self, size: int) -> Layout:
        return ((self.new(size, blocked=True, reason="fixed"), 1),)

    def is_blocked(self, layout: Layout) -> bool:
        return all(self.space(s).blocked for s, _ in layout)

    def size(self, layout: Layout) -> int:
        return sum(self.space(s).size * k for s, k in layout)

    def unify(self, a: Layout, b: Layout, reason: str) -> Layout:
        if a == b:
            return a
        shape_a = [(self.space(s).size, k) for s, k in a]
        shape_b = [(self.space(s).size, k) for s, k in b]
        if shape_a != shape_b:
            self.block(a, reason)
            self.block(b, reason)
            return a
        for (sa, _), (sb, _) in zip(a, b, strict=True):
            ra, rb = self.find(sa), self.find(sb)
            if ra != rb:
                A, B = self.spaces[ra], self.spaces[rb]
                B.parent = ra
                A.mixing = A.mixing or B.mixing
                if B.blocked and not A.blocked:
                    A.blocked, A.reason = True, B.reason
        return a

    # --------------------------------------------------------------------- parameters
    def attach(self, name: str, dim: int, layout: Layout, *, producer: bool = False) -> Layout:
        key = (name, dim)
        if key in self.param_layouts:
            return self.unify(self.param_layouts[key], layout, f"{name} is used with two channel layouts")
        self.param_layouts[key] = layout
        self.attachments[key] = Attachment(name, dim, producer)
        return layout

    def produce(self, name: str, dim: int, size: int) -> Layout:
        """The layout of a producer dimension (a new space the first time it is seen)."""
        key = (name, dim)
        if key not in self.param_layouts:
            self.param_layouts[key] = ((self.new(size), 1),)
            self.attachments[key] = Attachment(name, dim, True)
        return self.param_layouts[key]


class _Tracer(TorchFunctionMode):
    def __init__(self, graph: Graph, names: dict[int, str], modules: list[str]) -> None:
        super().__init__()
        self.g = graph
        self.names = names
        self.stack = modules
        self.layouts: dict[int, list[Layout]] = {}
        self.keep: list[torch.Tensor] = []

    def where(self) -> str:
        return self.stack[-1] if self.stack else "<root>"

    def layout(self, t: torch.Tensor) -> list[Layout]:
        got = self.layouts.get(id(t))
        if got is not None and len(got) == t.dim():
            return got
        name = self.names.get(id(t))
        if name is not None:  # a parameter or buffer: its dims are shared by every use
            out = []
            for d, n in enumerate(t.shape):
                key = (name, d)
                if key not in self.g.param_layouts:
                    self.g.param_layouts[key] = ((self.g.new(n), 1),)
                    self.g.attachments[key] = rules_attachment(name, d)
                out.append(self.g.param_layouts[key])
        else:  # a constant or model input: never pruned
            out = [self.g.blocked_layout(n) for n in t.shape]
        self.set(t, out)
        return out

    def set(self, t: torch.Tensor, layouts: list[Layout]) -> None:
        self.layouts[id(t)] = list(layouts)
        self.keep.append(t)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in _tensors(out)]
        if not outs:
            return out
        name = _op_name(func)
        try:
            handled = rules.apply_rule(self, name, args, kwargs, out)
        except Exception as e:  # a rule that trips over an unusual call: block, never guess
            log.debug("rule for %s failed: %s", name, e)
            handled = False
        if not handled:
            reason = f"op {name!r} in {self.where()}"
            ins = [t for t in _tensors((args, kwargs))]
            for t in ins:
                for lay in self.layout(t):
                    self.g.block(lay, reason)
            if ins:
                self.g.blocked_ops.append(reason)
            for t in outs:
                self.set(t, [self.g.blocked_layout(n) for n in t.shape])
        return out


def rules_attachment(name: str, dim: int) -> Attachment:
    return Attachment(name, dim, False)


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = f"get:{getattr(owner, '__name__', owner)}"
    return name


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
    elif hasattr(obj, "to_tuple") and callable(obj.to_tuple):  # Hugging Face ModelOutput
        yield from _tensors(obj.to_tuple())


def call_model(model: nn.Module, batch: Any) -> Any:
    from torchshrink.core.data import Batch

    if isinstance(batch, Batch):
        return batch(model)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(*batch)
    return model(batch)


def tensor_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), n)
    for n, b in model.named_buffers(remove_duplicate=True):
        names.setdefault(id(b), n)
    return names


def trace(model: nn.Module, batch: Any) -> Graph:
    """Run ``model`` on ``batch`` once and return its channel dependency graph."""
    graph = Graph()
    stack: list[str] = []
    hooks = []

    def enter(mod: nn.Module, args: Any, n: str = "") -> None:
        stack.append(n)

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    for mname, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=mname: enter(mod, a, n)))
        hooks.append(m.register_forward_hook(leave))
    tracer = _Tracer(graph, tensor_names(model), stack)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            out = call_model(model, batch)
        for t in _tensors(out):  # the output keeps its shape
            for lay in tracer.layout(t):
                graph.block(lay, "model output")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return graph
