"""GGUF export of Llama-family causal LMs, written from torchshrink's own codes.

A Linear quantized by :func:`~torchshrink.llm.sequential.quantize_lm` with ``pack=True`` on a GGUF grid
(:func:`gguf_grid`: blocks of 32 along the input, fp16 scales) is written code for code:

- ``Q8_0``: ``w = d * q``, ``q`` int8 -- our W8 g32 symmetric codes minus 128;
- ``Q4_0``: ``w = d * (q - 8)``, ``q`` in 0..15 -- our W4 g32 symmetric codes (zero point 8), by
  default on the full signed range as llama.cpp's own quantizer (``d`` negative where the largest
  magnitude is positive);
- ``Q4_1``: ``w = d * q + m`` -- our W4 g32 asymmetric codes with ``m = -d * zero`` (stored in fp16:
  the only rounding the export adds, reported).

Float Linears are rounded to nearest on the same grid; the token embedding is written in
``embedding_type``; norms stay F32. Tokenizer and metadata are copied from the GGUF the model was
loaded from (``zoo:smollm2`` or a ``.gguf`` spec); the structural keys (layers, widths, heads) come
from the model's config, so a pruned model is described as it is. Query and key rows are permuted
into llama.cpp's rotary layout (transformers undoes the same permutation when it reads a GGUF file).
After writing, every tensor is decoded with the gguf package's reference dequantizer and compared
with the weights torchshrink evaluated; the file is moved into place only if they match.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ConfigError, ModelLoadError
from torchshrink.llm.models import INSTALL_HINT, smollm2_gguf
from torchshrink.llm.wquant import Grid, Quantized, rtn

QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
BLOCK = 32
_GRIDS = {"Q8_0": Grid(8, BLOCK, sym=True), "Q4_0": Grid(4, BLOCK, sym=True, full=True),
          "Q4_1": Grid(4, BLOCK, sym=False)}
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_STRUCTURE = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "vocab_size")


def gguf_grid(qtype: str, clip: bool = True) -> Grid:
    """The quantization grid whose codes a GGUF ``qtype`` stores exactly."""
    if qtype not in _GRIDS:
        raise ConfigError(f"GGUF type {qtype!r} has no torchshrink grid; allowed: {', '.join(_GRIDS)}")
    return dataclasses.replace(_GRIDS[qtype], clip=clip)


def source_gguf(model: nn.Module) -> Path | None:
    """The GGUF file the model was loaded from, if any."""
    src = str(state.get(model, "source") or "")
    if src == "zoo:smollm2":
        return smollm2_gguf()
    if src.startswith("hf:") and src.endswith(".gguf"):
        return Path(src[3:])
    return None


def _rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp stores q / k in: within each head, the two rotary halves interleaved."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _blocks(q: Quantized, qtype: str) -> tuple[np.ndarray, torch.Tensor]:
    """(GGUF bytes ``[rows, blocks * block_bytes]``, the weight those bytes decode to)."""
    codes = q.codes.to(torch.int16)
    rows, cols = codes.shape
    nb = cols // BLOCK
    d = q.scale.half()
    if qtype == "Q8_0":
        body = (codes - 128).to(torch.int8).reshape(rows, nb, BLOCK).view(torch.uint8)
        head = [d.view(torch.uint8).reshape(rows, nb, 2)]
        ref = d.float().repeat_interleave(BLOCK, 1) * (codes - 128).float()
    else:
        c = codes.reshape(rows, nb, BLOCK)
        body = (c[..., :16] | (c[..., 16:] << 4)).to(torch.uint8)
        if qtype == "Q4_0":
            head = [d.view(torch.uint8).reshape(rows, nb, 2)]
            ref = d.float().repeat_interleave(BLOCK, 1) * (codes - 8).float()
        else:
            m = (-q.zero.float() * q.scale.float()).half()
            head = [d.view(torch.uint8).reshape(rows, nb, 2), m.view(torch.uint8).reshape(rows, nb, 2)]
            ref = d.float().repeat_interleave(BLOCK, 1) * codes.float() + m.float().repeat_interleave(BLOCK, 1)
    raw = torch.cat([*head, body], -1).reshape(rows, -1)
    return raw.numpy(), ref


def _codes_for(m: nn.Module | torch.Tensor, qtype: str, name: str) -> Quantized:
    """Our codes of a packed Linear, or round-to-nearest on the GGUF grid of a float weight."""
    from torchshrink.llm.modules import PackedLinear

    grid = _GRIDS[qtype]
    if isinstance(m, PackedLinear):
        q = m.quantized()
        if (q.grid.bits, q.grid.group, q.grid.sym) != (grid.bits, grid.group, grid.sym) or \
                (grid.sym and not bool((q.zero == (grid.qmax + 1) // 2).all())):
            want = dataclasses.replace(grid, full=False).label
            raise ConfigError(f"{name} is quantized as {q.grid.label}; GGUF {qtype} stores {want} codes: "
                              f"quantize with grid=gguf_grid({qtype!r}) or export the float model")
        return q
    w = m if isinstance(m, torch.Tensor) else m.weight
    if w.shape[1] % BLOCK:
        raise ConfigError(f"{name} has {w.shape[1]} inputs, not a multiple of GGUF's block of {BLOCK}")
    return rtn(w.detach().float(), grid)


def _tensors(model: nn.Module, qtype: str, embedding_type: str) -> tuple[list[tuple[str, Any, Any, torch.Tensor]], float]:
    """([(GGUF name, data, raw dtype or None, the weight it must decode to)], the largest difference the
    file's own rounding adds to the weights torchshrink evaluated (Q4_1's fp16 ``m``, F16))."""
    import gguf

    cfg = model.config
    out: list[tuple[str, Any, Any, torch.Tensor]] = []
    rounding = [0.0]

    def add(name: str, src: nn.Module | torch.Tensor, kind: str, rows: torch.Tensor | None = None) -> None:
        if kind in ("F32", "F16"):
            w = (src if isinstance(src, torch.Tensor) else _float_weight(src)).detach().float()
            w = w[rows] if rows is not None else w
            arr = w.numpy().astype(np.float16 if kind == "F16" and w.dim() == 2 else np.float32)
            ref = torch.from_numpy(arr.astype(np.float32))
            rounding[0] = max(rounding[0], float((ref - w).abs().max()))
            out.append((name, arr, None, ref))
            return
        q = _codes_for(src, kind, name)
        if rows is not None:
            q = Quantized(q.codes[rows], q.scale[rows], q.zero[rows], q.grid)
        raw, ref = _blocks(q, kind)
        rounding[0] = max(rounding[0], float((ref - q.dequantized()).abs().max()))
        out.append((name, raw, gguf.GGMLQuantizationType[kind], ref))

    inner = model.model
    add("token_embd.weight", inner.embed_tokens.weight, embedding_type)
    for i, layer in enumerate(inner.layers):
        att = layer.self_attn
        heads = att.q_proj.out_features // att.head_dim
        kv = att.k_proj.out_features // att.head_dim
        for hf, gg in _LAYER.items():
            m = layer.get_submodule(hf)
            name = f"blk.{i}.{gg}.weight"
            if hf.endswith("layernorm"):
                add(name, m.weight, "F32")
            else:
                rows = (_rope_rows(att.q_proj.out_features, heads) if hf == "self_attn.q_proj" else
                        _rope_rows(att.k_proj.out_features, kv) if hf == "self_attn.k_proj" else None)
                add(name, m, qtype, rows)
    add("output_norm.weight", inner.norm.weight, "F32")
    if not getattr(cfg, "tie_word_embeddings", False):
        add("output.weight", model.lm_head, qtype)
    return out, rounding[0]


def _float_weight(m: nn.Module) -> torch.Tensor:
    deq = getattr(m, "dequantized_weight", None)
    return deq() if callable(deq) else m.weight


def _check_model(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in ("llama",) or not hasattr(getattr(model, "model", None), "layers"):
        raise ModelLoadError(f"GGUF export supports Llama-architecture causal LMs (SmolLM2, Llama, ...); got "
                             f"{type(model).__name__}")
    sizes = {(layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
              layer.mlp.gate_proj.out_features)
             for layer in model.model.layers}
    if len(sizes) != 1:
        raise ModelLoadError("GGUF export needs every layer the same size (llama.cpp reads one head count and one "
                             f"FFN width per model); the layers have {len(sizes)} shapes")


def export_gguf(model: nn.Module, path: str | Path, qtype: str = "Q4_0", *, source: str | Path | None = None,
                embedding_type: str = "Q8_0") -> dict[str, Any]:
    """Write ``model`` as a GGUF file of ``qtype`` (one of F32, F16, Q8_0, Q4_0, Q4_1); return a report
    (file size, bits per weight, the largest decode difference from the evaluated weights)."""
    try:
        import gguf
    except ImportError:
        raise ModelLoadError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from None
    if qtype not in QTYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}; allowed: {', '.join(QTYPES)}")
    if embedding_type not in QTYPES:
        raise ConfigError(f"unknown GGUF embedding type {embedding_type!r}; allowed: {', '.join(QTYPES)}")
    _check_model(model)
    src = Path(source) if source is not None else source_gguf(model)
    if src is None or not src.is_file():
        raise ModelLoadError("GGUF export copies the tokenizer and metadata from the GGUF file the model was loaded "
                             "from; load it from zoo:smollm2 or a .gguf file (or pass source=FILE.gguf)")
    path = Path(path)
    if path.exists() and path.resolve() == src.resolve():
        raise ConfigError(f"{path} is the source GGUF file; write the export elsewhere")
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    if arch != "llama":
        raise ModelLoadError(f"source GGUF architecture {arch!r}; GGUF export supports llama")
    tensors, rounding = _tensors(model, qtype, embedding_type)
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    try:
        _write(gguf, reader, model, tensors, qtype, tmp)
        diff = _verify(gguf, tmp, tensors)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    n = sum(int(np.prod(t[3].shape)) for t in tensors)
    size = path.stat().st_size
    return {"path": str(path), "qtype": qtype, "embedding_type": embedding_type, "bytes": size,
            "bits_per_weight": round(8 * size / n, 3), "max_decode_diff": diff, "max_format_rounding": rounding,
            "tensors": len(tensors)}


def _write(gguf: Any, reader: Any, model: nn.Module, tensors: list, qtype: str, tmp: Path) -> None:
    cfg = model.config
    att = model.model.layers[0].self_attn
    structure = {"block_count": len(model.model.layers), "embedding_length": cfg.hidden_size,
                 "feed_forward_length": model.model.layers[0].mlp.gate_proj.out_features,
                 "attention.head_count": att.q_proj.out_features // att.head_dim,
                 "attention.head_count_kv": att.k_proj.out_features // att.head_dim, "vocab_size": cfg.vocab_size}
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            short = key.removeprefix("llama.")
            if short in structure:
                w.add_key_value(key, structure.pop(short), gguf.GGUFValueType.UINT32)
            elif key == "general.file_type":
                w.add_key_value(key, _FILE_TYPE[qtype], gguf.GGUFValueType.UINT32)
            else:
                sub = f.types[1] if len(f.types) > 1 else None
                w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
        for short, v in structure.items():
            w.add_key_value(f"llama.{short}", v, gguf.GGUFValueType.UINT32)
        for name, data, raw, _ in tensors:
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _verify(gguf: Any, path: Path, tensors: list) -> float:
    """Decode every tensor of the written file with gguf's reference dequantizer; the largest difference
    from the weights torchshrink evaluated (raises if one differs beyond fp16 rounding)."""
    back = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    worst = 0.0
    for name, _, _, ref in tensors:
        t = back[name]
        dec = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type.name not in ("F32", "F16") else \
            np.asarray(t.data, dtype=np.float32)
        got = torch.from_numpy(np.array(dec, dtype=np.float32)).reshape(ref.shape)
        diff = float((got - ref).abs().max())
        if diff > 1e-3 * float(ref.abs().max()) + 1e-6:
            raise ModelLoadError(f"GGUF export: {name} decodes {diff:.3g} away from the evaluated weights")
        worst = max(worst, diff)
    return worst
