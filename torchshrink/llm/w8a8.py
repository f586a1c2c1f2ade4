"""W8A8 for language models on torchshrink's int8 kernels: every decoder Linear becomes an
:class:`~torchshrink.quant.modules.Int8DynamicLinear` (int8 per-channel weights, activations quantized
per token at run time, integer GEMM), optionally with SmoothQuant (Xiao et al. 2023, "SmoothQuant:
Accurate and Efficient Post-Training Quantization for Large Language Models"): input channel ``j`` is
divided by ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` and the weight column multiplied by it, so
activation outliers move into the weights where per-channel scales absorb them. ``alpha`` comes from
calibration (``smooth_alpha``); ``None`` leaves channels as they are. Which is better is measured
(benchmarks/llm_quant.py chooses on validation text), not assumed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import ConfigError
from torchshrink.core.surgery import set_module
from torchshrink.llm.models import decoder_layers


def _input_maxima(model: nn.Module, linears: dict[str, nn.Linear], samples: torch.Tensor) -> dict[str, torch.Tensor]:
    amax: dict[str, torch.Tensor] = {}

    def make(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], m) if name in amax else m
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for row in samples:
                model(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return amax


def w8a8_lm(model: nn.Module, samples: torch.Tensor | None = None, *, smooth_alpha: float | None = None,
            reduce_range: bool | None = None, kernel: str = "linear_dynamic") -> dict[str, Any]:
    """Replace every decoder-layer Linear of ``model`` (in place) by a per-token W8A8 int8 Linear;
    ``samples`` (token rows ``[n, seq]``) are needed for ``smooth_alpha``. ``kernel``: torch's
    ``linear_dynamic`` op or ``onednn`` (torchshrink's activation codes + oneDNN's integer GEMM, the faster
    one for prompt-sized matrices: llm/prefill.py). Returns what was done."""
    from torchshrink.quant.common import cpu_has_vnni
    from torchshrink.quant.modules import Int8DynamicLinear

    if kernel not in ("linear_dynamic", "onednn"):
        raise ConfigError(f"kernel={kernel!r}; allowed: linear_dynamic, onednn")
    if smooth_alpha is not None and not 0.0 <= smooth_alpha <= 1.0:
        raise ConfigError(f"smooth_alpha={smooth_alpha}: must be in 0..1 (or None for no smoothing)")
    if smooth_alpha is not None and (samples is None or samples.dim() != 2):
        raise ConfigError("SmoothQuant needs calibration token rows [n_samples, seq_len]; give samples=")
    rr = (not cpu_has_vnni()) if reduce_range is None else reduce_range
    prefix, layers = decoder_layers(model)
    # a Linear subclass too (Falcon's FalconLinear, the same product), as GPTQ / SparseGPT take them
    linears = {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers)
               for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    was = model.training
    model.eval()
    try:
        amax = _input_maxima(model, linears, samples) if smooth_alpha is not None else {}
    finally:
        model.train(was)
    for name, lin in linears.items():
        smooth = None
        if smooth_alpha is not None:
            w_max = lin.weight.detach().abs().amax(0).float().clamp_min(1e-5)
            smooth = (amax[name].clamp_min(1e-5).pow(smooth_alpha) / w_max.pow(1 - smooth_alpha)).clamp(1e-5, 1e5)
        set_module(model, name, Int8DynamicLinear.from_float(lin, smooth=smooth, activation="token", reduce_range=rr,
                                                               kernel=kernel))
    from torchshrink.export.hf_guard import guard_save_pretrained

    guard_save_pretrained(model)
    return {"linears": len(linears), "smooth_alpha": smooth_alpha, "reduce_range": rr, "kernel": kernel}
