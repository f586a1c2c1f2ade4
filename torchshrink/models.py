"""Turning a model spec into a model, for the CLI and recipes.

Accepted specs:
  torchvision:NAME            a torchvision architecture, no weights (e.g. torchvision:resnet18)
  zoo:NAME                    an embedded default (zoo:digits-cnn, zoo:digits-mlp, zoo:minilm,
                              zoo:smollm2 with the llm extra)
  PATH.gguf                   a GGUF language model (dequantized to fp32 by transformers, cached)
  package.module:factory      a function or class called with no arguments
  PATH/                       a torchshrink save folder or a local Hugging Face model folder
  PATH.pt2                    a torch.export archive: it is unpickled, which can run code, so
                              it loads only with trust_code=True (--trust-code)
  SPEC@WEIGHTS                an architecture spec plus weights (.safetensors, or .pt/.pth state
                              dict, loaded with weights_only=True)
  SPEC@FOLDER                 a torchshrink save folder whose architecture SPEC builds (for a model
                              class of your own: mypkg.models:make_net@out/model)

Only a spec the user types may import code (``package.module:factory``); a saved folder never
names code that loading would import or call (see torchshrink/export/loading.py).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ModelLoadError
from torchshrink.export.skeleton import registered_hf_class, tag, torchvision_model

SPEC_HELP = (
    "use torchvision:NAME, zoo:NAME, package.module:factory, a saved folder, a Hugging Face folder, "
    "FILE.pt2, or SPEC@WEIGHTS.safetensors"
)


def load_model(spec: str, *, trust_code: bool = False) -> nn.Module:
    """Build the model a spec names, tagged with its source so that saves can rebuild it.
    ``trust_code`` allows formats that run code when read (torch.export's pickled .pt2)."""
    if not isinstance(spec, str) or not spec:
        raise ModelLoadError(f"empty model spec; {SPEC_HELP}")
    if "@" in spec and not spec.startswith("@"):
        arch, weights = spec.rsplit("@", 1)
        model = load_model(arch, trust_code=trust_code)
        if Path(weights).is_dir():
            from torchshrink.export import load

            return load(weights, model=model)
        _load_weights(model, Path(weights))
        return model
    path = Path(spec)
    if path.suffix == ".pt2":
        if not path.is_file():
            raise ModelLoadError(f"no such file: {spec}")
        if not trust_code:
            raise ModelLoadError(
                f"{spec} is a torch.export archive, which torch unpickles (that can run code hidden in the file); "
                "load it only if you trust its author: pass --trust-code (trust_code=True)"
            )
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:
            raise ModelLoadError(f"{spec} is not a readable torch.export archive ({type(e).__name__}: {e})") from None
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        raise ModelLoadError(
            f"{spec} holds weights only; name the architecture too, e.g. torchvision:resnet18@{spec}"
        )
    if path.suffix == ".gguf":
        from torchshrink.llm.models import load_causal_lm

        return load_causal_lm(spec)[0]
    if spec.startswith("torchvision:"):
        return torchvision_model(spec.split(":", 1)[1])
    if spec.startswith("zoo:"):
        from torchshrink.zoo import load_zoo_model

        return load_zoo_model(spec.split(":", 1)[1])
    if path.exists() or os.sep in spec or spec.startswith("."):
        return _from_folder(path)
    if ":" in spec:
        return _from_factory(spec)
    raise ModelLoadError(f"cannot understand model spec {spec!r}; {SPEC_HELP}")


def import_factory(spec: str, what: str = "model spec", hint: str = SPEC_HELP) -> Callable[..., Any]:
    """The callable a ``package.module:function`` spec names, imported with the current folder on the
    import path (as ``python -m`` does). Only for specs the user typed: never for names read from files."""
    mod_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import {mod_name!r} for {what} {spec!r} ({e}); {hint}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{mod_name!r} has no callable {attr!r} ({what} {spec!r})")
    return factory


def _from_factory(spec: str) -> nn.Module:
    factory = import_factory(spec)
    try:
        model = factory()
    except (SystemExit, KeyboardInterrupt):
        raise ModelLoadError(f"{spec} tried to exit instead of returning a torch.nn.Module") from None
    except Exception as e:
        raise ModelLoadError(f"{spec} raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return tag(model, spec, state.get(model, "input"))


def _from_folder(path: Path) -> nn.Module:
    if not path.exists():
        raise ModelLoadError(f"no such file or folder: {path}; {SPEC_HELP}")
    if (path / "manifest.json").is_file():
        from torchshrink.export import load

        return load(path)
    if (path / "config.json").is_file():
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError:
            raise ModelLoadError("transformers is not installed: pip install 'torchshrink[nlp]'") from None
        _check_hf_size(path)
        try:  # the head class the config names (a causal-LM / classification head), if transformers registers it
            cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            arch = (getattr(cfg, "architectures", None) or [""])[0]
            cls = registered_hf_class(cfg.model_type, arch) or AutoModel
            model = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise ModelLoadError(f"{path} is not a loadable Hugging Face model folder ({type(e).__name__}: {e})") from None
        return tag(model.eval(), f"hf:{path.resolve()}", {"kind": "tokens", "shape": [1, 128], "vocab": model.config.vocab_size})
    raise ModelLoadError(f"{path} is neither a torchshrink save (manifest.json) nor a Hugging Face folder (config.json)")


def _check_hf_size(path: Path) -> None:
    """Refuse a Hugging Face folder whose config declares a model far larger than its weight files
    (built on the meta device to count), before transformers allocates it."""
    from transformers import AutoConfig, AutoModel

    from torchshrink.export.loading import check_skeleton_size

    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            probe = AutoModel.from_config(cfg, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a loadable Hugging Face model folder ({type(e).__name__}: {str(e)[:200]})") from None
    stored = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    check_skeleton_size(probe, stored, f"{path}/config.json")


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        from torchshrink.export.io import read_tensors

        weights = read_tensors(path)
    else:
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(
                f"{path} could not be read as a state dict with weights_only=True ({type(e).__name__}); "
                "torchshrink never unpickles arbitrary objects: save a state_dict or safetensors"
            ) from None
    if not isinstance(weights, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelLoadError(f"{path} does not fit the architecture: {str(e).splitlines()[1:2] or e}") from None


def example_inputs(model: nn.Module, batch: int | None = None, seq: int | None = None, seed: int = 0
                   ) -> tuple[torch.Tensor, ...]:
    """Random inputs of the kind a model's loader recorded (zoo, torchvision, Hugging Face, --input-shape)."""
    inp = state.get(model, "input")
    if inp is None:
        raise ModelLoadError(
            f"no example input is known for {type(model).__name__}; give one (e.g. --input-shape 1,3,224,224)"
        )
    shape = list(inp["shape"])
    if batch is not None:
        shape[0] = batch
    g = torch.Generator().manual_seed(seed)
    if inp.get("kind") == "tokens":
        if seq is not None:
            shape[1] = seq
        vocab = int(inp.get("vocab", 30000))
        lo = 1000 if vocab > 2000 else 1  # skip special tokens of real vocabularies
        ids = torch.randint(lo, min(vocab, 20000), shape, generator=g)
        return (ids, torch.ones(shape, dtype=torch.long))
    return (torch.randn(*shape, generator=g, dtype=getattr(torch, inp.get("dtype", "float32"))),)


MAX_INPUT_ELEMENTS = 1 << 28  # an example input of at most 1 GiB in float32


def parse_shape(text: str) -> list[int]:
    """``1,3,224,224`` (or ``1x3x224x224``) as a list; anything else, a zero, more than 8 dimensions or more than
    MAX_INPUT_ELEMENTS elements is one error (an example input is allocated: 1,4,99999999999 is refused, not tried)."""
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    if not parts or not all(p.isdigit() for p in parts) or len(parts) > 8 or any(int(p) == 0 for p in parts):
        raise ModelLoadError(f"invalid input shape {text!r}; write it like 1,3,224,224 (1 to 8 whole numbers >= 1)")
    shape = [int(p) for p in parts]
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ModelLoadError(f"input shape {text!r} has {math.prod(shape):,} elements; at most {MAX_INPUT_ELEMENTS:,}")
    return shape
