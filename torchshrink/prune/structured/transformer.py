"""Transformer units: attention heads (q/k/v/o together, grouped-query attention keeps its
head-to-KV-group mapping), FFN neurons, and whole layers. With a batch to run, the units come from
data flow (:mod:`torchshrink.prune.structured.flow`); the name and width rules here are the fallback
when there is none. Hugging Face config fields are updated so the pruned model rebuilds from its config."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import ModelLoadError, UnsupportedLayerError
from torchshrink.prune.structured.groups import fix_attributes

log = logging.getLogger(__name__)

_Q, _K, _V = ("query", "q_proj", "q", "q_lin"), ("key", "k_proj", "k", "k_lin"), ("value", "v_proj", "v", "v_lin")
HEAD_ATTRS = ("num_attention_heads", "num_heads", "attention_head_size", "head_dim", "all_head_size",
              "split_size", "num_key_value_groups", "scaling", "n_head", "n_heads", "inner_dim")


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


def _is_stack(m: nn.Module) -> bool:
    return (isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1
            and any(is_proj(x) for x in m[0].modules()))


def find_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of transformer layers (an nn.ModuleList of same-type blocks with projections), outer
    ones only: one for an encoder or a decoder, two for an encoder-decoder (T5, BART)."""
    found = [(n, m) for n, m in model.named_modules() if _is_stack(m)]
    outer = [(n, m) for n, m in found if not any(n.startswith(f"{o}.") for o, _ in found if o != n)]
    if not outer:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no stack of transformer layers (an nn.ModuleList of blocks with "
            "Linear layers); head-prune / ffn-prune / layer-drop need one; use channel-prune instead"
        )
    return outer


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest stack of transformer layers."""
    return max(find_stacks(model), key=lambda s: len(s[1]))


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


def _attention_at(layer: nn.Module, name: str, m: nn.Module) -> Attention | None:
    q, k, v = _child(m, _Q), _child(m, _K), _child(m, _V)
    fused = _child(m, ("c_attn", "qkv"))
    if not ((q and k and v) or fused):
        return None
    o = _child(m, ("o_proj", "out_proj", "c_proj", "proj", "out_lin", "o", "dense"))
    if o is None:  # BERT: the output projection lives in a sibling `output.dense`
        parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
        o = _child(getattr(parent, "output", nn.Module()), ("dense",))
    if o is None:
        return None
    heads = next((getattr(m, a) for a in ("num_attention_heads", "num_heads", "n_heads")
                  if isinstance(getattr(m, a, None), int)), None)
    head_dim = next((getattr(m, a) for a in ("head_dim", "attention_head_size", "key_value_proj_dim")
                     if isinstance(getattr(m, a, None), int)), None)
    cfg = getattr(m, "config", None)
    if heads is None and head_dim is not None:
        heads = in_features(o) // head_dim
    if heads is None and cfg is not None:
        heads = cfg.num_attention_heads
    if heads is None:
        return None
    head_dim = head_dim or in_features(o) // heads
    kv = out_features(k) // head_dim if k is not None else heads
    return Attention(m, q, k, v, o, fused, heads, kv, head_dim)


def find_attentions(layer: nn.Module) -> list[Attention]:
    """Every attention of a layer (self- and cross-attention), by its q/k/v and output projections."""
    out: list[Attention] = []
    for name, m in layer.named_modules():
        if any(m is a.module or any(m is x for x in a.module.modules()) for a in out):
            continue
        att = _attention_at(layer, name, m)
        if att is not None:
            out.append(att)
    if not out:
        raise UnsupportedLayerError(f"no attention with q/k/v and output projections found in {type(layer).__name__}")
    return out


def find_attention(layer: nn.Module) -> Attention:
    return find_attentions(layer)[0]


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
    for c in m.children():  # per-head tables, e.g. T5's relative_attention_bias (buckets, heads)
        if isinstance(c, nn.Embedding) and c.embedding_dim == h:
            c.weight = nn.Parameter(c.weight.detach()[:, keep].clone(), requires_grad=c.weight.requires_grad)
            fix_attributes(c)
    for a, v in (("num_attention_heads", new_h), ("num_heads", new_h), ("n_heads", new_h), ("all_head_size", new_h * d),
                 ("split_size", new_h * d), ("inner_dim", new_h * d), ("num_key_value_groups", new_h // att.kv_heads)):
        if isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool):
            if a != "num_key_value_groups" or att.kv_heads != h:
                setattr(m, a, v)
    att.heads = new_h


def find_ffn(layer: nn.Module, atts: list[Attention], inter: int | None, width: int | None = None
             ) -> tuple[list[nn.Module], list[nn.Module]]:
    """(producers, consumers) of the FFN hidden dimension: projections outside the attentions whose
    output (input) size is the intermediate size -- where no config names it, the most common output
    width other than the model's own ``width`` (an attention the name lists missed has that width)."""
    skip = {id(x) for a in atts for x in a.module.modules()} | {id(a.o) for a in atts}
    projs = [m for m in layer.modules() if is_proj(m) and id(m) not in skip]
    if inter is None:
        sizes = [out_features(m) for m in projs if out_features(m) != width]
        inter = max(sizes, key=sizes.count) if sizes else 0
    ups = [m for m in projs if out_features(m) == inter]
    downs = [m for m in projs if in_features(m) == inter and m not in ups]
    if not ups or not downs:
        raise UnsupportedLayerError(f"no FFN (Linear pair through a {inter}-wide hidden layer) in {type(layer).__name__}")
    return ups, downs


def guess_ffn(model: nn.Module, prefix: str, layer: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The FFN of ``layer`` from config widths and projection names (when there is no batch to probe with)."""
    cfgs = hf_configs(model)
    inter = next((getattr(c, a) for c in cfgs for a in _FIELDS["ffn"][0] if getattr(c, a, None)), None)
    if inter is None and cfgs and getattr(cfgs[0], "model_type", "") == "distilbert":
        inter = cfgs[0].hidden_dim  # DistilBERT's FFN width (its model width is `dim`)
    if inter is None and cfgs and getattr(cfgs[0], "model_type", "") == "gpt2":
        inter = 4 * cfgs[0].n_embd
    width = next((getattr(c, a) for c in cfgs for a in ("hidden_size", "dim", "d_model", "n_embd")
                  if isinstance(getattr(c, a, None), int)), None)
    for c in cfgs:  # encoder / decoder FFN widths (BART) where the config names them
        f = "decoder_ffn_dim" if "decoder" in prefix else "encoder_ffn_dim" if "encoder" in prefix else ""
        inter = getattr(c, f, None) or inter
    try:
        atts = find_attentions(layer)
    except UnsupportedLayerError:
        atts = []
    return find_ffn(layer, atts, inter, width)


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


_FIELDS = {  # config fields per unit: (any stack, encoder stack, decoder stack)
    "heads": (("num_attention_heads", "n_head", "num_heads"), ("encoder_attention_heads",), ("decoder_attention_heads",)),
    "ffn": (("intermediate_size", "n_inner", "d_ff", "ffn_dim"), ("encoder_ffn_dim",), ("decoder_ffn_dim",)),
    "layers": (("num_hidden_layers", "n_layer"), ("encoder_layers", "num_layers"), ("decoder_layers", "num_decoder_layers")),
}


def set_stack_config(model: nn.Module, unit: str, changes: list[tuple[str, int, int]]) -> None:
    """Write new sizes into every Hugging Face config field that held the old size of a pruned stack:
    ``changes`` are (stack name, old, new). Encoder / decoder fields follow their stack; the shared
    fields change only where every stack ended at the same size."""
    generic, enc, dec = _FIELDS[unit]
    news = {new for _, _, new in changes}
    for cfg in hf_configs(model):
        for stack, old, new in changes:
            own = dec if "decoder" in stack else enc if "encoder" in stack else ()
            for f in own + (generic if len(news) == 1 else ()):
                cur = getattr(cfg, f, None)
                if f == "n_inner" and cur is None and hasattr(cfg, "n_embd") and 4 * cfg.n_embd == old:
                    cur = old  # GPT-2: n_inner None means 4 x n_embd
                if cur == old and not isinstance(cur, bool):
                    setattr(cfg, f, new)
            if unit == "ffn" and getattr(cfg, "model_type", "") == "distilbert" and cfg.hidden_dim == old:
                cfg.hidden_dim = new  # DistilBERT's FFN width (its model width is `dim`)
            if unit == "heads" and len(news) == 1 and not isinstance(getattr(cfg, "head_dim", None), int):
                width = getattr(cfg, "hidden_size", None)
                if isinstance(width, int) and width % old == 0:  # pin the head size: classes that read
                    cfg.head_dim = width // old  # config.head_dim (Llama, Phi, ...) rebuild the pruned shapes


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


def from_pretrained(path: str | Path, model_class: Any = None) -> nn.Module:
    """Load a pruned Hugging Face model written with ``save_pretrained``. Llama / ViT configs carry
    ``head_dim`` and reload with transformers alone; BERT and GPT-2 derive head size from
    ``hidden_size / num_attention_heads``, so their pruned shapes are rebuilt here from the
    checkpoint and the ``torchshrink_structure`` the config records."""
    import safetensors.torch
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise ModelLoadError(f"{path} is not a save_pretrained folder (config.json + *.safetensors)")
    cls = model_class or AutoModel
    try:  # transformers alone, when the config describes the pruned shapes (it raises otherwise)
        return cls.from_pretrained(str(path), local_files_only=True).eval()
    except (RuntimeError, ValueError) as e:
        log.info("from_pretrained: transformers cannot rebuild %s alone (%s); rebuilding shapes", path, type(e).__name__)
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(safetensors.torch.load_file(str(f)))
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    for key, t in state.items():
        if key in own and own[key].shape != t.shape:
            mod_name, _, attr = key.rpartition(".")
            m = model.get_submodule(mod_name)
            setattr(m, attr, nn.Parameter(torch.empty_like(t)) if attr in m._parameters else torch.empty_like(t))
            fix_attributes(m)
    for name, attrs in (getattr(cfg, "torchshrink_structure", None) or {}).items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        for a, v in attrs.items():
            if a in HEAD_ATTRS:
                setattr(m, a, v)
    res = model.load_state_dict(state, strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    missing = [k for k in res.missing_keys if k not in tied]
    if res.unexpected_keys:
        raise ModelLoadError(f"{path}: weights do not fit the rebuilt model (unexpected: {res.unexpected_keys[:3]})")
    if missing:
        log.info("from_pretrained: tensors not in the checkpoint (tied or initialised): %s", missing[:5])
    return model.eval()
