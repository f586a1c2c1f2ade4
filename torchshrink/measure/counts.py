"""Parameter, nonzero and MAC counts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchshrink.core.errors import InputShapeError


def _logical_sum(model: nn.Module, method: str, plain: Callable[[torch.Tensor], int]) -> int:
    """Sum ``plain(p)`` over parameters, except that a compressed module reporting ``method()``
    (``logical_params`` / ``logical_nonzero``) stands for its whole subtree."""
    total = 0
    handled: set[int] = set()
    for m in model.modules():
        # a compressed module that reports its size but not its nonzeros is counted as dense
        fn = getattr(m, method, None) or getattr(m, "logical_params", None)
        if fn is not None and id(m) not in handled:
            total += int(fn())
            handled.update(id(x) for x in m.modules())
    for m in model.modules():
        if id(m) not in handled:
            total += sum(plain(p.detach()) for p in m.parameters(recurse=False))
    return total


def count_params(model: nn.Module) -> int:
    """Logical parameters: each compressed module reports the weights it stands for
    (``logical_params()``) so a packed INT4 layer still counts its 4096x4096 weights."""
    return _logical_sum(model, "logical_params", lambda p: p.numel())


def count_nonzero(model: nn.Module) -> int:
    return _logical_sum(model, "logical_nonzero", lambda p: int(torch.count_nonzero(p)))


def run_model(model: nn.Module, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> object:
    """Forward with a clear error when the example input does not fit. A mapping is passed as
    keyword arguments (e.g. a tokenizer's ``input_ids`` / ``attention_mask``)."""
    try:
        with torch.inference_mode():
            return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        tensors = inputs.values() if isinstance(inputs, Mapping) else inputs
        shapes = ", ".join(f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for t in tensors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputShapeError(f"{type(model).__name__} cannot run on input {shapes}: {first}") from None


def count_macs(model: nn.Module, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], *, per_module: bool = False) -> int | dict[str, int]:
    """Multiply-accumulates of one forward pass, from torch.utils.flop_counter (FLOPs / 2).

    Modules whose kernels the counter cannot see (integer or bit-packed ops) report their own
    work with ``macs(inputs, output) -> int``; their counted FLOPs are replaced by that figure.
    """
    own: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if hasattr(m, "macs"):
            def hook(mod: nn.Module, args: tuple, out: object, name: str = name) -> None:
                own[name] = own.get(name, 0) + int(mod.macs(args, out))

            hooks.append(m.register_forward_hook(hook))
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with counter:
            run_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    flops = counter.get_flop_counts()
    by_mod = {k: sum(v.values()) for k, v in flops.items()}
    total = by_mod.get("Global", 0)
    prefix = type(model).__name__
    # flop counter keys modules as "<RootClass>.<qualified name>"; replace own-counted modules
    top_own = [n for n in own if not any(n != o and n.startswith(o + ".") for o in own)]
    for n in top_own:
        total -= by_mod.get(f"{prefix}.{n}" if n else prefix, 0)
    macs = total // 2 + sum(own[n] for n in top_own)
    if not per_module:
        return macs
    out = {}
    for k, v in by_mod.items():
        if k == "Global":
            continue
        name = "" if k == prefix else k[len(prefix) + 1:] if k.startswith(prefix + ".") else k  # root: "" as in named_modules
        out[name] = own.get(name, v // 2)
    for n, v in own.items():
        out.setdefault(n, v)
    return out
