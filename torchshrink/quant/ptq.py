"""Post-training quantization of Linear layers: INT8 dynamic (real integer GEMM) and weight-only
INT8 / INT4 (group-wise, packed two per byte). Static INT8 for CNNs lives in ``static.py``.

Layers that get no integer kernel stay in float and are listed in ``ts.report(model)[-1].skipped``
(name -> reason), so a report never presents a float layer as quantized.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.data import Batch, as_batch, calibration
from torchshrink.core.data import calibrate as calibrate_pass
from torchshrink.core.errors import ConfigError
from torchshrink.core.report import current
from torchshrink.core.select import Select, config_for, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.quant.dynamic import backend_summary, choose_kernel, gelu_followers
from torchshrink.quant.fused import check_fused, fuse_add_norms, fuse_block, link_codes, qkv_blocks, unfuse_block
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
    current(model).skipped[name] = reason


def batch_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """Model inputs of one batch (the one data contract, :mod:`torchshrink.core.data`)."""
    return as_batch(batch).inputs


def calibration_batches(data: Any, limit: int) -> list[tuple[torch.Tensor, ...]]:
    return [b.inputs for b in calibration(data, limit=limit, what="this quantization")]


def input_channel_absmax(model: nn.Module, names: list[str], batches: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Max |x| per input channel of each named Linear over the calibration batches."""
    stats: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple) -> None:
            a = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a

        return hook

    calibrate_pass(model, [Batch(tuple(b)) for b in batches], {n: hook_for(n) for n in names}, pre=True, inference=False)
    return stats


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    w_absmax = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    s = act_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(1e-3, 1e3)


# --------------------------------------------------------------------------- INT8 dynamic


def resolve_reduce_range(cfg: Any) -> bool:
    """``reduce_range`` "auto" -> on where the CPU lacks VNNI (u8*s8 pairs would saturate int16)."""
    return not cpu_has_vnni() if cfg.reduce_range == "auto" else cfg.reduce_range == "on"


def apply_int8_dynamic(model: nn.Module, config: Int8DynamicConfig, *, select: Select | None = None,
                       data: Any = None, **_: Any) -> nn.Module:
    chosen = select_modules(model, select, ("Linear",))
    eng = resolve_engine(config.engine)
    linears = [(n, m) for n, m in chosen if type(m) is nn.Linear]
    for n, m in chosen:
        if type(m) is not nn.Linear:
            note_float(model, n, f"{type(m).__name__} has no INT8 dynamic kernel (Linear only)")
    gelu_after = gelu_followers(model)
    choices: dict[tuple, str] = {}
    stats: dict[str, torch.Tensor] = {}
    if config.smooth_alpha > 0:
        stats = input_channel_absmax(model, [n for n, _ in linears], calibration_batches(data, config.calib_batches))
    # one calibration batch checks every fusion (each one is undone or skipped where it does not fit)
    check = calibration_batches(data, 1)[0] if data is not None and (
        config.fuse_qkv or config.fuse_add_norm or config.fuse_next_quant) else None
    if config.fuse_qkv:
        linears = fuse_attention_projections(model, config, select, linears, check, eng, choices)
    for name, lin in linears:
        cfg = config_for(name, config, select)
        if cfg.keep_float:
            note_float(model, name, "kept in float by config (keep_float)")
            continue
        smooth = smooth_factors(stats[name], lin.weight, cfg.smooth_alpha) if cfg.smooth_alpha > 0 and name in stats else None
        reduce_range = resolve_reduce_range(cfg)
        kernel = choose_kernel(lin, cfg, reduce_range, choices)
        act = gelu_after.get(name) if cfg.fuse_gelu and kernel == "onednn" else None
        set_module(model, name, Int8DynamicLinear.from_float(lin, smooth=smooth, engine=eng, reduce_range=reduce_range,
                                                             activation=cfg.activation, kernel=kernel,
                                                             post_op="gelu" if act else "none"))
        if act:
            set_module(model, act, nn.Identity())
    if config.fuse_add_norm:
        fused, skipped = fuse_add_norms(model, check)
        if skipped:
            log.warning("dense + add + LayerNorm fused in %d blocks, not in %d (%s)", len(fused), len(skipped),
                        "; ".join(sorted(set(skipped.values()))))
    if config.fuse_next_quant:
        linked, why = link_codes(model, check)
        if why:
            log.warning("fuse_next_quant: nothing linked (%s)", why)
    current(model).notes["backend"] = backend_summary(model, eng, config.activation)
    return model


def fuse_attention_projections(model: nn.Module, config: Int8DynamicConfig, select: Select | None,
                               linears: list[tuple[str, nn.Module]], check: tuple[torch.Tensor, ...] | None, eng: str,
                               choices: dict[tuple, str]) -> list[tuple[str, nn.Module]]:
    """Fuse each selected query/key/value trio with one shared per-layer config into one INT8 GEMM,
    checked on the calibration batch ``check`` (undone with a logged reason where the block does not fit);
    returns the Linears still to quantize one by one."""
    todo = dict(linears)
    fused: dict[str, tuple[nn.Module, ...]] = {}
    for blk in qkv_blocks(model):
        names = [f"{blk}.{p}" if blk else p for p in ("query", "key", "value")]
        cfgs = [config_for(n, config, select) for n in names]
        if not all(n in todo for n in names) or len(set(cfgs)) != 1 or cfgs[0].keep_float or cfgs[0].smooth_alpha > 0:
            log.info("Q/K/V of %r not fused: not all selected, per-layer settings differ, or smoothing is on", blk)
            continue
        cfg = cfgs[0]
        rr = resolve_reduce_range(cfg)
        q = todo[names[0]]
        wide = nn.Linear(q.in_features, 3 * q.out_features)
        kernel = choose_kernel(wide, cfg, rr, choices)
        originals = tuple(todo[n] for n in names)
        fuse_block(model, blk, engine=eng, reduce_range=rr, activation=cfg.activation, kernel=kernel)
        fused[blk] = originals
    if not fused:
        return linears
    problem = check_fused(model, check) if check is not None else "no calibration batch to check the call order on"
    if problem:
        log.warning("Q/K/V fusion undone: %s", problem)
        for blk, originals in fused.items():
            unfuse_block(model, blk, originals)  # type: ignore[arg-type]
        return linears
    done = {f"{b}.{p}" if b else p for b in fused for p in ("query", "key", "value")}
    return [(n, m) for n, m in linears if n not in done]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8DynamicConfig(Config):
    """INT8 dynamic quantization of Linear layers: int8 per-channel weights, activations quantized at
    run time, integer GEMM. ``activation``: one scale per tensor, or one per token (row) -- per-token
    costs two cheap elementwise passes and keeps outlier tokens (e.g. GELU outputs) from coarsening
    every other token's grid (MiniLM, all Linears INT8: cosine mean 0.9968 vs 0.9925 per tensor).
    ``smooth_alpha`` > 0 applies SmoothQuant channel balancing from calibration data (measured on MiniLM
    it lowers fidelity: 0.982 at alpha 0.5 vs 0.9925 without); ``keep_float`` (usually as a per-layer
    override) leaves a layer in float. ``kernel="onednn"``: our C quantizer + oneDNN GEMM, with an exact
    GELU that follows a Linear fused into its epilogue (``fuse_gelu``); per-token there uses one sweep per
    row, and ``reduce_range="on"`` (7-bit codes) keeps u8*s8 pairs from saturating without VNNI (MiniLM,
    per-token 7-bit FFN Linears + per-tensor 8-bit attention: 0.9967 mean, 0.9926 min)."""

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
    # linear_dynamic: torch's op (quantizes inside); onednn: our uint8 codes + oneDNN GEMM (GELU fusable);
    # auto: the faster of the two on this machine, timed once per layer shape (quant/dynamic.py)
    kernel: Literal["auto", "linear_dynamic", "onednn"] = "linear_dynamic"
    fuse_gelu: bool = True
    # one GEMM for BERT-style query/key/value (quant/fused.py); checked on a calibration batch
    fuse_qkv: bool = False
    # post-LN "LayerNorm(dense(x) + residual)" blocks (BERT SelfOutput / Output) as one C sweep after the GEMM;
    # each block is checked against its own output on a calibration batch and left alone where it differs
    fuse_add_norm: bool = False
    # a per-token oneDNN layer whose output another per-token layer reads directly (FFN input -> FFN output)
    # writes that layer's codes in its epilogue's sweep; found on a calibration batch, output checked bit-identical
    fuse_next_quant: bool = False

    def validate(self) -> None:
        check_range("int8-dynamic.smooth_alpha", self.smooth_alpha, 0.0, 1.0)
        check_range("int8-dynamic.calib_batches", self.calib_batches, 1, 100000)


register(Int8DynamicConfig, apply_int8_dynamic)


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


register(WeightOnlyConfig, apply_weight_only)
