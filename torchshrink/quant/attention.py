"""Encoder self-attention on torchshrink's C kernel, for BERT-family blocks (MiniLM, BERT, RoBERTa, ...).

torch's CPU attention (SDPA's flash kernel) is slow at the shapes sentence encoders run (128 tokens, heads
of 32): on a 2-core AMD EPYC (Zen 4), 16 x 128 tokens, 6 heads of 32, it took ~3.1 ms a layer where
``_attn.c`` took ~2.1 (float32, the same results within 1e-6; benchmarks/results/attention.md). :class:`NativeSelfAttention` replaces a ``*SelfAttention`` module: it keeps the
``query`` / ``key`` / ``value`` children (so the state dict is unchanged, and a fused INT8 Q/K/V projection
still runs as one GEMM), reads the three straight out of the projection output (no head transposes), and
writes the result in the layout the output projection reads. Inference only; :func:`fuse_attention` swaps
the blocks, each checked against its own output on a calibration batch (left on torch where it differs).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from torchshrink.core import native
from torchshrink.core.data import Batch
from torchshrink.core.surgery import set_module
from torchshrink.export.modules import register_module

log = logging.getLogger(__name__)
MASKED = -1e30  # a masked key's additive score (exp gives < 2e-38)


_LAST = threading.local()  # the last mask converted (every block of a forward gets the same tensor)


def additive_mask(mask: torch.Tensor | None, batch: int, seq: int, keys: int | None = None) -> torch.Tensor | None:
    """A Hugging Face attention mask -- boolean (True: attend) or additive float, broadcastable to
    [batch, 1, seq, seq] -- as an additive float32 tensor of that rank (a mask expanded over the queries stays
    one row per batch; ``keys``: the key count where it differs from ``seq``). The conversion of the tensor given
    last is reused while it is unchanged."""
    if mask is None:
        return None
    version = -1 if mask.is_inference() else mask._version  # inference tensors keep no version counter
    last = getattr(_LAST, "pair", None)
    if last is not None and last[0] is mask and last[1] == version:
        return last[2]
    out = _additive(mask, batch, seq, seq if keys is None else keys)
    _LAST.pair = (mask, version, out)
    return out


def _additive(mask: torch.Tensor, batch: int, seq: int, keys: int) -> torch.Tensor:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, seq) \
            or mask.shape[3] != keys:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)}; expected [batch, 1, 1 or {seq}, {keys}]")
    if mask.shape[2] > 1 and mask.stride(2) == 0:  # one key-padding row expanded over the queries
        mask = mask[:, :, :1]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, MASKED)
    return mask.float().contiguous()


def _fake_general(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                  mask: torch.Tensor | None, bf16: bool = False) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])


@native.kernel_op("attention", fake=_fake_general)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              mask: torch.Tensor | None, bf16: bool = False) -> torch.Tensor:
    """softmax(scale * Q K^T + mask) V, transformers' layout: q [B, H, Sq, D], k / v [B, Hkv, Skv, D] float32
    (any strides with D contiguous; query head h reads key head h // (H / Hkv)); ``causal``: query i of the
    last Sq positions sees keys up to i + Skv - Sq; mask as :func:`additive_mask` gives it. ``bf16``: the
    products Q K^T and P V in bfloat16 with float32 sums (AVX-512 BF16; elsewhere, or for D not a multiple of 16,
    float32 as without it). Returns [B, Sq, H * D]."""
    b, h, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    lib = native.library()
    if lib is None or h % hkv:
        if causal:  # bottom-right aligned (torch's is_causal aligns top-left when sq != skv)
            allowed = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
            mask = torch.zeros(sq, skv).masked_fill_(~allowed, MASKED) + (0.0 if mask is None else mask)
        rep = max(1, h // hkv)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(b, sq, h * d).nan_to_num_(0.0)
    q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, sq, h * d, dtype=torch.float32)
    mb = mq = 0
    if mask is not None:
        mb = mask.stride(0) if mask.shape[0] > 1 else 0
        mq = mask.stride(2) if mask.shape[2] > 1 else 0
    with record_function("torchshrink::attention"):
        rc = lib.ts_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), b, sq, skv, h, hkv, d,
                              *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], scale,
                              None if mask is None else mask.data_ptr(), mb, mq, int(causal), int(bf16),
                              out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("attention: could not allocate the per-thread key buffer")
    return out


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
                      mask: torch.Tensor | None, bf16: bool = False) -> torch.Tensor:
    """:func:`attention` for BERT blocks: q, k, v [B, S, heads * D] float32 (e.g. slices of one fused Q/K/V
    output, each row contiguous), viewed per head without a copy; not causal. Returns [B, S, heads * D]."""
    b, s, width = q.shape
    q4, k4, v4 = (t.reshape(b, s, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    return attention(q4, k4, v4, scale, False, mask, bf16)


def hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function (``AttentionInterface``) on :func:`attention`: inference only (no
    dropout, no attention weights, no soft-capping or sliding window)."""
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None or dropout:
        raise ValueError("torchshrink attention has no soft-capping, sliding window or dropout")
    b, h, sq, d = query.shape
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False)) and sq > 1 \
        and attention_mask is None
    out = attention(query.float(), key.float(), value.float(), float(scaling if scaling is not None else d ** -0.5),
                    causal, additive_mask(attention_mask, b, sq, key.shape[2]))
    return out.view(b, sq, h, d).to(query.dtype), None


def use_hf_attention(model: nn.Module) -> None:
    """Run ``model``'s transformers attention layers on :func:`hf_attention` (registered as "torchshrink", its
    masks built as for SDPA). Changes ``model.config`` -- for a private copy, not a model to be saved."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("torchshrink", hf_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("torchshrink", sdpa_mask)
    model.config._attn_implementation = "torchshrink"


@register_module
class NativeSelfAttention(nn.Module):
    """A BERT-style self-attention block (``query`` / ``key`` / ``value`` children, no relative positions, not
    causal) running :func:`encoder_attention`. Returns ``(output, None)`` like the block it replaces (no
    attention weights). Inference only: no attention dropout, no gradients through the kernel."""

    def __init__(self, heads: int, head_dim: int, scaling: float, bf16: bool = False) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size, self.scaling = heads, head_dim, scaling
        self.bf16 = bool(bf16)  # bfloat16 products (see attention())

    def init_args(self) -> dict[str, Any]:
        return {"heads": self.num_attention_heads, "head_dim": self.attention_head_size, "scaling": self.scaling,
                "bf16": self.bf16}

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if kwargs.get("encoder_hidden_states") is not None or kwargs.get("cache") is not None:
            raise RuntimeError("NativeSelfAttention is self-attention without a cache")
        dtype = hidden_states.dtype
        q, k, v = self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)
        b, s = q.shape[0], q.shape[1]
        out = encoder_attention(q.float(), k.float(), v.float(), self.num_attention_heads, float(self.scaling),
                                additive_mask(attention_mask, b, s), self.bf16)
        return out.to(dtype), None


def attention_blocks(model: nn.Module) -> list[str]:
    """Names of the modules :class:`NativeSelfAttention` can replace: a ``*SelfAttention`` class with
    ``query`` / ``key`` / ``value`` children and integer head settings, not a decoder's, not causal, and
    without relative-position embeddings."""
    out = []
    for name, m in model.named_modules():
        kids = dict(m.named_children())
        heads, size = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
        if (type(m).__name__.endswith("SelfAttention") and type(m) is not NativeSelfAttention
                and all(k in kids for k in ("query", "key", "value"))
                and isinstance(heads, int) and isinstance(size, int) and heads > 0 and size > 0
                and not getattr(m, "is_decoder", False) and not getattr(m, "is_causal", False)
                and "distance_embedding" not in kids
                and getattr(m, "position_embedding_type", "absolute") in ("absolute", None)):
            out.append(name)
    return out


BF16_RTOL = 2e-2  # bfloat16 keeps 8 bits of mantissa: products within ~0.4%, a block's output within ~1%


@torch.inference_mode()
def fuse_attention(model: nn.Module, batch: Batch | None, rtol: float | None = None, bf16: bool = False
                   ) -> tuple[list[str], str | None]:
    """Swap every :func:`attention_blocks` module for a :class:`NativeSelfAttention` where, on ``batch``, the new
    block reproduces the old one's output on the old one's inputs (within ``rtol`` of its largest magnitude:
    default 1e-4, with ``bf16`` products :data:`BF16_RTOL`).
    Blocks are checked one by one: the model's final output is no test here, since an INT8 model with one grid
    per tensor turns a 1e-6 change in one block into ~1e-2 at its output (code flips; measured on MiniLM).
    Returns (swapped names, reason nothing was swapped or None)."""
    names = attention_blocks(model)
    if not names:
        return [], "no BERT-style self-attention block"
    if batch is None:
        return [], "no calibration batch to check the swap on"
    from torchshrink.quant.fused import first_calls

    rtol = rtol if rtol is not None else (BF16_RTOL if bf16 else 1e-4)
    seen = first_calls(model, names, batch)
    swapped, why = [], {}
    for n in names:
        if n not in seen:
            why[n] = "not called on the calibration batch"
            continue
        old = model.get_submodule(n)
        new = NativeSelfAttention(old.num_attention_heads, old.attention_head_size,
                                  float(getattr(old, "scaling", old.attention_head_size ** -0.5)), bf16).eval()
        for kid in ("query", "key", "value"):
            new.add_module(kid, getattr(old, kid))
        args, kwargs, out = seen[n]
        ref = out[0] if isinstance(out, tuple) else out
        try:
            got = new(*args, **kwargs)[0]
        except Exception as e:  # the block is called with something this module does not take
            why[n] = f"{type(e).__name__}: {e}"
            continue
        if got.shape != ref.shape or (got - ref).abs().max() > rtol * max(ref.abs().max().item(), 1e-6):
            why[n] = "its output differs"
            continue
        set_module(model, n, new)
        swapped.append(n)
    if why:
        log.warning("attention on torchshrink's kernel in %d blocks, not in %d (%s)", len(swapped), len(why),
                    "; ".join(sorted(set(why.values())))[:300])
    return swapped, None if swapped else "; ".join(sorted(set(why.values())))
