"""The ``int8-dynamic`` kind: Linear layers on a real integer GEMM with activations quantized at run
time (per tensor or per token), plus its helpers: which Linears feed an exact (erf) GELU that the
oneDNN kernel can fuse, which kernel is faster for a layer shape on this machine (timed, not
assumed), and the backend line that reports what ran."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.data import Batch
from torchshrink.core.report import current
from torchshrink.core.select import Select, config_for, is_plain, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.measure.latency import time_interleaved
from torchshrink.quant.common import (
    Engine,
    calibration_batches,
    cpu_has_vnni,
    input_channel_absmax,
    note_float,
    resolve_engine,
    smooth_factors,
)
from torchshrink.quant.fused import (
    LinearAddNorm,
    check_fused,
    fuse_add_norms,
    fuse_block,
    link_codes,
    qkv_blocks,
    unfuse_block,
)
from torchshrink.quant.modules import Int8DynamicLinear

log = logging.getLogger(__name__)
_MEASURED: dict[tuple, str] = {}  # (in, out, activation, reduce_range, threads) -> kernel, per process


def _is_exact_gelu(m: Any) -> bool:
    if isinstance(m, nn.GELU):
        return m.approximate == "none"
    # transformers' GELUActivation (ACT2FN["gelu"]) calls F.gelu, the erf form
    return type(m).__name__ == "GELUActivation" and getattr(m, "act", None) is F.gelu


def gelu_followers(model: nn.Module) -> dict[str, str]:
    """Linear name -> name of the GELU module applied right after it, for the two structures where
    that order is certain: ``nn.Sequential(..., Linear, GELU, ...)`` and a block holding ``dense``
    plus ``intermediate_act_fn`` (BERT-style feed-forward input, whose forward is act(dense(x)))."""
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, ma), (b, mb) in zip(kids, kids[1:], strict=False):
                if type(ma) is nn.Linear and _is_exact_gelu(mb):
                    out[prefix + a] = prefix + b
        dense, act = getattr(mod, "dense", None), mod._modules.get("intermediate_act_fn")
        if type(dense) is nn.Linear and act is not None and _is_exact_gelu(act):
            out[prefix + "dense"] = prefix + "intermediate_act_fn"
    return out


def choose_kernel(lin: nn.Linear, cfg: Any, reduce_range: bool, cache: dict[tuple, str], rows: int = 1024,
                  reps: int = 5) -> str:
    """``cfg.kernel`` unless it is ``auto``: then both kernels run the layer's shape on ``rows``
    random rows (``2 * reps`` interleaved runs, :func:`torchshrink.measure.latency.time_interleaved`)
    and the one with the lower median is kept, once per shape and process."""
    if cfg.kernel != "auto":
        return str(cfg.kernel)
    key = (lin.in_features, lin.out_features, cfg.activation, reduce_range, torch.get_num_threads())
    if key not in cache:
        if key not in _MEASURED:
            x = torch.randn(rows, lin.in_features, generator=torch.Generator().manual_seed(0))
            mods = {k: Int8DynamicLinear.from_float(lin, reduce_range=reduce_range, activation=cfg.activation, kernel=k)
                    for k in ("linear_dynamic", "onednn")}
            med = {k: t.p50_ms for k, t in time_interleaved(mods, (x,), warmup=1, runs=2 * reps).items()}
            _MEASURED[key] = min(med, key=med.__getitem__)
            log.info("int8-dynamic kernel for %s: %s (%s)", key[:3], _MEASURED[key],
                     ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
        cache[key] = _MEASURED[key]
    return cache[key]


def backend_summary(model: nn.Module, engine: str, default_activation: str) -> str:
    """One line naming the kernels that run, with layer counts."""
    counts: dict[str, int] = {}
    acts: set[str] = set()
    ranges: set[bool] = set()
    fused = add_norm = emit = attn = attn_bf16 = 0
    for m in model.modules():
        add_norm += isinstance(m, LinearAddNorm)
        attn += type(m).__name__ == "NativeSelfAttention"
        attn_bf16 += type(m).__name__ == "NativeSelfAttention" and bool(getattr(m, "bf16", False))
        if isinstance(m, Int8DynamicLinear):
            emit += bool(m.emit_codes)
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
            acts.add(m.activation)
            ranges.add(m.reduce_range)
            fused += m.post_op == "gelu" and m.kernel == "onednn"
    names: Mapping[str, str] = {"linear_dynamic": f"torch.ops.quantized.linear_dynamic ({engine} engine)",
                                "onednn": "oneDNN qlinear_pointwise with torchshrink uint8 activation codes"}
    parts = [f"{names[k]}: {n} layers" for k, n in sorted(counts.items())] or [names["linear_dynamic"]]
    scales = " + ".join("per-" + a for a in sorted(acts or {default_activation}))
    extra = f", GELU fused into {fused} GEMMs" if fused else ""
    extra += f", residual add + LayerNorm fused after {add_norm} GEMMs" if add_norm else ""
    extra += f", next layer's activation codes written by {emit} epilogues" if emit else ""
    extra += f", attention on torchshrink's kernel in {attn} blocks" if attn else ""
    extra += f" ({attn_bf16} with bfloat16 products where the CPU has AVX-512 BF16)" if attn_bf16 else ""
    rr = "/".join(str(r) for r in sorted(ranges)) or "n/a"
    return f"{'; '.join(parts)} (reduce_range={rr}, {scales} activation scales{extra})"


# --------------------------------------------------------------------------- INT8 dynamic


def resolve_reduce_range(cfg: Any) -> bool:
    """``reduce_range`` "auto" -> on where the CPU lacks VNNI (u8*s8 pairs would saturate int16)."""
    return not cpu_has_vnni() if cfg.reduce_range == "auto" else cfg.reduce_range == "on"


def apply_int8_dynamic(model: nn.Module, config: Int8DynamicConfig, *, select: Select | None = None,
                       data: Any = None, **_: Any) -> nn.Module:
    chosen = select_modules(model, select, ("Linear",), replaces=True)
    eng = resolve_engine(config.engine)
    linears = [(n, m) for n, m in chosen if is_plain(m, nn.Linear)]
    for n, m in chosen:
        if not is_plain(m, nn.Linear):
            note_float(model, n, f"{type(m).__name__} has no INT8 dynamic kernel (Linear only)")
    gelu_after = gelu_followers(model)
    choices: dict[tuple, str] = {}
    stats: dict[str, torch.Tensor] = {}
    if config.smooth_alpha > 0:
        stats = input_channel_absmax(model, [n for n, _ in linears], calibration_batches(data, config.calib_batches))
    # one calibration batch checks every fusion (each one is undone or skipped where it does not fit)
    check = calibration_batches(data, 1)[0] if data is not None and (
        config.fuse_qkv or config.fuse_add_norm or config.fuse_next_quant or config.fuse_attention) else None
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
    if config.fuse_attention:
        from torchshrink.quant.attention import fuse_attention

        swapped, why = fuse_attention(model, check, bf16=config.attention_bf16)
        if why:
            log.warning("fuse_attention: attention left on torch (%s)", why)
    current(model).notes["backend"] = backend_summary(model, eng, config.activation)
    return model


def fuse_attention_projections(model: nn.Module, config: Int8DynamicConfig, select: Select | None,
                               linears: list[tuple[str, nn.Module]], check: Batch | None, eng: str,
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
    # BERT-style self-attention blocks on torchshrink's float32 attention kernel (quant/attention.py), reading the
    # fused Q/K/V output in place; the model's output is checked on a calibration batch
    fuse_attention: bool = False
    # with fuse_attention: the kernel's products in bfloat16 (float32 sums, softmax in float32) where the CPU has
    # AVX-512 BF16; each block is then checked within 2% of its output's largest magnitude
    attention_bf16: bool = False

    def validate(self) -> None:
        check_range("int8-dynamic.smooth_alpha", self.smooth_alpha, 0.0, 1.0)
        check_range("int8-dynamic.calib_batches", self.calib_batches, 1, 100000)


register(Int8DynamicConfig, apply_int8_dynamic)
