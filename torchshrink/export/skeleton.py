"""The architecture a saved manifest names, rebuilt from known sources only (no code named in the
file is imported or called): a transformers config (its class picked among transformers' auto
classes for that model type), a torchvision name, a zoo name, or a torch.nn / registered torchshrink
root class."""

from __future__ import annotations

from typing import Any

from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ModelLoadError


def tag(model: nn.Module, source: str, inp: dict[str, Any] | None) -> nn.Module:
    state.put(model, source=source)
    if inp is not None:
        state.put(model, input=inp)
    return model


def torchvision_model(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ModelLoadError("torchvision is not installed: pip install 'torchshrink[vision]'") from None
    names = torchvision.models.list_models()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        raise ModelLoadError(f"unknown torchvision model {name!r}; close names: {', '.join(close) or 'none'}")
    model = torchvision.models.get_model(name, weights=None)
    size = 299 if name.startswith("inception") else 224
    return tag(model.eval(), f"torchvision:{name}", {"shape": [1, 3, size, size], "dtype": "float32"})


def _structure(model: nn.Module) -> tuple[dict[str, str], set[str]]:
    """(module name -> class, names replaced by torchshrink modules); the insides of a replaced module
    are left out (compression put its own there)."""
    sig, replaced = {}, set()
    for name, m in model.named_modules():
        if any(name.startswith(f"{r}.") for r in replaced):
            continue
        cls = type(m)
        if cls.__module__.startswith("torchshrink."):
            replaced.add(name)
            continue
        sig[name] = f"{cls.__module__}.{cls.__qualname__}"
    return sig, replaced


def builder_structure(name: str) -> dict[str, Any] | None:
    """The class and module tree of torchvision builder ``name``: built on the meta device (no memory), or
    on the CPU for builders that compute widths with tensor ops (RegNet), and cached per torchvision
    version in the torchshrink cache."""
    import json

    import torch
    import torchvision

    from torchshrink.core.cache import cache_dir
    from torchshrink.core.files import write_atomic

    path = cache_dir() / "torchvision-structure" / f"{torchvision.__version__}-{name}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    builder = torchvision.models.get_model_builder(name)
    cand = None
    for device in ("meta", "cpu"):
        try:
            with torch.device(device), torch.no_grad():
                cand = builder(weights=None)
            break
        except Exception:  # noqa: BLE001 - a builder that cannot run there
            continue
    if cand is None:
        return None
    sig, _ = _structure(cand)
    size = sum(t.numel() * t.element_size() for t in [*cand.parameters(), *cand.buffers()])
    out = {"class": f"{type(cand).__module__}.{type(cand).__qualname__}", "modules": sig, "bytes": size}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(out))
    except OSError:
        pass
    return out


def guess_torchvision_source(model: nn.Module) -> str | None:
    """``torchvision:<name>`` for a model built by a torchvision builder (given as an instance, not as
    a spec): the builder of the same class whose module tree (names and classes) is the model's, up to
    layers compression replaced or dropped. None if none matches."""
    mod = type(model).__module__
    if not mod.startswith("torchvision.models."):
        return None
    import torchvision

    cls = f"{mod}.{type(model).__qualname__}"
    sig, replaced = _structure(model)
    for name in torchvision.models.list_models(module=torchvision.models):
        if torchvision.models.get_model_builder(name).__module__ != mod:
            continue
        cand = builder_structure(name)
        if cand is None or cand["class"] != cls:
            continue
        kept = {n: c for n, c in cand["modules"].items()
                if n not in replaced and not any(n.startswith(f"{r}.") for r in replaced)}
        same = all(sig.get(n) == c or sig.get(n) == "torch.nn.modules.linear.Identity" for n, c in kept.items())
        if same and set(sig) <= set(kept) | replaced:
            return f"torchvision:{name}"
    return None


def _zoo_skeleton(name: str) -> nn.Module:
    from torchshrink.zoo.digits import DigitsCNN, DigitsMLP
    from torchshrink.zoo.minilm import minilm_skeleton

    classes = {"digits-cnn": DigitsCNN, "digits-mlp": DigitsMLP, "minilm": minilm_skeleton}
    if name not in classes:
        raise ModelLoadError(f"unknown zoo architecture {name[:40]!r} in the manifest; known: {', '.join(classes)}")
    return classes[name]()


def registered_hf_class(model_type: str, short: str) -> Any:
    """transformers' class ``short`` if transformers registers it for ``model_type`` in one of its auto
    mappings (a name read from a file can only pick among those), else None."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping_name in dir(modeling_auto):
        mapping = getattr(modeling_auto, mapping_name)
        if not mapping_name.startswith("MODEL_") or not mapping_name.endswith("_MAPPING_NAMES") or not isinstance(mapping, dict):
            continue
        entry = mapping.get(model_type)
        names = entry if isinstance(entry, tuple | list) else (entry,)
        if short and short in names:
            return getattr(transformers, short, None)
    return None


def _hf_skeleton(hf: dict[str, Any], cls_name: str | None) -> nn.Module:
    """A transformers model from its config: the config class is picked by ``model_type`` among the
    ones transformers registers, the model class among the auto classes registered for it."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        raise ModelLoadError("this saved model is a transformers model: pip install 'torchshrink[nlp]'") from None
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"the saved transformers config has unknown model_type {str(model_type)[:40]!r}")
    fields = {k: v for k, v in hf.items() if k not in ("model_type", "auto_map", "trust_remote_code")}
    for k, v in fields.items():  # counts that would build millions of modules even on the meta device
        limit = 4096 if "layer" in k or "head" in k or "expert" in k else 1 << 24
        if isinstance(v, int) and not isinstance(v, bool) and v > limit:
            raise ModelLoadError(f"the saved transformers config sets {k[:40]}={v:,}; refused (more than {limit:,})")
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers validates config values with several error types
        raise ModelLoadError(f"the saved transformers config is invalid ({type(e).__name__}: {str(e)[:160]})") from None
    cls = registered_hf_class(model_type, (cls_name or "").rsplit(".", 1)[-1])
    if cls is None:
        from transformers import AutoModel

        return AutoModel.from_config(cfg)
    try:
        return cls(cfg)
    except Exception as e:
        raise ModelLoadError(f"cannot build {cls.__name__} from the saved config ({type(e).__name__}: {str(e)[:160]})") from None


def build_skeleton(manifest: dict[str, Any]) -> nn.Module:
    """The architecture a (validated) manifest was made from, before its recorded changes are applied.
    Only known sources are rebuilt: a transformers config, a torchvision name, a zoo name, or a
    torch.nn / registered torchshrink root class. Nothing named in the file is imported or called."""
    source = manifest.get("source") or ""
    hf = manifest.get("hf_config")
    inp = manifest.get("input")
    arch = source.split("@", 1)[0]
    if hf is not None:
        return tag(_hf_skeleton(hf, manifest.get("class")).eval(), source or "hf", inp)
    if arch.startswith("torchvision:"):
        return torchvision_model(arch.split(":", 1)[1])
    if arch.startswith("zoo:"):
        return tag(_zoo_skeleton(arch.split(":", 1)[1]), arch, inp)
    from torchshrink.export.modules import build_module, rebuildable

    cls_path = manifest.get("class") or ""
    root = next((r for r in manifest.get("modules", []) if r.get("name") == ""), None)
    if root is not None and root.get("type") == cls_path and root.get("init") is not None and rebuildable(cls_path):
        return build_module(cls_path, root["init"])
    raise ModelLoadError(
        f"the saved model's architecture ({cls_path[:120] or 'unknown'}, from {source[:120] or 'an unknown source'}) "
        "is not one torchshrink rebuilds from a file; give it: torchshrink.load(dir, model=MyModel(...)), "
        "or on the command line --model package.module:factory@DIR"
    )
