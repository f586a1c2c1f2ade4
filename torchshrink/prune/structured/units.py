"""Configs and handlers: ``head-prune``, ``ffn-prune``, ``layer-drop``; and ``from_pretrained``
for pruned Hugging Face models whose classes derive head size from the config."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.errors import ConfigError, ModelLoadError, UnsupportedLayerError
from torchshrink.core.report import current
from torchshrink.core.select import Select, name_matches
from torchshrink.core.surgery import set_module
from torchshrink.prune.structured.channel import first_batch
from torchshrink.prune.structured.groups import fix_attributes
from torchshrink.prune.structured.trace import call_model
from torchshrink.prune.structured.transformer import (
    HEAD_ATTRS,
    ffn_scores,
    find_attention,
    find_ffn,
    find_layers,
    head_scores,
    hf_configs,
    prune_heads,
    record_structure,
    select_dim,
    set_config,
)
from torchshrink.prune.structured.verify import probe_batch, reference, verify

log = logging.getLogger(__name__)


def _layer_selected(prefix: str, i: int, select: Select | None) -> bool:
    if select is None or not (select.include or select.exclude):
        return True
    name = f"{prefix}.{i}" if prefix else str(i)
    if select.include and not any(name_matches(name, p) for p in select.include):
        return False
    return not any(name_matches(name, p) for p in select.exclude)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadPruneConfig(Config):
    """Remove ``amount`` of the attention heads of every selected layer (the same count per layer,
    so the HF config can describe the result). With grouped-query attention every KV group keeps
    the same number of query heads, so each head still reads its own KV head."""

    kind = "head-prune"
    family = "prune"
    amount: float = 0.5
    importance: Literal["l1", "l2", "random"] = "l1"
    seed: int = 0

    def validate(self) -> None:
        check_range("head-prune.amount", self.amount, 0.0, 1.0, hi_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FfnPruneConfig(Config):
    """Remove ``amount`` of the FFN intermediate neurons of every selected layer; kept counts are
    multiples of ``round_to``."""

    kind = "ffn-prune"
    family = "prune"
    amount: float = 0.5
    importance: Literal["l1", "l2", "random"] = "l1"
    round_to: int = 1
    seed: int = 0

    def validate(self) -> None:
        check_range("ffn-prune.amount", self.amount, 0.0, 1.0, hi_open=True)
        check_range("ffn-prune.round_to", self.round_to, 1, 4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerDropConfig(Config):
    """Drop whole transformer layers / residual blocks: the ``layers`` given, or else ``amount`` of
    them with the least Block Influence (1 - cosine between a block's input and output on the
    calibration batch; Men et al. 2024, ShortGPT)."""

    kind = "layer-drop"
    family = "prune"
    amount: float = 0.25
    layers: tuple[int, ...] = ()

    def validate(self) -> None:
        check_range("layer-drop.amount", self.amount, 0.0, 1.0, hi_open=True)
        if any(i < 0 for i in self.layers):
            raise ConfigError(f"layer-drop.layers={list(self.layers)} must be layer indices >= 0")


def _heads_to_keep(scores: torch.Tensor, heads: int, kv: int, amount: float) -> torch.Tensor:
    kv = 1 if kv == heads else kv  # plain multi-head attention: one pool of heads
    per = heads // kv
    n_keep = max(1, per - math.floor(per * amount))
    keep = [g * per + torch.topk(scores[g * per:(g + 1) * per], n_keep).indices for g in range(kv)]
    return torch.sort(torch.cat(keep)).values


def head_prune(model: nn.Module, config: HeadPruneConfig, *, select: Select | None = None, data: Any = None,
               **_: Any) -> nn.Module:
    refs = reference(model, probe_batch(model, data))
    prefix, layers = find_layers(model)
    gen = torch.Generator().manual_seed(config.seed)
    new_heads, head_dim = None, None
    for i, layer in enumerate(layers):
        if not _layer_selected(prefix, i, select):
            continue
        att = find_attention(layer)
        keep = _heads_to_keep(head_scores(att, config.importance, gen), att.heads, att.kv_heads, config.amount)
        if len(keep) < att.heads:
            prune_heads(att, keep)
        new_heads, head_dim = att.heads, att.head_dim
    if new_heads is None:
        raise UnsupportedLayerError(f"head-prune: the selection matched no layer of {prefix or 'the model'}")
    if select is None or not (select.include or select.exclude):
        set_config(model, num_attention_heads=new_heads, head_dim=head_dim)
    record_structure(model)
    verify(model, refs, "head-prune")
    return model


def ffn_prune(model: nn.Module, config: FfnPruneConfig, *, select: Select | None = None, data: Any = None,
              **_: Any) -> nn.Module:
    refs = reference(model, probe_batch(model, data))
    prefix, layers = find_layers(model)
    cfgs = hf_configs(model)
    inter = next((getattr(c, a) for c in cfgs for a in ("intermediate_size", "n_inner", "d_ff") if getattr(c, a, None)), None)
    if inter is None and cfgs and getattr(cfgs[0], "model_type", "") == "distilbert":
        inter = cfgs[0].hidden_dim  # DistilBERT's FFN width (its model width is `dim`)
    width = next((getattr(c, a) for c in cfgs for a in ("hidden_size", "dim", "d_model", "n_embd")
                  if isinstance(getattr(c, a, None), int)), None)
    if inter is None and cfgs and getattr(cfgs[0], "model_type", "") == "gpt2":
        inter = 4 * cfgs[0].n_embd
    gen = torch.Generator().manual_seed(config.seed)
    new_size = None
    for i, layer in enumerate(layers):
        if not _layer_selected(prefix, i, select):
            continue
        try:
            att = find_attention(layer)
        except UnsupportedLayerError:
            att = None
        ups, downs = find_ffn(layer, att, inter, width)
        n = ups[0].weight.shape[0] if isinstance(ups[0], nn.Linear) else ups[0].weight.shape[1]
        n_keep = max(1, n - math.floor(n * config.amount))
        if config.round_to > 1:
            n_keep = min(n, max(config.round_to, math.ceil(n_keep / config.round_to) * config.round_to))
        keep = torch.sort(torch.topk(ffn_scores(ups, downs, config.importance, gen), n_keep).indices).values
        for m in ups:
            select_dim(m, "out", keep)
        for m in downs:
            select_dim(m, "in", keep)
        new_size = n_keep
    if new_size is None:
        raise UnsupportedLayerError(f"ffn-prune: the selection matched no layer of {prefix or 'the model'}")
    if select is None or not (select.include or select.exclude):
        set_config(model, intermediate_size=new_size, n_inner=new_size)
        for c in cfgs:  # the FFN width under the names these configs give it
            if getattr(c, "model_type", "") == "distilbert":
                c.hidden_dim = new_size
            elif isinstance(getattr(c, "d_ff", None), int):
                c.d_ff = new_size
    record_structure(model)
    verify(model, refs, "ffn-prune")
    return model


def _block_influence(model: nn.Module, blocks: list[tuple[str, nn.Module]], batch: Any) -> dict[str, float]:
    scores: dict[str, float] = {}
    hooks = []

    def make(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            y = out[0] if isinstance(out, tuple) else out
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape:
                cos = F.cosine_similarity(x.flatten(2) if x.dim() > 3 else x, y.flatten(2) if y.dim() > 3 else y, dim=-1)
                scores[name] = float(1 - cos.mean())
        return hook

    for n, b in blocks:
        hooks.append(b.register_forward_hook(make(n), with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return scores


def _residual_blocks(model: nn.Module, batch: Any) -> list[tuple[str, nn.Module]]:
    """Blocks inside Sequentials whose output has the input's shape (droppable to Identity)."""
    cands = [(f"{pn}.{cn}" if pn else cn, c) for pn, p in model.named_modules() if isinstance(p, nn.Sequential)
             for cn, c in p.named_children() if any(True for _ in c.parameters()) and len(list(c.children())) > 1]
    scores = _block_influence(model, cands, batch)
    return [(n, b) for n, b in cands if n in scores]


def layer_drop(model: nn.Module, config: LayerDropConfig, *, select: Select | None = None, data: Any = None,
               **_: Any) -> nn.Module:
    refs = reference(model, probe_batch(model, data))
    try:
        prefix, layers = find_layers(model)
        blocks = [(f"{prefix}.{i}", b) for i, b in enumerate(layers) if _layer_selected(prefix, i, select)]
        hf = True
    except UnsupportedLayerError:
        blocks, hf = _residual_blocks(model, first_batch(model, data)), False
        blocks = [(n, b) for n, b in blocks if select is None or not select.exclude
                  or not any(name_matches(n, p) for p in select.exclude)]
    if not blocks:
        raise UnsupportedLayerError(f"layer-drop: no droppable layer or same-shape residual block in {type(model).__name__}")
    if config.layers:
        names = [f"{prefix}.{i}" if hf else blocks[i][0] for i in config.layers if (hf and i < len(layers)) or i < len(blocks)]
        if len(names) != len(config.layers):
            raise ConfigError(f"layer-drop.layers={list(config.layers)}: the model has {len(layers) if hf else len(blocks)} droppable layers")
    else:
        n_drop = math.floor(len(blocks) * config.amount)
        if config.amount > 0 and n_drop == 0:
            raise UnsupportedLayerError(
                f"layer-drop: amount {config.amount} of {len(blocks)} droppable layer(s) removes none (a model whose "
                "layers are one shared group, e.g. ALBERT, cannot lose layers this way); raise amount or name `layers`")
        bi = _block_influence(model, blocks, first_batch(model, data)) if n_drop else {}
        names = sorted(bi, key=bi.get)[:n_drop]
    if hf:
        drop = {int(n.rsplit(".", 1)[1]) for n in names}
        kept = [b for i, b in enumerate(layers) if i not in drop]
        if not kept:
            raise ConfigError("layer-drop would remove every layer; keep at least one")
        for j, b in enumerate(kept):
            for m in b.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = j
        set_module(model, prefix, nn.ModuleList(kept))
        for cfg in hf_configs(model):
            if getattr(cfg, "num_hidden_layers", None) == len(layers):
                cfg.num_hidden_layers = len(kept)
            lt = getattr(cfg, "layer_types", None)
            if isinstance(lt, list) and len(lt) == len(layers):
                cfg.layer_types = [t for i, t in enumerate(lt) if i not in drop]
        record_structure(model)
    else:
        for n in names:
            set_module(model, n, nn.Identity())
    current(model).changed.update({n: "dropped" for n in sorted(names)})
    verify(model, refs, "layer-drop")
    return model


register(HeadPruneConfig, head_prune)
register(FfnPruneConfig, ffn_prune)
register(LayerDropConfig, layer_drop)


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
    model = cls.from_config(cfg)
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
