"""``torchshrink.save`` / ``torchshrink.load``: safetensors plus a JSON manifest.

The manifest says how to rebuild the architecture (the source spec the model came from, then a
record per module: type, constructor arguments, simple attributes), which storage format each
tensor uses, and the recipe that made the model. Loading rebuilds the skeleton, re-creates every
module whose type or shape changed, drops removed modules, and assigns the saved tensors.
"""

from __future__ import annotations

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

from torchshrink.core.errors import ModelLoadError, OutputExistsError
from torchshrink.core.surgery import get_module
from torchshrink.export.container import CONTAINER, read_container, write_container
from torchshrink.export.formats import decode_tensor, encode_tensor, get_format
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
        fmts = getattr(m, "_torchshrink_formats", None)
        if fmts:
            rec["formats"] = dict(fmts)
        recs.append(rec)
    return recs


def source_of(model: nn.Module) -> str | None:
    return getattr(model, "_torchshrink_source", None)


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
        "input": getattr(model, "_torchshrink_input", None),
        "hf_config": hf_config_of(model),
        "modules": module_records(model),
        "tensors": tensors,
        "recipe": recipe,
    }


def _encode_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    preferred: dict[str, str] = {}
    for mname, m in model.named_modules():
        for tname, fmt in (getattr(m, "_torchshrink_formats", None) or {}).items():
            preferred[f"{mname}.{tname}" if mname else tname] = fmt
    flat: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in model.state_dict(keep_vars=False).items():
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


def _atomic_dir(out: Path, force: bool) -> Path:
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; choose a new path or pass force=True (--force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def commit_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp dir into place; an existing ``out`` is replaced only at the end."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes a private (0700) folder
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _entropy_coded(meta: dict[str, Any]) -> bool:
    return any(info["format"] not in ("dense", "alias") and get_format(info["format"]).container for info in meta.values())


def write_model_files(model: nn.Module, directory: Path, recipe: Any = None) -> None:
    """An entropy-coded model goes into the compact container (``model.tsz`` + a stub manifest);
    any other into ``model.safetensors`` + ``manifest.json``."""
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
    """Write ``model`` to ``directory`` (safetensors + manifest.json), atomically."""
    out = Path(directory)
    tmp = _atomic_dir(out, force)
    try:
        write_model_files(model, tmp, recipe)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def saved_bytes(model: nn.Module) -> int:
    """Bytes of the files torchshrink writes for ``model``."""
    with tempfile.TemporaryDirectory() as d:
        write_model_files(model, Path(d))
        return sum(p.stat().st_size for p in Path(d).iterdir())


# --------------------------------------------------------------------------- load


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a torchshrink model folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != "torchshrink":
        raise ModelLoadError(f"{path} is not a torchshrink manifest")
    return manifest


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} is missing")
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None


def decode_state(flat: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, info in meta.items():
        if info["format"] == "alias":
            continue
        prefix = f"{key}::"
        parts = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if info["format"] == "dense":
            if key not in flat:
                raise ModelLoadError(f"saved weights lack tensor {key!r}")
            parts = {"": flat[key]}
        state[key] = decode_tensor(info["format"], parts, info)
    for key, info in meta.items():
        if info["format"] == "alias":
            state[key] = state[info["of"]]
    return state


def _skeleton(manifest: dict[str, Any]) -> nn.Module:
    from torchshrink.models import build_skeleton

    return build_skeleton(manifest)


def rebuild(skeleton: nn.Module, records: list[dict[str, Any]]) -> nn.Module:
    keep = set()
    for rec in records:
        name = rec["name"]
        keep.add(name)
        if not name:
            continue
        try:
            cur = get_module(skeleton, name)
        except Exception:
            cur = None
        same = cur is not None and type_name(cur) == rec["type"] and (rec["init"] is None or init_args(cur) == rec["init"])
        if not same:
            if rec["init"] is None:
                raise ModelLoadError(
                    f"cannot rebuild layer {name!r} of type {rec['type']}: the architecture differs from its "
                    "source and this type is not registered with torchshrink"
                )
            parent_name, _, child = name.rpartition(".")
            setattr(get_module(skeleton, parent_name), child, build_module(rec["type"], rec["init"]))
    # drop modules the saved model no longer has (e.g. pruned layers), parents first
    for name, _ in list(skeleton.named_modules()):
        if name and name not in keep:
            parent_name, _, child = name.rpartition(".")
            if parent_name in keep:
                parent = get_module(skeleton, parent_name)
                del parent._modules[child]
    for rec in records:
        m = get_module(skeleton, rec["name"])
        for k, v in rec.get("attrs", {}).items():
            cur = getattr(m, k, None)
            cur = list(cur) if isinstance(cur, tuple) else cur
            if cur != v:
                object.__setattr__(m, k, tuple(v) if isinstance(getattr(m, k, None), tuple) else v)
        if rec.get("formats"):
            m._torchshrink_formats = dict(rec["formats"])
    return skeleton


def _retie(net: nn.Module, meta: dict[str, Any]) -> None:
    """Make tied parameters one Parameter object again (assign=True wraps each key separately)."""
    for key, info in meta.items():
        if info.get("format") != "alias":
            continue
        src_mod, _, src_name = info["of"].rpartition(".")
        dst_mod, _, dst_name = key.rpartition(".")
        target = getattr(get_module(net, src_mod), src_name)
        if isinstance(target, nn.Parameter):
            setattr(get_module(net, dst_mod), dst_name, target)


def load(directory: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`. ``model`` may give the architecture skeleton for
    models whose source torchshrink cannot rebuild on its own (a user's class with arguments)."""
    d = Path(directory)
    if not d.exists():
        raise ModelLoadError(f"{d} does not exist")
    manifest = read_manifest(d)
    if manifest.get("container") is not None:
        if manifest["container"] != CONTAINER:
            raise ModelLoadError(f"{d / MANIFEST} names container {manifest['container']!r}; this version reads {CONTAINER!r}")
        manifest, flat = read_container(d / CONTAINER)
    else:
        flat = read_tensors(d / WEIGHTS)
    state = decode_state(flat, manifest["tensors"])
    if manifest.get("fx_graph"):  # a torch.fx-rewritten model: rebuild modules, then the graph
        from torch import fx

        from torchshrink.export.graph import graph_from_json

        net = fx.GraphModule(rebuild(nn.Module(), manifest["modules"]), graph_from_json(manifest["fx_graph"]))
    else:
        skeleton = model if model is not None else _skeleton(manifest)
        net = rebuild(skeleton, manifest["modules"])
    missing, unexpected = [], []
    try:
        res = net.load_state_dict(state, strict=False, assign=True)
        missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    except RuntimeError as e:
        raise ModelLoadError(f"saved weights do not fit the rebuilt model: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise ModelLoadError(
            f"saved weights do not fit the rebuilt model (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    _retie(net, manifest["tensors"])
    for attr in ("source", "input"):
        if manifest.get(attr) is not None:
            setattr(net, f"_torchshrink_{attr}", manifest[attr])
    net._torchshrink_recipe = manifest.get("recipe")
    net.eval()
    return net
