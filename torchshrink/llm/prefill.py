"""Prompt prefill for the decode engine on a GEMM path, chosen by measurement.

The engine (``llm/_decode.c``) is built for batch-1 decoding: one weight row against one token's int8
activations. A prompt is a matrix of tokens, where a GEMM library wins: this module runs the prompt through
a torch copy of the model whose weights are the engine's dequantized ones, in bf16 (oneDNN bf16 GEMM where
the CPU has native bf16) or INT8 (torchshrink's W8A8 kernels, per-token activations, oneDNN's integer GEMM;
attention on torchshrink's float32 kernel), computes the logits of
the last token only, and writes the keys (after RoPE) and values into the engine's KV cache, so decoding
goes on in the engine as if it had read the prompt itself. :func:`choose_prefill` times the engine's own
chunked prefill against both on a prompt of the given length and keeps the fastest.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchshrink.core.errors import ConfigError

if TYPE_CHECKING:
    from torchshrink.llm.decode import Decoder

MODES = ("engine", "bf16", "int8")


def prefill_model(model: nn.Module, mode: str) -> nn.Module:
    """A copy of ``model`` for prompts: packed Linears as dense ones (their dequantized weights), then the
    decoder in bf16 or its Linears on the INT8 kernels."""
    from torchshrink.core.surgery import set_module
    from torchshrink.llm.modules import PackedLinear

    if mode not in MODES[1:]:
        raise ConfigError(f"prefill mode {mode!r}; allowed: {', '.join(MODES)}")
    pm = copy.deepcopy(model).eval()
    for name, m in list(pm.named_modules()):
        if isinstance(m, PackedLinear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight.data = m.dequantized_weight().float()
            if m.bias is not None:
                dense.bias.data = m.bias.detach().float().clone()
            set_module(pm, name, dense)
    if mode == "bf16":
        return pm.to(torch.bfloat16)
    from torchshrink.llm.w8a8 import w8a8_lm

    w8a8_lm(pm, kernel="onednn")  # our per-token codes + oneDNN's integer GEMM (prompt-sized matrices)
    from torchshrink.quant.attention import use_hf_attention

    use_hf_attention(pm)  # causal grouped-query attention on torchshrink's float32 kernel
    return pm


@torch.inference_mode()
def torch_prefill(dec: Decoder, pm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Run ``ids`` (from position 0) through ``pm``, write its KV cache into ``dec``'s; the last token's logits."""
    from transformers import DynamicCache

    n = ids.numel()
    if dec.pos != 0:
        raise ConfigError("a GEMM prefill starts a sequence (position 0); later tokens go through the engine")
    if n > dec.max_len:
        raise ConfigError(f"the sequence reached max_len={dec.max_len}; build the Decoder with a larger max_len")
    cache = DynamicCache()
    out = pm(input_ids=ids.reshape(1, -1), past_key_values=cache, use_cache=True, logits_to_keep=1)
    for i, layer in enumerate(cache.layers):
        dec.kcache[i, :, :n].copy_(layer.keys[0])
        dec.vcache[i, :, :n].copy_(layer.values[0])
    dec.pos = n
    return out.logits[0, -1].float()


def choose_prefill(dec: Decoder, model: nn.Module, tokens: int = 256, modes: tuple[str, ...] = MODES,
                   rounds: int = 2) -> dict[str, Any]:
    """Time the engine's prefill and each GEMM path on a ``tokens``-long prompt (interleaved, best of
    ``rounds``), keep the fastest in ``dec``; {"chosen", "seconds": {mode: s}, "tokens"}."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"prefill mode {bad[0] if bad else '(none)'!r}; allowed: {', '.join(MODES)}")
    tokens = max(1, min(tokens, dec.max_len))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dec.vocab, (tokens,), generator=g)
    paths = {m: (prefill_model(model, m) if m != "engine" else None) for m in modes}
    best: dict[str, float] = {}
    for _ in range(rounds):
        for m, pm in paths.items():
            dec.reset()
            dec.prefill_with = pm
            t0 = time.perf_counter()
            dec.prefill(ids)
            best[m] = min(best.get(m, float("inf")), time.perf_counter() - t0)
    chosen = min(best, key=best.__getitem__)
    dec.prefill_with = paths[chosen]
    dec.prefill_mode = chosen
    dec.reset()
    return {"chosen": chosen, "seconds": best, "tokens": tokens}
