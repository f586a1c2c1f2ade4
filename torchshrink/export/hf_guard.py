"""``save_pretrained`` of a compressed Hugging Face model never writes a folder that transformers loads with
weights other than torchshrink's (#21 item 3).

Found: a bert-int8 model's ``save_pretrained`` folder loaded in transformers with every quantized Linear
re-initialized at random (weight cosine -0.003), and a head-pruned BERT's folder failed to load. So every
model torchshrink hands back (``finalize``, ``quantize_lm(pack=True)``, ``w8a8_lm``) gets a guarded
``save_pretrained`` on the instance:

* a model holding torchshrink modules (int8 / packed / sparse / binary layers transformers has no class for)
  is refused in one line naming ``ts.save`` / ``ts.load`` -- before anything is written;
* any other model is written to a temporary folder beside the target, loaded back with transformers alone
  (its own class, local files only) and compared tensor by tensor with the model's state; only an exact
  round trip is moved into place. A folder transformers loads with other weights is always refused; one
  transformers refuses to load (pruned shapes a config cannot describe, e.g. BERT's head size) is written
  only with ``save_pretrained(folder, torchshrink_loader=True)``, for
  ``torchshrink.prune.structured.from_pretrained``. A refusal is one line and leaves nothing behind.
"""

from __future__ import annotations

import copy
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import OutputWriteError


def _own_modules(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("torchshrink.")})


def _guarded_save(model: nn.Module, save_directory: str | Path, *args: Any, torchshrink_loader: bool = False,
                  **kwargs: Any) -> Any:
    own = _own_modules(model)
    if own:
        raise OutputWriteError(
            f"{type(model).__name__} holds torchshrink layers ({', '.join(own[:4])}) that transformers has no class "
            "for: save_pretrained would write a folder transformers loads with random weights; save with "
            "torchshrink.save(model, folder) and load with torchshrink.load(folder)")
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        model = _hf_layers(model)
        out = type(model).save_pretrained(model, str(tmp), *args, **kwargs)
        why, raised = _round_trip_problem(model, tmp)
        if why is not None and not (raised and torchshrink_loader):
            raise OutputWriteError(
                f"{type(model).__name__}.save_pretrained: transformers alone would load this folder with {why}; "
                "nothing written. Save with torchshrink.save(model, folder)" + (
                    ", or pass torchshrink_loader=True to write a folder only "
                    "torchshrink.prune.structured.from_pretrained loads" if raised else ""))
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        tmp.rename(target)
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _hf_layers(model: nn.Module) -> nn.Module:
    """``model``, or a copy in which the Linear layers that torchshrink made of GPT-2's Conv1D layers (so Linear
    techniques reach them) are Conv1D again: the layout transformers' class loads."""
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        return model
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except Exception:  # noqa: BLE001 - a class that cannot be built from its config alone keeps its layers
        return model
    conv = {n for n, m in fresh.named_modules() if type(m).__name__ == "Conv1D"}
    todo = [n for n in linears if n in conv]
    if not todo:
        return model
    from transformers.pytorch_utils import Conv1D

    from torchshrink.core.surgery import get_module, set_module

    out = copy.deepcopy(model)
    for name in todo:
        lin = get_module(out, name)
        c = Conv1D(lin.out_features, lin.in_features)
        with torch.no_grad():
            c.weight = nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=lin.weight.requires_grad)
            c.bias = nn.Parameter(lin.bias.detach().clone() if lin.bias is not None else
                                  torch.zeros(lin.out_features, dtype=lin.weight.dtype))
        set_module(out, name, c)
    return out


def _round_trip_problem(model: nn.Module, folder: Path) -> tuple[str | None, bool]:
    """(why transformers' own load of ``folder`` differs from ``model`` -- None when every tensor is equal --,
    whether transformers refused to load it at all)."""
    import logging

    tf_log = logging.getLogger("transformers")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)
    try:
        back = type(model).from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on shapes its config cannot describe
        return f"an error ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})", True
    finally:
        tf_log.setLevel(level)
    mine, theirs = model.state_dict(), back.state_dict()
    for k, v in mine.items():
        t = theirs.get(k)
        if t is None:
            continue  # a buffer transformers rebuilds (rotary tables) or drops
        if t.shape != v.shape:
            return f"{k} of shape {tuple(t.shape)} instead of {tuple(v.shape)}", False
        if not torch.equal(t.to(v.dtype), v):
            return f"{k} differing from the model's (max difference {float((t.float() - v.float()).abs().max()):.3g})", False
    missing = [k for k in theirs if k not in mine and not k.endswith(("inv_freq", "position_ids"))]
    if missing:
        return f"{len(missing)} tensor(s) the model does not have, initialized at random ({missing[0]}, ...)", False
    return None, False


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Give a Hugging Face model the guarded ``save_pretrained`` (a no-op for any other module)."""
    if callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config"):
        model.__dict__["save_pretrained"] = functools.partial(_guarded_save, model)
    return model
