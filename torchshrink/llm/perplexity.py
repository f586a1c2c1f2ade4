"""Perplexity over windows of real text, and a generation smoke check.

``perplexity(model, ids, window=512, stride=None)``: with ``stride == window`` (default) the text is cut
into non-overlapping windows and every token but each window's first is scored; with a smaller stride
windows overlap and only the tokens not scored by the previous window are (each with up to
``window - stride`` tokens of extra context), as in the Hugging Face perplexity guide. Returns the
perplexity, mean negative log-likelihood and the number of scored tokens, so every figure says how
much text it rests on."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.errors import DataError
from torchshrink.llm.models import causal_lm


def token_ids(tokenizer: Any, paragraphs: list[str], max_tokens: int | None = None) -> list[int]:
    """The token ids of the paragraphs joined by blank lines (a BOS token first where the tokenizer has
    one); tokenizing stops once ``max_tokens`` are reached."""
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for p in paragraphs:
        ids.extend(tokenizer(p + "\n\n", add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids


def token_windows(tokenizer: Any, paragraphs: list[str], max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of the paragraphs joined by blank lines (a BOS token first where the
    tokenizer has one), as a 1-D tensor."""
    if max_tokens < 2:
        raise DataError(f"max_tokens={max_tokens}: at least 2 tokens are needed")
    ids = token_ids(tokenizer, paragraphs, max_tokens)
    if len(ids) < max_tokens:
        raise DataError(f"the text has {len(ids)} tokens, fewer than the {max_tokens} asked for; give more text "
                        "or ask for fewer tokens")
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def calibration_and_eval(tokenizer: Any, samples: int, eval_tokens: int, *, val_tokens: int = 4096,
                         window: int = 512) -> dict[str, Any]:
    """The benchmarks' text: ``samples`` calibration rows of ``window`` tokens and ``val_tokens`` validation
    tokens from the calibration documents, ``eval_tokens`` from the held-out ones, and the document names."""
    from torchshrink.llm.text import prose_split

    cal, ev, docs = prose_split()
    cal_ids = token_windows(tokenizer, cal, samples * window + val_tokens)
    return {"samples": cal_ids[: samples * window].reshape(samples, window), "val": cal_ids[samples * window:],
            "eval": token_windows(tokenizer, ev, eval_tokens), "documents": docs}


def training_rows(tokenizer: Any, samples: int, *, val_tokens: int = 4096, window: int = 512) -> torch.Tensor:
    """Every calibration-document token :func:`calibration_and_eval` does not hold out for validation, as rows
    of ``window`` (its ``samples`` calibration rows first): text to distill on that never saw evaluation or
    validation tokens."""
    from torchshrink.llm.text import prose_split

    cal, _, _ = prose_split()
    ids = torch.tensor(token_ids(tokenizer, cal), dtype=torch.long)
    n = samples * window
    rows = torch.cat([ids[:n], ids[n + val_tokens:]])
    return rows[: rows.numel() // window * window].reshape(-1, window)


def _logits(model: nn.Module, x: torch.Tensor, kv_bits: int | None = None) -> torch.Tensor:
    if kv_bits is None:
        out = model(input_ids=x, use_cache=False)
    else:  # every key and value read back from the quantized cache, as in token-by-token decoding
        from torchshrink.llm.kvcache import cache_kwarg, quantized_cache

        out = model(input_ids=x, use_cache=True, **{cache_kwarg(model): quantized_cache(model, kv_bits)})
    return out.logits if hasattr(out, "logits") else out[0]


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, *, window: int = 512, stride: int | None = None,
               batch: int = 4, kv_bits: int | None = None) -> dict[str, float]:
    """Perplexity of ``model`` on the 1-D token tensor ``ids`` (see the module docstring); ``kv_bits`` 8 or 4:
    with keys and values stored in :mod:`torchshrink.llm.kvcache`'s quantized cache (decode-time perplexity)."""
    causal_lm(model)
    stride = stride or window
    if not 0 < stride <= window:
        raise DataError(f"stride={stride} must be in 1..window ({window})")
    n = int(ids.numel())
    need = window + 1 if stride < window else window  # overlapping windows score from the second token on
    if n < need:
        raise DataError(f"the text has {n} tokens, too short for windows of {window}; give more text or a smaller window")
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        if stride == window:
            k = n // window
            wins = ids[: k * window].reshape(k, window)
            for i in range(0, k, batch):
                x = wins[i:i + batch]
                logp = F.log_softmax(_logits(model, x, kv_bits)[:, :-1].float(), -1)
                nll -= float(logp.gather(-1, x[:, 1:, None]).sum())
                count += x[:, 1:].numel()
        else:
            prev_end = 0
            for begin in range(0, n, stride):
                end = min(begin + window, n)
                x = ids[begin:end][None]
                logp = F.log_softmax(_logits(model, x, kv_bits)[:, :-1].float(), -1)
                tok = logp.gather(-1, x[:, 1:, None])[0, :, 0]
                new = end - max(prev_end, begin + 1)  # tokens not scored yet (never the window's first)
                nll -= float(tok[-new:].sum())
                count += new
                prev_end = end
                if end == n:
                    break
    finally:
        model.train(was)
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "window": window, "stride": stride}


@torch.inference_mode()
def generate_check(model: nn.Module, tokenizer: Any, prompt: str = "The Debian project is", new_tokens: int = 24
                   ) -> dict[str, Any]:
    """Greedy continuation of ``prompt``; ``ok`` when it produced text that is not one token repeated."""
    causal_lm(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    return {"prompt": prompt, "text": text, "ok": len(set(new)) > 3 and bool(text.strip())}
