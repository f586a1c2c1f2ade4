"""Masks held with torch parametrizations while training, made permanent at the end.

``set_mask`` registers a :class:`WeightMask` on each layer's ``weight`` (the forward sees ``w * mask``,
the optimizer still owns the original Parameter); ``make_permanent`` bakes the masks in and removes
the parametrizations. ``apply_masks`` applies a whole set of masks or none of them (rollback).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchshrink.core import state
from torchshrink.core.surgery import get_module

log = logging.getLogger(__name__)


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask``; carries the layer's pruning settings and, for movement
    pruning, the accumulated movement score."""

    def __init__(self, mask: torch.Tensor, settings: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)
        self.settings: dict[str, Any] = dict(settings or {})
        self.score: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.masked_fill(~self.mask, 0.0)  # +0.0: w * 0 would leave -0.0, which is not stored as zero


def mask_of(module: nn.Module) -> WeightMask | None:
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, WeightMask):
                return p
    return None


def masked_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, WeightMask]]:
    for name, m in model.named_modules():
        wm = mask_of(m)
        if wm is not None:
            yield name, m, wm


def original_weight(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def set_mask(module: nn.Module, mask: torch.Tensor, settings: dict[str, Any] | None = None) -> None:
    """Attach or update the mask of ``module.weight``; masked weights are also zeroed in the
    original so that a later removal of the parametrization cannot resurrect them."""
    wm = mask_of(module)
    if wm is None:
        parametrize.register_parametrization(module, "weight", WeightMask(mask, settings))
        wm = mask_of(module)
    else:
        wm.mask = mask.to(device=wm.mask.device, dtype=torch.bool)
        if settings:
            wm.settings.update(settings)
    with torch.no_grad():
        original_weight(module).masked_fill_(~wm.mask, 0.0)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], *, hold: bool,
                settings: Mapping[str, dict[str, Any]] | None = None) -> None:
    """Apply every mask (held as parametrizations if ``hold``, else zeroed into the weights), or,
    if one fails, none: the layers already touched are restored and the error re-raised."""
    done: list[tuple[nn.Module, torch.Tensor, bool]] = []
    try:
        for name, mask in masks.items():
            module = get_module(model, name)
            w = original_weight(module)
            if mask.shape != w.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight has {tuple(w.shape)}")
            done.append((module, w.detach().clone(), mask_of(module) is not None))
            s = (settings or {}).get(name)
            if hold:
                set_mask(module, mask, s)
            else:
                with torch.no_grad():
                    w.masked_fill_(~mask.to(torch.bool), 0.0)
                state.put(module, prune=dict(s or {}))
    except BaseException:
        for module, saved, had_mask in reversed(done):
            if mask_of(module) is not None and not had_mask:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            with torch.no_grad():
                original_weight(module).copy_(saved)
            if not hold and state.peek(module) is not None:
                state.put(module, prune=None)
        log.debug("mask application failed; %d layer(s) restored", len(done))
        raise


def make_permanent(model: nn.Module) -> list[str]:
    """Bake every held mask into its weight and remove the parametrizations; returns the layer names."""
    names = []
    for name, module, wm in list(masked_layers(model)):
        settings = dict(wm.settings)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        state.put(module, prune=settings)
        names.append(name)
    return names
