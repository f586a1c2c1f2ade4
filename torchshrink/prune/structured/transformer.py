"""Transformer units: attention heads (q/k/v/o together, grouped-query attention keeps its
head-to-KV-group mapping), FFN neurons, and whole layers, found by structure (not by class name),
so BERT, GPT-2 (fused ``c_attn``), Llama and ViT layouts are all handled. Hugging Face config
fields are updated so the pruned model rebuilds from its config."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.prune.structured.groups import fix_attributes

_Q, _K, _V = ("query", "q_proj", "q", "q_lin"), ("key", "k_proj", "k", "k_lin"), ("value", "v_proj", "v", "v_lin")
HEAD_ATTRS = ("num_attention_heads", "num_heads", "attention_head_size", "head_dim", "all_head_size",
              "split_size", "num_key_value_groups", "scaling", "n_head")


def is_proj(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def out_features(m: nn.Module) -> int:
    return m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1]


def in_features(m: nn.Module) -> int:
    return m.weight.shape[1] if isinstance(m, nn.Linear) else m.weight.shape[0]


def select_dim(m: nn.Module, which: str, idx: torch.Tensor) -> None:
    """Keep ``idx`` of a Linear / HF Conv1D's output (``which='out'``) or input features."""
    w = m.weight
    dim = (0 if which == "out" else 1) if isinstance(m, nn.Linear) else (1 if which == "out" else 0)
    m.weight = nn.Parameter(torch.index_select(w.detach(), dim, idx).clone(), requires_grad=w.requires_grad)
    if which == "out" and getattr(m, "bias", None) is not None:
        m.bias = nn.Parameter(m.bias.detach()[idx].clone(), requires_grad=m.bias.requires_grad)
    fix_attributes(m)


def hf_configs(model: nn.Module) -> list[Any]:
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers: the longest ModuleList of same-type blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1:
            if any(is_proj(x) for x in m[0].modules()) and (best is None or len(m) > len(best[1])):
                best = (name, m)
    if best is None:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no stack of transformer layers (an nn.ModuleList of blocks with "
            "Linear layers); head-prune / ffn-prune / layer-drop need one; use channel-prune instead"
        )
    return best


@dataclasses.dataclass
class Attention:
    module: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    fused: nn.Module | None  # GPT-2 c_attn: [q | k | v] along the output
    heads: int
    kv_heads: int
    head_dim: int


def _child(m: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        c = getattr(m, n, None)
        if isinstance(c, nn.Module) and is_proj(c):
            return c
    return None


def find_attention(layer: nn.Module) -> Attention:
    for name, m in layer.named_modules():
        q, k, v = _child(m, _Q), _child(m, _K), _child(m, _V)
        fused = _child(m, ("c_attn", "qkv"))
        if not ((q and k and v) or fused):
            continue
        o = _child(m, ("o_proj", "out_proj", "c_proj", "proj", "out_lin", "o"))
        if o is None:  # BERT: the output projection lives in a sibling `output.dense`
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            o = _child(getattr(parent, "output", nn.Module()), ("dense",))
        if o is None:
            continue
        heads = next((getattr(m, a) for a in ("num_attention_heads", "num_heads", "n_heads")
                      if isinstance(getattr(m, a, None), int)), None)
        head_dim = next((getattr(m, a) for a in ("head_dim", "attention_head_size") if isinstance(getattr(m, a, None), int)), None)
        cfg = getattr(m, "config", None)
        if heads is None and head_dim is not None:
            heads = in_features(o) // head_dim
        if heads is None and cfg is not None:
            heads = cfg.num_attention_heads
        if heads is None:
            continue
        head_dim = head_dim or in_features(o) // heads
        kv = out_features(k) // head_dim if k is not None else heads
        return Attention(m, q, k, v, o, fused, heads, kv, head_dim)
    raise UnsupportedLayerError(f"no attention with q/k/v and output projections found in {type(layer).__name__}")


def head_scores(att: Attention, criterion: str, gen: torch.Generator) -> torch.Tensor:
    """One score per query head: L1 (or L2) of its q rows and o columns (plus its k/v share)."""
    if criterion == "random":
        return torch.rand(att.heads, generator=gen)
    p = 2 if criterion == "l2" else 1
    d, h = att.head_dim, att.heads
    ow = att.o.weight.detach()
    o_cols = ow.T if isinstance(att.o, nn.Linear) else ow  # (in=h*d, out)
    s = o_cols.reshape(h, d, -1).abs().pow(p).sum((1, 2))
    if att.fused is not None:
        w = att.fused.weight.detach()  # Conv1D (in, 3*h*d)
        s = s + w[:, : h * d].T.reshape(h, d, -1).abs().pow(p).sum((1, 2))
    else:
        s = s + att.q.weight.detach().reshape(h, d, -1).abs().pow(p).sum((1, 2))
    return s


def prune_heads(att: Attention, keep: torch.Tensor) -> None:
    """Keep query heads ``keep`` (sorted); with GQA, ``keep`` holds the same count per KV group."""
    d, h = att.head_dim, att.heads
    rows = (keep[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
    if att.fused is not None:
        e = h * d
        select_dim(att.fused, "out", torch.cat([rows, rows + e, rows + 2 * e]))
    else:
        select_dim(att.q, "out", rows)
        if att.kv_heads == h:
            select_dim(att.k, "out", rows)
            select_dim(att.v, "out", rows)
    select_dim(att.o, "in", rows)
    new_h = len(keep)
    m = att.module
    for a, v in (("num_attention_heads", new_h), ("num_heads", new_h), ("n_heads", new_h), ("all_head_size", new_h * d),
                 ("split_size", new_h * d), ("num_key_value_groups", new_h // att.kv_heads)):
        if isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool):
            if a != "num_key_value_groups" or att.kv_heads != h:
                setattr(m, a, v)
    att.heads = new_h


def find_ffn(layer: nn.Module, att: Attention | None, inter: int | None, width: int | None = None
             ) -> tuple[list[nn.Module], list[nn.Module]]:
    """(producers, consumers) of the FFN hidden dimension: projections outside the attention whose
    output (input) size is the intermediate size -- where no config names it, the most common output
    width other than the model's own ``width`` (an attention the name lists missed has that width)."""
    skip = {id(x) for x in att.module.modules()} if att else set()
    if att is not None:
        skip.add(id(att.o))
    projs = [m for m in layer.modules() if is_proj(m) and id(m) not in skip]
    if inter is None:
        sizes = [out_features(m) for m in projs if out_features(m) != width]
        inter = max(sizes, key=sizes.count) if sizes else 0
    ups = [m for m in projs if out_features(m) == inter]
    downs = [m for m in projs if in_features(m) == inter and m not in ups]
    if not ups or not downs:
        raise UnsupportedLayerError(f"no FFN (Linear pair through a {inter}-wide hidden layer) in {type(layer).__name__}")
    return ups, downs


def ffn_scores(ups: list[nn.Module], downs: list[nn.Module], criterion: str, gen: torch.Generator) -> torch.Tensor:
    n = out_features(ups[0])
    if criterion == "random":
        return torch.rand(n, generator=gen)
    p = 2 if criterion == "l2" else 1
    s = torch.zeros(n)
    for m in ups:
        w = m.weight.detach()
        s += (w if isinstance(m, nn.Linear) else w.T).abs().pow(p).sum(1)
    for m in downs:
        w = m.weight.detach()
        s += (w.T if isinstance(m, nn.Linear) else w).abs().pow(p).sum(1)
    return s


def set_config(model: nn.Module, **fields: Any) -> None:
    for cfg in hf_configs(model):
        for k, v in fields.items():
            if k == "n_inner" and not hasattr(cfg, "n_inner"):
                continue
            if k == "head_dim" and cfg.model_type not in ("llama", "vit", "mistral", "qwen2", "gemma"):
                continue  # this model derives head size from hidden_size / num_attention_heads
            setattr(cfg, k, v)


def record_structure(model: nn.Module) -> None:
    """Store per-module size attributes in the HF config (``torchshrink_structure``) so that
    :func:`from_pretrained` can rebuild shapes transformers' own classes derive differently."""
    seen: set[int] = set()
    for _, owner in model.named_modules():
        cfg = getattr(owner, "config", None)
        if cfg is None or not hasattr(cfg, "to_dict") or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        rec = {}
        for name, m in owner.named_modules():
            attrs = {a: getattr(m, a) for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int | float)
                     and not isinstance(getattr(m, a), bool)}
            if attrs and name:
                rec[name] = attrs
        cfg.torchshrink_structure = rec
