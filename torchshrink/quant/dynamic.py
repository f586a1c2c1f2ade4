"""INT8 dynamic helpers: which Linears feed an exact (erf) GELU that the oneDNN kernel can fuse,
which kernel is faster for a layer shape on this machine (timed, not assumed), and the backend
line that reports what ran."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.measure.latency import time_interleaved
from torchshrink.quant.fused import LinearAddNorm
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
    fused = add_norm = emit = 0
    for m in model.modules():
        add_norm += isinstance(m, LinearAddNorm)
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
    rr = "/".join(str(r) for r in sorted(ranges)) or "n/a"
    return f"{'; '.join(parts)} (reduce_range={rr}, {scales} activation scales{extra})"
