"""Fast batch-1 decoding of Llama-family causal LMs on torchshrink's own int4 / int8 GEMV kernels
(``llm/_decode.c``), one C call per token.

``Decoder.from_model(model)`` takes a Hugging Face Llama / Qwen2 / Mistral-without-sliding-window causal LM
whose decoder Linears are :class:`~torchshrink.llm.modules.PackedLinear` (W4 / W8 from
``quantize_lm``: their GPTQ / AWQ codes are used as they are) or plain ``nn.Linear`` (quantized here to
``float_bits`` round-to-nearest, groups of ``group``). The LM head and the embedding table are stored as
8-bit groups (``head_bits``; one table when they are tied). Each weight group's codes run against the
activations quantized to int8 per group (the scheme of llama.cpp's Q4_0 x Q8_0 dot products), so outputs
equal the dequantize-then-matmul reference on those int8 activations to float rounding, and the float
reference to ~1e-2 relative (tests/test_llm_decode.py).

``generate(ids, max_new_tokens)`` is greedy decoding: the prompt goes through :meth:`Decoder.prefill` in
chunks of ``chunk`` tokens, each new token through :meth:`Decoder.step` (fp32 KV cache of ``max_len`` positions inside the engine, RoPE from the model's own
rotary tables). ``logits(ids)`` scores a sequence token by token (perplexity of the engine itself).
Refused in one line: a model that is not a decoder LM of a supported family, grids the kernels cannot
run, a sequence longer than ``max_len``."""

from __future__ import annotations

import ctypes
import dataclasses
import time
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.llm.models import full_attention_config, head_dim

SUPPORTED = ("llama", "qwen2", "mistral")


@dataclasses.dataclass
class QMat:
    """One matrix in the engine's layout (see ``_decode.c``): codes, interleaved fp16 (scale, offset) per
    (row, group), optional fp32 bias."""

    codes: torch.Tensor
    sm: torch.Tensor
    bias: torch.Tensor | None
    rows: int
    cols: int
    group: int
    bits: int

    def desc(self) -> list[int]:
        return [self.codes.data_ptr(), self.sm.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(),
                self.rows, self.cols, self.group, self.bits]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.sm, self.bias) if t is not None)

    def dequantized(self) -> torch.Tensor:
        """The float weight these codes stand for (w = c * s + m)."""
        c = unpack_block_codes(self.codes, self.bits, self.cols).float().reshape(self.rows, -1, self.group)
        sm = self.sm.view(torch.float16).float().reshape(self.rows, -1, 2)
        return (c * sm[..., :1] + sm[..., 1:]).reshape(self.rows, self.cols)


def pack_block_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[rows, cols]`` -> the engine's bytes: 8-bit as is; 4-bit per block of 32 with code j
    in the low nibble of byte j and code j + 16 in its high nibble."""
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    b = c.reshape(c.shape[0], -1, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(c.shape[0], -1).contiguous()


def unpack_block_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    if bits == 8:
        return packed
    b = packed.reshape(packed.shape[0], -1, 16)
    return torch.stack([b & 15, b >> 4], 2).reshape(packed.shape[0], cols)


def qmat(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
         bias: torch.Tensor | None = None) -> QMat:
    """A QMat from unsigned codes with per (row, group) ``scale`` / ``zero`` (w = (c - zero) * scale)."""
    rows, cols = codes.shape
    if bits not in (4, 8):
        raise ConfigError(f"the decode kernels run 4- and 8-bit codes; this weight has {bits}-bit codes")
    if group % 32 or cols % group:
        raise ConfigError(f"the decode kernels need groups that are a multiple of 32 dividing the width; "
                          f"group {group} on a width of {cols}")
    s = scale.float().reshape(rows, cols // group)
    m = -zero.float().reshape(rows, cols // group) * s
    sm = torch.stack([s, m], -1).half().reshape(rows, -1).view(torch.int16).contiguous()
    return QMat(pack_block_codes(codes, bits), sm, None if bias is None else bias.detach().float().contiguous(),
                rows, cols, group, bits)


def qgemv(mat: QMat, x: torch.Tensor) -> torch.Tensor:
    """``W x`` on the engine's kernel for one vector (the test entry point of the GEMV: x is quantized to int8
    per group inside, as in decoding)."""
    from torchshrink.core.native import library

    lib = library()
    if lib is None:
        raise UnsupportedLayerError("the decode kernels need torchshrink's native library")
    x = x.detach().float().contiguous()
    if x.shape != (mat.cols,):
        raise ConfigError(f"x has shape {tuple(x.shape)}; the matrix takes ({mat.cols},)")
    y = torch.empty(mat.rows)
    q, d, ds = torch.empty(mat.cols, dtype=torch.int8), torch.empty(mat.cols // mat.group), torch.empty(mat.cols // mat.group)
    desc = torch.tensor(mat.desc(), dtype=torch.int64)
    lib.ts_qgemv(*(ctypes.c_void_p(t.data_ptr()) for t in (desc, x, y, q, d, ds)))
    return y


def act_qmax(bits: int) -> int:
    """The int8 activation range the kernel uses against ``bits``-bit codes on this CPU (7 bits against 8-bit
    codes on the AVX2 path, where a u8 x s8 pair could saturate int16)."""
    from torchshrink.core.native import library

    lib = library()
    return 63 if bits == 8 and lib is not None and lib.ts_lm_isa() == 1 else 127


def _from_float(w: torch.Tensor, bits: int, group: int, bias: torch.Tensor | None = None) -> QMat:
    from torchshrink.llm.wquant import Grid, rtn

    g = group if w.shape[1] % group == 0 else (32 if w.shape[1] % 32 == 0 else 0)
    if not g:
        raise ConfigError(f"a {w.shape[1]}-wide weight has no group of 32 / {group} columns; the decode kernels need one")
    q = rtn(w.detach().float(), Grid(bits, g, False))
    return qmat(q.codes, q.scale, q.zero, bits, g, bias)


def _from_linear(m: nn.Module, float_bits: int, group: int) -> QMat:
    from torchshrink.llm.modules import PackedLinear

    if isinstance(m, PackedLinear):
        g = m.group or m.in_features
        if m.bits in (4, 8) and g % 32 == 0:
            return qmat(m.codes(), m.scale, m.zero, m.bits, g, m.bias)
        return _from_float(m.dequantized_weight(), 8 if m.bits > 4 else 4, group, m.bias)
    if isinstance(m, nn.Linear):
        return _from_float(m.weight, float_bits, group, m.bias)
    raise UnsupportedLayerError(f"{type(m).__name__}: the decoder takes nn.Linear or PackedLinear projections")


def _check(model: nn.Module) -> Any:
    cfg = full_attention_config(model, "the decoder")
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise UnsupportedLayerError(f"model type {mt!r}: the decoder runs {', '.join(SUPPORTED)} (Llama-style "
                                    "pre-norm blocks with SwiGLU)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedLayerError(f"activation {cfg.hidden_act!r}: the decoder runs SwiGLU (silu) FFNs")
    return cfg


def _check_shapes(cfg: list[int], mats: dict[str, Any], norms: list[torch.Tensor], cos: torch.Tensor) -> None:
    """Every matrix, norm and table the C step reads has the size the config says (a config that disagrees with
    its weights would make the kernels read past them): one line naming the first mismatch."""
    layers, h, heads, kv, hd, inter, vocab, max_len = cfg
    if heads % kv:
        raise UnsupportedLayerError(f"{heads} attention heads do not split into {kv} KV groups")
    want = {"q": (heads * hd, h), "k": (kv * hd, h), "v": (kv * hd, h), "o": (h, heads * hd), "gate": (inter, h),
            "up": (inter, h), "down": (h, inter)}
    for i, lm in enumerate(mats["layers"]):
        for n, (rows, cols) in want.items():
            if (lm[n].rows, lm[n].cols) != (rows, cols):
                raise UnsupportedLayerError(f"layer {i} {n}_proj is {lm[n].rows}x{lm[n].cols}; the config says "
                                            f"{rows}x{cols}")
    for n in ("head", "embed"):
        if (mats[n].rows, mats[n].cols) != (vocab, h):
            raise UnsupportedLayerError(f"{n} is {mats[n].rows}x{mats[n].cols}; the config says {vocab}x{h}")
    if any(t.numel() != h for t in norms) or tuple(cos.shape) != (max_len, hd):
        raise UnsupportedLayerError(f"a norm weight or the rotary table does not match hidden size {h} / head dim {hd}")


class Decoder:
    """See the module docstring. Holds its own copy of the weights in the engine layout."""

    def __init__(self, cfg: list[int], eps: float, mats: dict[str, Any], norms: list[torch.Tensor],
                 cos: torch.Tensor, sin: torch.Tensor, chunk: int = 64) -> None:
        import os

        from torchshrink.core.native import library

        self.lib = library()
        if self.lib is None:
            raise UnsupportedLayerError("the decode kernels need torchshrink's native library (a C compiler; "
                                        "TORCHSHRINK_KERNELS=torch turns it off)")
        self.layers, self.hidden, self.heads, self.kv, self.head_dim, self.inter, self.vocab, self.max_len = cfg
        self.eps, self.mats, self.norms, self.cos, self.sin = eps, mats, norms, cos, sin
        # prompt tokens per call (the scratch holds this many); 64 measured faster than 256 on a 512-token prompt
        # (1.2 s vs 1.7 s, SmolLM2 W4, Zen 4, 2 threads): the chunk's activations stay in cache
        self.chunk = max(1, min(chunk, self.max_len))
        threads = max(os.cpu_count() or 1, torch.get_num_threads())
        self.cfg = torch.tensor([*cfg, self.chunk, threads], dtype=torch.int64)
        shape = (self.layers, self.kv, self.max_len, self.head_dim)
        self.kcache, self.vcache = torch.zeros(shape), torch.zeros(shape)
        self.scratch = torch.zeros(int(self.lib.ts_lm_scratch(ctypes.c_void_p(self.cfg.data_ptr()))))
        self.out = torch.zeros(self.vocab)
        words = [norms[-1].data_ptr(), cos.data_ptr(), sin.data_ptr(), self.kcache.data_ptr(), self.vcache.data_ptr(),
                 self.scratch.data_ptr(), *mats["embed"].desc(), *mats["head"].desc()]
        for i in range(self.layers):
            words += [norms[2 * i].data_ptr(), norms[2 * i + 1].data_ptr()]
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                words += mats["layers"][i][name].desc()
        self.words = torch.tensor(words, dtype=torch.int64)
        self.pos = 0
        # a torch model that prefills a prompt from position 0 on a GEMM path (llm/prefill.py), or None: the engine
        self.prefill_with: nn.Module | None = None
        self.prefill_mode = "engine"

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, *, max_len: int = 2048, float_bits: int = 8, head_bits: int = 8,
                   group: int = 64, chunk: int = 64) -> Decoder:
        cfg = _check(model)
        if float_bits not in (4, 8) or head_bits not in (4, 8):
            raise ConfigError(f"float_bits={float_bits}, head_bits={head_bits}; allowed: 4, 8")
        if max_len < 1:
            raise ConfigError(f"max_len={max_len} must be >= 1")
        base = model.model
        layers = list(base.layers)
        hd = head_dim(cfg)
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        mats: dict[str, Any] = {"layers": []}
        norms: list[torch.Tensor] = []
        groups = set()
        for layer in layers:
            a, f = layer.self_attn, layer.mlp
            lm = {n: _from_linear(getattr(a, n + "_proj"), float_bits, group) for n in ("q", "k", "v", "o")}
            lm.update({n: _from_linear(getattr(f, n + "_proj"), float_bits, group) for n in ("gate", "up", "down")})
            if len({lm[n].group for n in ("q", "k", "v")}) > 1 or lm["gate"].group != lm["up"].group:
                raise ConfigError("q/k/v (and gate/up) share one quantized input: give them one group size")
            groups.update(m.group for m in lm.values())
            mats["layers"].append(lm)
            norms += [layer.input_layernorm.weight.detach().float().contiguous(),
                      layer.post_attention_layernorm.weight.detach().float().contiguous()]
        norms.append(base.norm.weight.detach().float().contiguous())
        head = model.get_output_embeddings()
        emb = base.embed_tokens
        mats["head"] = _from_float(head.weight, head_bits, group, getattr(head, "bias", None))
        mats["embed"] = mats["head"] if head.weight is emb.weight else _from_float(emb.weight, head_bits, group)
        rot = base.rotary_emb
        pos = torch.arange(max_len)[None]
        cos, sin = rot(torch.zeros(1, 1, cfg.hidden_size), pos)
        eps = float(getattr(layers[0].input_layernorm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6)))
        shape = [len(layers), cfg.hidden_size, cfg.num_attention_heads, kv, hd, mats["layers"][0]["gate"].rows,
                 cfg.vocab_size, max_len]
        if hd % 2:
            raise UnsupportedLayerError(f"head dimension {hd} is odd; RoPE needs an even one")
        _check_shapes(shape, mats, norms, cos[0])
        return cls(shape, eps, mats, norms, cos[0].float().contiguous(), sin[0].float().contiguous(), chunk)

    def nbytes(self) -> int:
        """Bytes of the weights the engine holds (codes, scales, norms, RoPE tables; not the KV cache)."""
        ms = [self.mats["head"], *([self.mats["embed"]] if self.mats["embed"] is not self.mats["head"] else []),
              *(m for lm in self.mats["layers"] for m in lm.values())]
        return sum(m.nbytes() for m in ms) + sum(n.numel() * 4 for n in self.norms) + 8 * self.cos.numel()

    def reset(self) -> None:
        self.pos = 0

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pos + tokens.numel() > self.max_len:
            raise ConfigError(f"the sequence reached max_len={self.max_len}; build the Decoder with a larger max_len")
        rc = self.lib.ts_lm_forward(ctypes.c_void_p(self.cfg.data_ptr()), ctypes.c_void_p(self.words.data_ptr()),
                                    ctypes.c_float(self.eps), ctypes.c_void_p(tokens.data_ptr()), tokens.numel(), self.pos,
                                    ctypes.c_void_p(self.out.data_ptr()))
        if rc == 2:
            raise ConfigError(f"a token is outside the vocabulary of {self.vocab}: {tokens.tolist()[:8]}")
        if rc:
            raise ConfigError(f"decode call refused (code {rc}) at position {self.pos} for {tokens.numel()} tokens")
        self.pos += tokens.numel()
        return self.out

    def step(self, token: int) -> torch.Tensor:
        """Run one token at the next position; the vocabulary logits (a buffer reused by the next call)."""
        return self._forward(torch.tensor([int(token)], dtype=torch.int64))

    def prefill(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Run a prompt from the next position in chunks (each weight row serves a whole chunk), or, at position
        0 with a GEMM path chosen (:func:`torchshrink.llm.prefill.choose_prefill`), through that; the logits of
        its last token."""
        ids = torch.as_tensor(ids, dtype=torch.int64).flatten().contiguous()
        if ids.numel() == 0:
            raise ConfigError("prefill needs at least one token")
        if self.prefill_with is not None and self.pos == 0 and ids.numel() > 1:
            from torchshrink.llm.prefill import torch_prefill

            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab:
                raise ConfigError(f"a token is outside the vocabulary of {self.vocab}: {ids.tolist()[:8]}")
            return torch_prefill(self, self.prefill_with, ids)
        for i in range(0, ids.numel(), self.chunk):
            out = self._forward(ids[i:i + self.chunk].contiguous())
        return out

    def logits(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """``[T, vocab]`` logits of a sequence run token by token from position 0."""
        ids = [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        self.reset()
        return torch.stack([self.step(t).clone() for t in ids])

    def generate(self, ids: torch.Tensor | list[int], max_new_tokens: int, eos: int | None = None) -> dict[str, Any]:
        """Greedy continuation: {"tokens": new ids, "prefill_s", "decode_s", "tokens_per_s"}."""
        ids = [int(t) for t in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise ConfigError("generate needs at least one prompt token")
        if len(ids) + max_new_tokens > self.max_len:
            raise ConfigError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}")
        self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        t1 = time.perf_counter()
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits))
            new.append(nxt)
            if eos is not None and nxt == eos or len(new) == max_new_tokens:
                break
            logits = self.step(nxt)
        t2 = time.perf_counter()
        return {"tokens": new, "prefill_s": t1 - t0, "decode_s": t2 - t1,
                "tokens_per_s": (len(new) - 1) / (t2 - t1) if len(new) > 1 else float("nan")}
