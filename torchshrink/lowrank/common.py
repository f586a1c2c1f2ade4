"""Shared pieces of the low-rank techniques: the config base, the per-model report of factorized
and skipped layers, layer input/output shapes from a forward pass, and the per-layer latency check."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.config import Config, check_range
from torchshrink.core.data import as_batches, calibrate
from torchshrink.core.errors import ConfigError, DataError, UnsupportedLayerError
from torchshrink.core.report import current
from torchshrink.measure.latency import time_interleaved

log = logging.getLogger(__name__)

# Attribute set on every factorized nn.Sequential (a plain attribute, so save/load keeps it).


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankConfig(Config):
    """Rank selection shared by ``svd``, ``tucker2`` and ``cp``.

    - ``method``: ``ratio`` (keep ``ratio`` of the layer's cost: parameters for Linear, MACs for
      Conv2d), ``energy`` (retain ``energy`` of the squared singular values), ``rank`` (explicit
      ``rank``), ``vbmf`` (empirical variational Bayesian estimate).
    - ``no_gain``: what to do with a layer whose factorized form is not smaller (or, with
      ``check_latency``, not faster): ``skip`` keeps it as it is, ``fuse`` keeps one dense layer
      holding the rank-r approximation. Either way the layer is listed in the report.
    - ``rank_multiple``: round ranks down to a multiple of this (CPU kernels like 8/16).
    """

    family = "factorize"
    method: Literal["ratio", "energy", "rank", "vbmf"] = "ratio"
    ratio: float = 0.5
    energy: float = 0.9
    rank: int = 0
    no_gain: Literal["skip", "fuse"] = "skip"
    check_latency: bool = False
    rank_multiple: int = 1

    def validate(self) -> None:
        check_range(f"{self.kind}.ratio", self.ratio, 0.0, 1.0, lo_open=True)
        check_range(f"{self.kind}.energy", self.energy, 0.0, 1.0, lo_open=True)
        check_range(f"{self.kind}.rank_multiple", self.rank_multiple, 1, 4096)
        if self.rank < 0 or (self.method == "rank" and self.rank <= 0):
            raise ConfigError(f"{self.kind}.rank={self.rank!r} is not allowed; method 'rank' needs a rank >= 1")


def note_done(model: nn.Module, name: str, **info: Any) -> None:
    current(model).changed[name] = info
    log.info("factorized %s: %s", name, info)


def note_skip(model: nn.Module, name: str, reason: str) -> None:
    current(model).skipped[name] = reason
    log.info("skipped %s: %s", name, reason)


def mark(seq: nn.Sequential, kind: str) -> nn.Sequential:
    state.put(seq, lowrank=kind)
    return seq


def check_type(name: str, module: nn.Module, allowed: tuple[type, ...], kind: str) -> None:
    if type(module) not in allowed:
        names = ", ".join(t.__name__ for t in allowed)
        raise UnsupportedLayerError(
            f"{kind} cannot factorize layer {name!r} of type {type(module).__name__}; supported: {names} "
            "(narrow the selection with select.types / select.exclude)"
        )


def conv_skip_reason(conv: nn.Conv2d) -> str | None:
    """Why a conv is left alone (None: it can be factorized). Dilation is handled."""
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}) is already factorized along channels"
    if isinstance(conv.padding, str):
        return f"string padding {conv.padding!r} is not supported; use explicit padding"
    return None


def calibration_inputs(data: Any) -> Iterator[tuple[torch.Tensor, ...]]:
    """Model inputs of each calibration batch (the one data contract, :mod:`torchshrink.core.data`)."""
    for b in as_batches(data):
        yield b.inputs


def token_mask(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The attention mask of a tokenized batch: a later input of shape ``[batch, tokens]`` holding
    only 0/1 (the ``(input_ids, attention_mask)`` convention), as a bool tensor; else None."""
    for t in inputs[1:]:
        if t.dim() == 2 and t.shape == inputs[0].shape and not t.is_floating_point() and bool(((t == 0) | (t == 1)).all()):
            return t.bool()
    return None


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x [..., d]`` as ``[rows, d]``, without the padded token positions when ``mask`` fits."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def run_calibration(model: nn.Module, data: Any, hooks: dict[str, Callable[..., None]],
                    state: dict[str, Any] | None = None) -> None:
    """The shared calibration pass (:func:`torchshrink.core.data.calibrate`) with forward hooks on the
    named modules; ``state["mask"]`` holds the current batch's :func:`token_mask` while its hooks run."""
    state = {} if state is None else state
    calibrate(model, data, hooks, on_batch=lambda b: state.__setitem__("mask", token_mask(b.inputs)))


def first_inputs(model: nn.Module, data: Any) -> tuple[torch.Tensor, ...] | None:
    """One batch of example inputs: the first calibration batch, else the model's recorded input."""
    first = next(as_batches(data, limit=1), None) if data is not None else None
    if first is not None:
        return first.inputs
    if state.get(model, "input") is not None:
        from torchshrink.models import example_inputs

        return example_inputs(model, batch=1)
    return None


def io_shapes(model: nn.Module, names: list[str], inputs: tuple[torch.Tensor, ...] | None) -> dict[str, tuple]:
    """``{name: (input shape, output shape)}`` of the named layers from one forward pass."""
    if inputs is None:
        return {}
    shapes: dict[str, tuple] = {}
    hooks = []
    mods = dict(model.named_modules())
    for n in names:
        def hook(m: nn.Module, args: tuple, out: torch.Tensor, n: str = n) -> None:
            shapes.setdefault(n, (tuple(args[0].shape), tuple(out.shape)))

        hooks.append(mods[n].register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(*inputs)
    except Exception as e:
        raise DataError(f"could not run the model on its example input to find layer shapes: {e}") from None
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return shapes


def speedup(old: nn.Module, new: nn.Module, in_shape: tuple, runs: int = 30, channels_last: bool = False) -> float:
    """Measured latency ratio old/new of one layer at batch 1 on this machine (>1: new is faster),
    with 4-D activations in ``channels_last`` layout when asked (the layout the model will run in)."""
    x = torch.randn(1, *in_shape[1:])
    fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    was = old.training, new.training
    mods = {"old": old.eval().to(memory_format=fmt), "new": new.eval().to(memory_format=fmt)}
    try:
        with torch.inference_mode():
            t = time_interleaved(mods, (x,), warmup=5, runs=runs)
    finally:
        old.train(was[0]).to(memory_format=torch.contiguous_format)
        new.train(was[1]).to(memory_format=torch.contiguous_format)
    return t["old"].p50_ms / max(t["new"].p50_ms, 1e-9)
