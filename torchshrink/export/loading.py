"""``torchshrink.load``: a saved folder is data, never code.

What loading does with each part of a folder (the trust model, see the README):

- ``manifest.json`` is read as JSON (at most 64 MiB) and checked against the schema
  (:mod:`torchshrink.export.schema`) before any field is used;
- the architecture is rebuilt only from sources torchshrink knows (torchvision names, zoo names,
  transformers config classes; :func:`torchshrink.export.skeleton.build_skeleton`) and from torch.nn or
  registered torchshrink module classes; nothing named in the file is imported or called;
- every module built from declared arguments is first built on the meta device and its tensor
  shapes compared with the declared tensors, so a declared size cannot allocate memory the file
  does not back;
- tensors come from safetensors (or the compact container, whose decompression is bounded by the
  declared bytes), each decoded tensor checked against its declared shape and dtype;
- a torch.fx graph is rebuilt node by node from validated identifiers and allow-listed calls
  (:mod:`torchshrink.export.graph`).
"""

from __future__ import annotations

import copy
import inspect
import os
import types
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ModelLoadError
from torchshrink.export.allowlist import IDENT, MODULE_PART
from torchshrink.export.container import CONTAINER, read_container
from torchshrink.export.formats import decode_tensor, known_format, numel_of
from torchshrink.export.modules import build_module, init_args, type_name
from torchshrink.export.schema import DTYPES, check_manifest, read_json
from torchshrink.export.skeleton import build_skeleton

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
# a skeleton torchshrink builds may hold at most this factor more bytes than the file declares
# (a binarized model stores 1/32 of its fp32 skeleton), or 256 MiB
SKELETON_FACTOR = 64
SKELETON_FLOOR = 256 << 20


# module classes that moved since a file was written: the old path, as a manifest names it -> the new one
MOVED = {
    "torchshrink.cluster.kmeans.ClusteredLayer": "torchshrink.quant.kmeans.ClusteredLayer",
}


def upgrade(manifest: dict[str, Any]) -> dict[str, Any]:
    """A validated manifest with moved class paths renamed (:data:`MOVED`); nothing else changes."""
    for rec in manifest.get("modules", []):
        rec["type"] = MOVED.get(rec["type"], rec["type"])
    if isinstance(manifest.get("class"), str):
        manifest["class"] = MOVED.get(manifest["class"], manifest["class"])
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a torchshrink model folder: {MANIFEST} is missing")
    return upgrade(check_manifest(read_json(path, MAX_MANIFEST_BYTES, "a manifest"), str(path)))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} is missing")
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None


def _declared_bytes(meta: dict[str, Any]) -> int:
    return sum(numel_of(info["shape"]) * DTYPES[info["dtype"]].itemsize for info in meta.values()
               if info["format"] != "alias")


def check_skeleton_size(probe: nn.Module, stored: int, what: str) -> None:
    """Refuse an architecture (built on the meta device) holding far more bytes than the ``stored``
    bytes that are to fill it: a declared size must not allocate what the files do not back."""
    size = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    if size > max(SKELETON_FLOOR, SKELETON_FACTOR * stored):
        raise ModelLoadError(f"{what} declares a model of {size:,} bytes with {stored:,} bytes of weights; refused")


def decode_state(flat: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    by_key: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        key, sep, part = k.partition("::")
        by_key.setdefault(key, {})[part if sep else ""] = v
    state: dict[str, torch.Tensor] = {}
    for key, info in meta.items():
        if info["format"] == "alias":
            continue
        parts = by_key.get(key, {})
        if info["format"] == "dense":
            parts = {"": parts[""]} if "" in parts else {}
        try:
            state[key] = decode_tensor(info["format"], parts, info)
        except ModelLoadError as e:
            raise ModelLoadError(f"saved tensor {key[:80]!r}: {e}") from None
    for key, info in meta.items():
        if info["format"] == "alias":
            state[key] = state[info["of"]]
    return state


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or (name and not all(MODULE_PART.match(p) and not p.startswith("__") for p in name.split("."))):
        raise ModelLoadError(f"module name {str(name)[:80]!r} in the manifest is not a dotted path of identifiers")
    return name


def _lookup(root: nn.Module, name: str) -> nn.Module | None:
    m: nn.Module | None = root
    for p in name.split(".") if name else []:
        m = m._modules.get(p) if m is not None else None
    return m


def _shape_of(declared: dict[str, Any], key: str) -> list[int] | None:
    info = declared.get(key)
    if info is not None and info["format"] == "alias":
        info = declared.get(info["of"])
    return None if info is None else info["shape"]


def _probe(name: str, tname: str, init: dict[str, Any], declared: dict[str, Any]) -> None:
    """Build the module on the meta device and compare its tensors with the declared ones: a module
    whose declared arguments would allocate what the file does not hold is refused unbuilt."""
    with torch.device("meta"):
        probe = build_module(tname, init)
    state = probe.state_dict()
    for k, t in state.items():
        key = f"{name}.{k}" if name else k
        shape = _shape_of(declared, key)
        if shape is None:
            raise ModelLoadError(f"layer {name!r} ({tname.rsplit('.', 1)[-1]}) needs tensor {key!r}, which the file lacks")
        if list(t.shape) != shape:
            raise ModelLoadError(f"layer {name!r}: its arguments give {key} the shape {list(t.shape)}, the file {shape}")
    extra = sum(t.numel() * t.element_size() for k, t in [*probe.named_parameters(), *probe.named_buffers()]
                if k not in state)
    if extra > SKELETON_FLOOR:
        raise ModelLoadError(f"layer {name!r} would allocate {extra:,} bytes that the file does not hold; refused")


def _set_attr(m: nn.Module, name: str, k: str, v: Any) -> None:
    if v is None and k in m._modules:  # a submodule the saved model does not have (e.g. no pooler)
        m._modules[k] = None
        return
    static = inspect.getattr_static(type(m), k, None)
    if not k.isidentifier() or k.startswith("_") or k in m._modules or k in m._parameters or k in m._buffers \
            or isinstance(static, property | types.FunctionType | classmethod | staticmethod):
        raise ModelLoadError(f"the manifest sets attribute {k[:40]!r} of layer {name!r}, which is not a plain setting")
    cur = getattr(m, k, None)
    if (list(cur) if isinstance(cur, tuple) else cur) != v:
        object.__setattr__(m, k, tuple(v) if isinstance(cur, tuple) and isinstance(v, list) else v)


def _graph_attrs(root: nn.Module, declared: dict[str, Any]) -> None:
    """The tensors an fx graph reads with get_attr from plain attribute holders (a traced ConvNeXt keeps its
    LayerNorm2d weight and layer_scale on bare ``nn.Module`` containers, which no constructor rebuilds): registered
    as meta placeholders of their declared shape, so the graph's targets check out; the weights are assigned next."""
    for key, info in declared.items():
        owner_name, _, attr = key.rpartition(".")
        owner = _lookup(root, owner_name) if owner_name else root
        if owner is None or type(owner) is not nn.Module or not IDENT.match(attr) or attr.startswith("__"):
            continue
        if attr in owner._parameters or attr in owner._buffers or attr in owner._modules:
            continue
        if info.get("format") == "alias":  # one step, as decode_state resolves them: never a chain followed
            info = declared.get(str(info.get("of")), {})
            if not isinstance(info, dict):
                continue
        shape, dtype = info.get("shape"), DTYPES.get(str(info.get("dtype")))
        if isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape) and dtype is not None:
            owner.register_buffer(attr, torch.empty(shape, dtype=dtype, device="meta"))


def rebuild(skeleton: nn.Module, records: list[dict[str, Any]], declared: dict[str, Any] | None = None,
            donor: nn.Module | None = None) -> nn.Module:
    """The skeleton with every layer the manifest records in place. A layer whose type torchshrink cannot build from
    arguments is taken (a copy) from ``donor`` -- the model the caller passed to ``load`` -- under the same name and
    type: a graph model keeps the user's own layers (ConvTranspose, MultiheadAttention, ...) under their names."""
    declared = declared or {}
    keep = set()
    for rec in records:
        name = _check_name(rec["name"])
        keep.add(name)
        if not name:
            continue
        cur = _lookup(skeleton, name)
        same = cur is not None and type_name(cur) == rec["type"] and (rec["init"] is None or init_args(cur) == rec["init"])
        if same:
            continue
        given = _lookup(donor, name) if donor is not None and donor is not skeleton else None
        if rec["init"] is None and (given is None or type_name(given) != rec["type"]):
            raise ModelLoadError(
                f"cannot rebuild layer {name!r} of type {rec['type'][:120]} from the file (torchshrink builds "
                "torch.nn and its own layer types); give the model it came from: torchshrink.load(dir, "
                "model=MyModel(...))")
        parent_name, _, child = name.rpartition(".")
        parent = _lookup(skeleton, parent_name)
        if parent is None:
            raise ModelLoadError(f"layer {name!r} comes before its parent {parent_name!r} in the manifest")
        if rec["init"] is None:
            parent._modules[child] = copy.deepcopy(given)
            continue
        _probe(name, rec["type"], rec["init"], declared)
        parent._modules[child] = build_module(rec["type"], rec["init"])
    # drop modules the saved model no longer has (e.g. pruned layers), parents first
    for name, _ in list(skeleton.named_modules()):
        if name and name not in keep:
            parent_name, _, child = name.rpartition(".")
            if parent_name in keep:
                parent = _lookup(skeleton, parent_name)
                if isinstance(parent, nn.ModuleList | nn.Sequential | nn.ModuleDict):
                    del parent._modules[child]
                elif parent is not None:  # an attribute the parent's forward reads: None, as its class makes it
                    parent._modules[child] = None
    for rec in records:
        m = _lookup(skeleton, rec["name"])
        if m is None:
            raise ModelLoadError(f"layer {rec['name']!r} of the manifest is missing from the rebuilt model")
        for k, v in rec.get("attrs", {}).items():
            if k == "torchshrink_lowrank" and isinstance(v, str):  # files written before core/state.py
                state.put(m, lowrank=v[:40])
            else:
                _set_attr(m, rec["name"], k, v)
        for tag in ("lowrank", "fused_from"):
            if rec.get(tag):
                state.put(m, **{tag: rec[tag]})
        if rec.get("formats"):
            for fmt in rec["formats"].values():
                if not known_format(fmt):
                    raise ModelLoadError(f"layer {rec['name']!r} names unknown storage format {fmt[:40]!r}")
            state.put(m, formats=dict(rec["formats"]))
    return skeleton


def _fit_skeleton(net: nn.Module, tensors: dict[str, torch.Tensor], skeleton_modules: set[str]) -> None:
    """Tensors held directly by a module of the architecture's own classes (a torchvision ``LayerNorm2d``,
    ConvNeXt's ``layer_scale``), which structured pruning resized, get the saved size before loading (the
    sizes are the file's own tensors', already checked against the file)."""
    for key, t in tensors.items():
        owner_name, _, attr = key.rpartition(".")
        if owner_name not in skeleton_modules:
            continue
        owner = _lookup(net, owner_name)
        if owner is None:
            continue
        for store in (owner._parameters, owner._buffers):
            cur = store.get(attr)
            if isinstance(cur, torch.Tensor) and cur.shape != t.shape:
                new = torch.empty(t.shape, dtype=cur.dtype, device=cur.device)
                store[attr] = nn.Parameter(new, requires_grad=cur.requires_grad) if store is owner._parameters else new


def _with_versions(net: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with the rebuilt modules' own state-dict versions attached (torch keeps them in
    ``state_dict()._metadata``; classes such as torchvision's MNASNet refuse a state dict without them).
    The versions come from the code that rebuilds the model, never from the file."""
    from collections import OrderedDict

    out = OrderedDict(tensors)
    meta = getattr(net.state_dict(), "_metadata", None)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def _retie(net: nn.Module, meta: dict[str, Any]) -> None:
    """Make tied parameters one Parameter object again (assign=True wraps each key separately)."""
    for key, info in meta.items():
        if info.get("format") != "alias":
            continue
        src_mod, _, src_name = info["of"].rpartition(".")
        dst_mod, _, dst_name = key.rpartition(".")
        src, dst = _lookup(net, src_mod), _lookup(net, dst_mod)
        target = src._parameters.get(src_name) if src is not None else None
        if isinstance(target, nn.Parameter) and dst is not None and dst_name in dst._parameters:
            setattr(dst, dst_name, target)


def _order_like(net: nn.Module, records: list[dict[str, Any]]) -> None:
    """Children in the order the manifest lists them (fx copies them in graph order), so a reloaded
    model saves to the same bytes."""
    rank = {r["name"]: i for i, r in enumerate(records)}
    for name, m in list(net.named_modules()):
        if len(m._modules) > 1:
            items = sorted(m._modules.items(), key=lambda kv: rank.get(f"{name}.{kv[0]}" if name else kv[0], len(rank)))
            m._modules.clear()
            m._modules.update(items)


def _skeleton(manifest: dict[str, Any]) -> nn.Module:
    """The architecture, built first on the meta device: one much larger than the file is refused.
    A torchvision builder that cannot run on the meta device (RegNet computes its widths with tensor
    ops) is sized from its structure record instead (built once on the CPU from torchvision's own list,
    cached)."""
    stored = _declared_bytes(manifest["tensors"])
    try:
        with torch.device("meta"):
            probe = build_skeleton(manifest)
    except NotImplementedError:
        from torchshrink.export.skeleton import builder_structure

        arch = (manifest.get("source") or "").split("@", 1)[0]
        rec = builder_structure(arch.split(":", 1)[1]) if arch.startswith("torchvision:") else None
        if rec is None or "bytes" not in rec:
            raise
        if rec["bytes"] > max(SKELETON_FLOOR, SKELETON_FACTOR * stored):
            raise ModelLoadError(f"the manifest declares a model of {rec['bytes']:,} bytes with {stored:,} bytes "
                                 "of weights; refused") from None
    else:
        check_skeleton_size(probe, stored, "the manifest")
    return build_skeleton(manifest)


def load(directory: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`torchshrink.save`. ``model`` may give the architecture
    skeleton for models whose source torchshrink cannot rebuild on its own (a user's class)."""
    d = Path(directory)
    if not d.exists():
        raise ModelLoadError(f"{d} does not exist")
    manifest = read_manifest(d)
    if "container" in manifest:
        if manifest["container"] != CONTAINER:
            raise ModelLoadError(f"{d / MANIFEST} names container {manifest['container'][:40]!r}; this version reads {CONTAINER!r}")
        full, flat = read_container(d / CONTAINER)
        manifest = upgrade(check_manifest(full, str(d / CONTAINER)))
        if "container" in manifest:
            raise ModelLoadError(f"{d / CONTAINER} holds a stub manifest, not a model")
    else:
        flat = read_tensors(d / WEIGHTS)
    declared = manifest["tensors"]
    if manifest.get("fx_graph"):  # a torch.fx-rewritten model: rebuild modules, then the graph
        from torch import fx

        from torchshrink.export.graph import graph_from_json

        root = rebuild(nn.Module(), manifest["modules"], declared, donor=model)
        _graph_attrs(root, declared)
        net: nn.Module = fx.GraphModule(root, graph_from_json(manifest["fx_graph"], root))
        _order_like(net, manifest["modules"])
    else:
        skeleton = model if model is not None else _skeleton(manifest)
        net = rebuild(skeleton, manifest["modules"], declared)
    tensors = decode_state(flat, declared)
    if manifest.get("fx_graph") is None:
        _fit_skeleton(net, tensors, {r["name"] for r in manifest["modules"] if r.get("init") is None})
    tensors = _with_versions(net, tensors)
    try:
        res = net.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"saved weights do not fit the rebuilt model: {str(e).splitlines()[0]}") from None
    missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    if missing or unexpected:
        raise ModelLoadError(
            f"saved weights do not fit the rebuilt model (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    _retie(net, declared)
    state.put(net, source=manifest.get("source"), input=manifest.get("input"), recipe=manifest.get("recipe"))
    net.eval()
    return net
