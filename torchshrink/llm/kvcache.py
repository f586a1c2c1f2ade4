"""An int8 (or int4) key/value cache for Hugging Face decoder LMs, usable from ``generate`` and any forward
that takes ``past_key_values``.

Every key and value vector is quantized when it enters the cache, per (batch, KV head, token), over the
head dimension (int8: symmetric absmax / 127; int4: asymmetric min/max in groups of ``group`` channels,
two codes per byte), and read back dequantized for attention. Per-token scales make appending free (no
re-quantization of old tokens, no full-precision residual window, unlike transformers' KIVI-style
``QuantizedCache``) and make the result of a whole-window forward equal token-by-token decoding: a
perplexity measured with the cache in a single forward is the decode-time perplexity, every key and
value -- the current token's included -- read from the quantized store.

Memory per token, layer and KV head: int8 ``head_dim + 4`` bytes (fp32 scale) against ``2 * head_dim``
for a bf16 cache and ``4 * head_dim`` for fp32 (head_dim 64: 68 vs 128 vs 256 bytes); int4 ``head_dim / 2
+ 8 * head_dim / group``. :func:`kv_bytes` counts what is stored.

``quantized_cache(model, bits=8)`` checks the model can use it (a decoder LM whose every layer is plain full
attention: sliding-window, linear-attention and cross-attention caches are refused in one line) and
returns a fresh cache for one generation / forward."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import ConfigError
from torchshrink.llm.models import full_attention_config, head_dim

KV_BITS = (8, 4)
USER = "the quantized KV cache"


def quantize_tokens(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, scale, zero) of ``x`` (..., D) per vector (int8) or per ``group`` channels (int4, packed)."""
    xf = x.float()
    if bits == 8:
        scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale, None
    g = xf.reshape(*xf.shape[:-1], xf.shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((g - lo) / scale).clamp_(0, 15).to(torch.uint8).reshape(xf.shape)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale[..., 0], lo[..., 0]  # scales (..., tokens, groups)


def dequantize_tokens(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    if bits == 8:
        return (codes.float() * scale).to(dtype)
    q = torch.stack([codes & 15, codes >> 4], -1).reshape(*codes.shape[:-1], codes.shape[-1] * 2).float()
    g = q.reshape(*q.shape[:-1], q.shape[-1] // group, group)
    return (g * scale[..., None] + zero[..., None]).reshape(q.shape).to(dtype)


def _int4_group(dim: int, group: int) -> None:
    if dim % group or group % 2:
        raise ConfigError(f"an int4 KV cache quantizes groups of {group} channels; the head dimension {dim} "
                          "is not a multiple (allowed: an even group dividing it)")


@functools.cache
def _layer_class() -> type:
    from transformers.cache_utils import BaseQuantizedLayer

    class TokenQuantizedLayer(BaseQuantizedLayer):
        """One layer's keys and values, quantized per token as they arrive (see the module docstring)."""

        def __init__(self, bits: int = 8, group: int = 32) -> None:
            super().__init__()
            self.bits, self.group = bits, group
            self._store: dict[str, list[torch.Tensor | None]] = {}

        def _quantize(self, tensor: torch.Tensor) -> Any:  # per-token quantization: see update
            return quantize_tokens(tensor, self.bits, self.group)

        def _dequantize(self, q_tensor: Any) -> torch.Tensor:
            return dequantize_tokens(*q_tensor, self.bits, self.group, self.dtype)

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device, self.dtype = key_states.device, key_states.dtype
            if self.bits == 4:
                _int4_group(key_states.shape[-1], self.group)
            self.keys = torch.tensor([], dtype=self.dtype, device=self.device)
            self.values = torch.tensor([], dtype=self.dtype, device=self.device)
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            for name, new in (("k", key_states), ("v", value_states)):
                q = self._quantize(new)
                old = self._store.get(name)
                self._store[name] = list(q) if old is None else [
                    None if a is None else torch.cat([a, b], dim=-2) for a, b in zip(old, q, strict=True)]
            return self._dequantize(self._store["k"]), self._dequantize(self._store["v"])

        def reset(self) -> None:
            super().reset()
            self._store = {}

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            for name, parts in self._store.items():
                self._store[name] = [None if t is None else t.index_select(0, beam_idx.to(t.device)) for t in parts]

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("the quantized KV cache cannot be cropped")

        def nbytes(self) -> int:
            return sum(t.numel() * t.element_size() for parts in self._store.values() for t in parts if t is not None)

    return TokenQuantizedLayer


def quantized_cache(model: nn.Module, bits: int = 8, group: int | None = None) -> Any:
    """A fresh int8 / int4 KV cache for ``model`` (int4 groups: ``group`` channels, default min(32, head_dim)) (pass it as ``cache=`` -- ``past_key_values=`` before transformers 5.2x -- to ``generate`` or a forward)."""
    if bits not in KV_BITS:
        raise ConfigError(f"kv bits={bits}; allowed: {', '.join(map(str, KV_BITS))}")
    cfg = full_attention_config(model, USER)
    d = head_dim(cfg)
    group = group or min(32, d)
    if bits == 4:
        _int4_group(d, group)
    from transformers.cache_utils import Cache

    cls = _layer_class()
    return Cache(layers=[cls(bits, group) for _ in range(cfg.num_hidden_layers)])


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a model's forward takes its cache by: ``cache`` (transformers 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_bytes(cache: Any) -> int:
    """Bytes a cache holds for its keys and values (codes and scales for ours; the tensors of any other)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def bytes_per_token(model: nn.Module, bits: int | None, group: int | None = None, dtype: torch.dtype = torch.float32) -> int:
    """KV bytes per token over all layers: ``bits=None`` for a plain cache of ``dtype``; int4 groups as
    :func:`quantized_cache` takes them (default min(32, head_dim))."""
    cfg = full_attention_config(model, USER)
    d = head_dim(cfg)
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    group = group or min(32, d)
    if bits == 4:
        _int4_group(d, group)
    per_head = (d * torch.empty(0, dtype=dtype).element_size() if bits is None else
                d + 4 if bits == 8 else d // 2 + 8 * (d // group))
    return 2 * cfg.num_hidden_layers * kv * per_head
