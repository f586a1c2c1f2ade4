"""Post-training quantization of Linear layers: INT8 dynamic (real integer GEMM) and weight-only
INT8 / INT4 (group-wise, packed two per byte). Static INT8 for CNNs lives in ``static.py``.

Layers that get no integer kernel stay in float and are listed in ``model._torchshrink_float_layers``
(name -> reason), so a report never presents a float layer as quantized.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.errors import ConfigError, DataError
from torchshrink.core.select import Select, config_for, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.measure.quality import iter_batches
from torchshrink.quant.modules import Int8DynamicLinear, WeightOnlyLinear

log = logging.getLogger(__name__)
Engine = Literal["auto", "x86", "fbgemm", "onednn"]


def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def resolve_engine(name: str) -> str:
    """``auto``: x86 (PyTorch picks fbgemm / onednn kernels per op); measured equal to fbgemm for
    linear_dynamic and faster for static convs on the AVX2 benchmark machine (see benchmarks/quantize.py)."""
    supported = torch.backends.quantized.supported_engines
    choice = "x86" if name == "auto" else name
    if choice not in supported:
        raise ConfigError(f"quantized engine {choice!r} is not available in this torch; available: {', '.join(supported)}")
    return choice


def note_float(model: nn.Module, name: str, reason: str) -> None:
    layers = dict(getattr(model, "_torchshrink_float_layers", {}) or {})
    layers[name] = reason
    model._torchshrink_float_layers = layers


def batch_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """Model inputs of one batch: a tensor, a tokenizer dict, (inputs, labels) with 1-D integer
    labels, or a tuple of input tensors."""
    if isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and batch[1].dim() == 1 and not batch[1].is_floating_point() and batch[0].dim() > 1:
        return (batch[0],)
    if isinstance(batch, tuple | list) and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch)
    return next(iter(iter_batches([batch])))[0]


def calibration_batches(data: Any, limit: int) -> list[tuple[torch.Tensor, ...]]:
    if data is None:
        raise DataError("this quantization needs calibration data (data=[batches]); none was given")
    out = []
    for batch in data:
        out.append(batch_inputs(batch))
        if len(out) >= limit:
            break
    if not out:
        raise DataError("the calibration data is empty; give at least one batch")
    return out


@torch.no_grad()
def input_channel_absmax(model: nn.Module, names: list[str], batches: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Max |x| per input channel of each named Linear over the calibration batches."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m: nn.Module, args: tuple, name: str = name) -> None:
            a = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a

        hooks.append(mod.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for inputs in batches:
            try:
                model(*inputs)
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                raise DataError(f"calibration batch does not fit the model: {str(e).splitlines()[0]}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return stats


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    w_absmax = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    s = act_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(1e-3, 1e3)


# --------------------------------------------------------------------------- INT8 dynamic


def apply_int8_dynamic(model: nn.Module, config: Int8DynamicConfig, *, select: Select | None = None,
                       data: Any = None, **_: Any) -> nn.Module:
    chosen = select_modules(model, select, ("Linear",))
    eng = resolve_engine(config.engine)
    reduce_range = not cpu_has_vnni() if config.reduce_range == "auto" else config.reduce_range == "on"
    linears = [(n, m) for n, m in chosen if type(m) is nn.Linear]
    for n, m in chosen:
        if type(m) is not nn.Linear:
            note_float(model, n, f"{type(m).__name__} has no INT8 dynamic kernel (Linear only)")
    stats: dict[str, torch.Tensor] = {}
    if config.smooth_alpha > 0:
        stats = input_channel_absmax(model, [n for n, _ in linears], calibration_batches(data, config.calib_batches))
    for name, lin in linears:
        cfg = config_for(name, config, select)
        if cfg.keep_float:
            note_float(model, name, "kept in float by config (keep_float)")
            continue
        smooth = smooth_factors(stats[name], lin.weight, cfg.smooth_alpha) if cfg.smooth_alpha > 0 and name in stats else None
        set_module(model, name, Int8DynamicLinear.from_float(lin, smooth=smooth, engine=eng, reduce_range=reduce_range,
                                                             activation=cfg.activation))
    acts = sorted({m.activation for m in model.modules() if isinstance(m, Int8DynamicLinear)}) or [config.activation]
    model._torchshrink_quant_backend = (f"torch.ops.quantized.linear_dynamic ({eng} engine, reduce_range={reduce_range}, "
                                        f"{' + '.join('per-' + a for a in acts)} activation scales)")
    return model


@register(apply_int8_dynamic)
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8DynamicConfig(Config):
    """INT8 dynamic quantization of Linear layers: int8 per-channel weights, activations quantized at
    run time, integer GEMM. ``activation``: one scale per tensor, or one per token (row) -- per-token
    costs two cheap elementwise passes and keeps outlier tokens (e.g. GELU outputs) from coarsening
    every other token's grid (MiniLM, all Linears INT8: cosine mean 0.9968 vs 0.9925 per tensor).
    ``smooth_alpha`` > 0 applies SmoothQuant channel balancing from calibration data; ``keep_float``
    (usually as a per-layer override) leaves a layer in float."""

    kind = "int8-dynamic"
    family = "quantize"
    smooth_alpha: float = 0.0
    calib_batches: int = 8
    keep_float: bool = False
    activation: Literal["tensor", "token"] = "token"
    engine: Engine = "auto"
    # auto = on without VNNI: fbgemm's u8*s8 pairs saturate int16 otherwise (measured: 0.988 vs 0.9998 cosine on a
    # random MLP); "off" can still win on a given model (MiniLM: 0.9925 vs 0.9746) -- check fidelity.
    reduce_range: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> None:
        check_range("int8-dynamic.smooth_alpha", self.smooth_alpha, 0.0, 1.0)
        check_range("int8-dynamic.calib_batches", self.calib_batches, 1, 100000)


# --------------------------------------------------------------------------- weight-only


def apply_weight_only(model: nn.Module, config: WeightOnlyConfig, *, select: Select | None = None,
                      data: Any = None, **_: Any) -> nn.Module:
    for name, lin in select_modules(model, select, ("Linear",)):
        cfg = config_for(name, config, select)
        if type(lin) is not nn.Linear:
            note_float(model, name, f"{type(lin).__name__} is not a plain Linear")
            continue
        if cfg.group_size and lin.in_features % cfg.group_size:
            note_float(model, name, f"in_features={lin.in_features} is not a multiple of group_size={cfg.group_size}")
            continue
        if cfg.bits == 4 and lin.in_features % 2:
            note_float(model, name, f"in_features={lin.in_features} is odd; int4 packs two values per byte")
            continue
        set_module(model, name, WeightOnlyLinear.from_float(lin, bits=cfg.bits, group_size=cfg.group_size))
    return model


@register(apply_weight_only)
@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightOnlyConfig(Config):
    """Weight-only quantization of Linear layers: int8 (per channel or per group) or int4 per group,
    packed two values per byte. ``group_size: 0`` means per output channel. Per-layer ``bits`` via
    select overrides gives mixed precision."""

    kind = "weight-only"
    family = "quantize"
    bits: Literal[4, 8] = 4
    group_size: int = 128

    def validate(self) -> None:
        if self.group_size and self.group_size not in (16, 32, 64, 128, 256):
            raise ConfigError(f"weight-only.group_size={self.group_size} is not allowed; allowed: 0 (per channel), 16, 32, 64, 128, 256")
        if self.bits == 4 and self.group_size == 0:
            pass  # per-channel int4 is allowed (lower quality)
