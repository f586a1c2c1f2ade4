"""What the quantization kinds share: the CPU's INT8 engine, calibration batches, SmoothQuant's
per-channel statistics, and noting a layer left in float (``ts.report(model)[-1].skipped``, name ->
reason, so a report never presents a float layer as quantized)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core.data import Batch, as_batch, calibration
from torchshrink.core.data import calibrate as calibrate_pass
from torchshrink.core.errors import ConfigError
from torchshrink.core.report import current

log = logging.getLogger(__name__)
Engine = Literal["auto", "x86", "fbgemm", "onednn"]


def cpu_has_vnni() -> bool:
    from torchshrink.measure.machine import cpu_flags

    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def resolve_engine(name: str) -> str:
    """``auto``: x86 (PyTorch picks fbgemm / onednn kernels per op); measured equal to fbgemm for
    linear_dynamic and faster for static convs on the AVX2 benchmark machine (see benchmarks/quantize.py)."""
    supported = torch.backends.quantized.supported_engines
    choice = "x86" if name == "auto" else name
    if choice not in supported:
        raise ConfigError(f"quantized engine {choice!r} is not available in this torch; available: {', '.join(supported)}")
    return choice


def note_float(model: nn.Module, name: str, reason: str) -> None:
    current(model).skipped[name] = reason


def batch_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """Model inputs of one batch (the one data contract, :mod:`torchshrink.core.data`)."""
    return as_batch(batch).inputs


def calibration_batches(data: Any, limit: int) -> list[Batch]:
    return calibration(data, limit=limit, what="this quantization")


def input_channel_absmax(model: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Max |x| per input channel of each named Linear over the calibration batches."""
    stats: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple) -> None:
            a = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a

        return hook

    calibrate_pass(model, batches, {n: hook_for(n) for n in names}, pre=True, inference=False)
    return stats


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    w_absmax = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    s = act_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(1e-3, 1e3)
