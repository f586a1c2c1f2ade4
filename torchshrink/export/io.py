"""``torchshrink.save`` / ``torchshrink.load``: safetensors plus a JSON manifest.

The manifest says how to rebuild the architecture (the source spec the model came from, then a
record per module: type, constructor arguments, simple attributes), which storage format each
tensor uses, and the recipe that made the model. Loading rebuilds the skeleton, re-creates every
module whose type or shape changed, drops removed modules, and assigns the saved tensors.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import OutputExistsError
from torchshrink.core.files import commit, temp_dir
from torchshrink.export.container import CONTAINER, write_container
from torchshrink.export.formats import encode_tensor, get_format
from torchshrink.export.modules import build_module, init_args, type_name

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_SIMPLE = (bool, int, float, str, type(None))


def _simple_attrs(m: nn.Module) -> dict[str, Any]:
    out = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _SIMPLE) or (isinstance(v, tuple | list) and all(isinstance(x, _SIMPLE) for x in v)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _changed_attrs(tname: str, init: dict[str, Any], attrs: dict[str, Any]) -> dict[str, Any]:
    try:
        with torch.device("meta"):
            fresh = _simple_attrs(build_module(tname, init))
    except Exception:  # cannot build one to compare with: keep everything
        return attrs
    return {k: v for k, v in attrs.items() if fresh.get(k, object()) != v}


def module_records(model: nn.Module) -> list[dict[str, Any]]:
    recs = []
    for name, m in model.named_modules():
        tname, init = type_name(m), init_args(m)
        rec: dict[str, Any] = {"name": name, "type": tname, "init": init}
        # simple attributes that the constructor does not reproduce (HF attention head counts that
        # structured pruning changed, technique tags, ...); for a rebuildable module only the ones
        # that differ from a fresh one built on the meta device, which keeps manifests small
        attrs = _simple_attrs(m)
        if init is not None and attrs:
            attrs = _changed_attrs(tname, init, attrs)
        if attrs or init is None:
            rec["attrs"] = attrs
        fmts = state.get(m, "formats")
        if fmts:
            rec["formats"] = dict(fmts)
        for tag in ("lowrank", "fused_from"):  # module-level state the report shows (strings only)
            if state.get(m, tag):
                rec[tag] = state.get(m, tag)
        recs.append(rec)
    return recs


def source_of(model: nn.Module) -> str | None:
    """The spec the model was loaded from; for a torchvision model given as an instance, its builder."""
    src = state.get(model, "source")
    if src is None:
        from torchshrink.export.skeleton import guess_torchvision_source

        src = guess_torchvision_source(model)
    return src


def hf_config_of(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict") and hasattr(cfg, "model_type"):
        return cfg.to_dict()
    return None


def build_manifest(model: nn.Module, tensors: dict[str, Any], recipe: Any = None) -> dict[str, Any]:
    from torch import fx

    import torchshrink
    from torchshrink.export.graph import graph_to_json

    return {
        "fx_graph": graph_to_json(model) if isinstance(model, fx.GraphModule) else None,
        "format": "torchshrink",
        "format_version": FORMAT_VERSION,
        "torchshrink_version": torchshrink.__version__,
        "torch_version": torch.__version__,
        "source": source_of(model),
        "class": type_name(model),
        "input": state.get(model, "input"),
        "hf_config": hf_config_of(model),
        "modules": module_records(model),
        "tensors": tensors,
        "recipe": recipe,
    }


def _graph_as_loaded(model: nn.Module) -> nn.Module:
    """A torch.fx graph as loading rebuilds it: ``fx.GraphModule(root, graph)`` keeps only what the graph calls or
    reads, so a module it only reads one tensor of (timm's EdgeNeXt reads ``token_projection.weight`` for a dtype
    after static INT8 fused the conv itself) becomes a plain holder of that tensor. Saving the module whole wrote
    tensors (its bias) the rebuilt graph has no place for. The user's model is not changed; modules and tensors are
    shared, not copied."""
    if not isinstance(model, torch.fx.GraphModule):
        return model
    out = torch.fx.GraphModule(model, copy.deepcopy(model.graph), class_name=type(model).__name__)
    state.inherit(model, out)
    return out


def _saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, plus -- in a torch.fx graph -- the non-persistent buffers that fx copied onto its plain holder
    modules (timm's LeViT reads ``attention_bias_idxs`` with get_attr): no constructor rebuilds a holder, so the
    graph would read nothing after loading. Other modules' non-persistent buffers come back from their constructors."""
    out = dict(model.state_dict(keep_vars=False))
    if isinstance(model, torch.fx.GraphModule):
        for mname, m in model.named_modules():
            if type(m) is not nn.Module and m is not model:
                continue
            for bname in sorted(m._non_persistent_buffers_set):
                b = m._buffers.get(bname)
                if isinstance(b, torch.Tensor):
                    out.setdefault(f"{mname}.{bname}" if mname else bname, b)
    return out


def _encode_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    preferred: dict[str, str] = {}
    for mname, m in model.named_modules():
        for tname, fmt in state.get(m, "formats", {}).items():
            preferred[f"{mname}.{tname}" if mname else tname] = fmt
    flat: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in _saved_tensors(model).items():
        if not isinstance(t, torch.Tensor):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:  # tied weights: store once
            meta[key] = {"format": "alias", "of": seen[ident]}
            continue
        seen[ident] = key
        fmt, parts = encode_tensor(t, preferred.get(key))
        meta[key] = {"format": fmt, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for part, pt in parts.items():
            pt = pt.contiguous()
            ptr = pt.untyped_storage().data_ptr()
            if pt.numel() and ptr in storages:  # a view of another saved tensor: safetensors needs its own copy
                pt = pt.clone()
            storages.add(pt.untyped_storage().data_ptr())
            flat[f"{key}::{part}" if part else key] = pt
    return flat, meta


def _entropy_coded(meta: dict[str, Any]) -> bool:
    return any(info["format"] not in ("dense", "alias") and get_format(info["format"]).container for info in meta.values())


def write_model_files(model: nn.Module, directory: Path, recipe: Any = None) -> None:
    """An entropy-coded model goes into the compact container (``model.tsz`` + a stub manifest);
    any other into ``model.safetensors`` + ``manifest.json``."""
    model = _graph_as_loaded(model)
    flat, meta = _encode_state(model)
    manifest = build_manifest(model, meta, recipe)
    if _entropy_coded(meta):
        write_container(directory / CONTAINER, flat, manifest)
        stub = {"format": "torchshrink", "format_version": 2, "container": CONTAINER}
        (directory / MANIFEST).write_text(json.dumps(stub, separators=(",", ":")))
        return
    safetensors.torch.save_file(flat, str(directory / WEIGHTS), metadata={"format": "torchshrink"})
    (directory / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":"), default=str))


def save(model: nn.Module, directory: str | os.PathLike[str], *, recipe: Any = None, force: bool = False) -> Path:
    """Write ``model`` to ``directory`` (safetensors + manifest.json, or the compact container), atomically:
    written beside it, flushed to disk, then renamed; with ``force`` an existing folder is replaced last."""
    out = Path(directory)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; choose a new path or pass force=True (--force)")
    tmp = temp_dir(out)
    try:
        write_model_files(model, tmp, recipe)
        commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def saved_bytes(model: nn.Module) -> int:
    """Bytes of the files torchshrink writes for ``model``."""
    with tempfile.TemporaryDirectory() as d:
        write_model_files(model, Path(d))
        return sum(p.stat().st_size for p in Path(d).iterdir())


# Loading lives in loading.py (validated, data only); these names stay importable from here.
from torchshrink.export.loading import load, read_tensors  # noqa: E402

__all__ = ["MANIFEST", "WEIGHTS", "load", "read_tensors", "save", "saved_bytes", "write_model_files"]
