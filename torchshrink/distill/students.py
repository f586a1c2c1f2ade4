"""Building a student from a teacher: a layer-dropped transformer (kept layers initialized from
the teacher, as DistilBERT did), a width-reduced chain CNN/MLP, or any user module."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ConfigError, DataError, UnsupportedLayerError
from torchshrink.core.surgery import get_module, set_module

log = logging.getLogger(__name__)


def find_layer_stack(model: nn.Module) -> str:
    """Qualified name of the transformer's block list: the longest ``nn.ModuleList`` whose
    children all have one type (``encoder.layer`` in BERT, ``h`` in GPT-2, ``layers`` in Llama)."""
    best, best_len = None, 1
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > best_len and len({type(c) for c in m}) == 1:
            best, best_len = name, len(m)
    if best is None:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no list of repeated blocks (nn.ModuleList of >= 2 equal layers) to drop "
            "layers from; pass layers_path='...' naming it"
        )
    return best


def keep_indices(n: int, keep: str | Sequence[int]) -> list[int]:
    """Which of ``n`` layers to keep: ``"every_other"`` (0, 2, 4, ...), ``"every_other_last"``
    (..., n-3, n-1: ends at the last layer), ``"spread"`` (half of them, evenly spaced with first
    and last), or explicit indices."""
    if isinstance(keep, str):
        if keep == "every_other":
            return list(range(0, n, 2))
        if keep == "every_other_last":
            return list(range(n - 1, -1, -2))[::-1]
        if keep == "spread":
            k = max(1, (n + 1) // 2)
            if k == 1:
                return [n - 1]
            return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
        raise ConfigError(f"keep={keep!r} is not allowed; allowed: 'every_other', 'every_other_last', 'spread', or a list of layer indices")
    idx = [int(i) for i in keep]
    if not idx or any(i < 0 or i >= n for i in idx) or len(set(idx)) != len(idx):
        raise ConfigError(f"keep={list(keep)!r} must be distinct layer indices in [0, {n - 1}], at least one")
    return sorted(idx)


def drop_layers(teacher: nn.Module, keep: str | Sequence[int] = "every_other", *, layers_path: str | None = None) -> nn.Module:
    """A copy of ``teacher`` with only the kept transformer blocks, initialized from the teacher.

    Updates ``num_hidden_layers`` / ``n_layer`` / ``num_layers`` of Hugging Face configs found in
    the model, and per-layer ``layer_idx`` attributes (for caches), so the copy runs and saves.
    """
    student = copy.deepcopy(teacher)
    path = layers_path or find_layer_stack(student)
    stack = get_module(student, path)
    if not isinstance(stack, nn.ModuleList | nn.Sequential):
        raise UnsupportedLayerError(f"{path!r} is a {type(stack).__name__}, not an nn.ModuleList of blocks")
    idx = keep_indices(len(stack), keep)
    new = type(stack)([stack[i] for i in idx])
    set_module(student, path, new)
    for m in student.modules():
        cfg = getattr(m, "config", None)
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(cfg, attr, None), int) and getattr(cfg, attr) == len(stack):
                setattr(cfg, attr, len(idx))
    for new_i, block in enumerate(new):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_i
    state.put(student, student={"kind": "layers", "path": path, "kept": idx})
    log.info("student keeps layers %s of %d in %s", idx, len(stack), path)
    return student


def _scaled(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


def shrink_width(teacher: nn.Module, width: float, example: Sequence[torch.Tensor] | torch.Tensor) -> nn.Module:
    """A freshly initialized copy of a chain network (convs / linears in forward order, as in
    VGG-style CNNs and MLPs) whose hidden widths are scaled by ``width``; the input channels and
    the output layer stay. Residual or branching graphs are refused with UnsupportedLayerError.
    """
    if not 0 < width <= 1:
        raise ConfigError(f"width={width!r} is outside the allowed range (0, 1]")
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    order: list[str] = []
    names = {m: n for n, m in teacher.named_modules()}
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(names[mod]))
        for m in teacher.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d | nn.BatchNorm1d | nn.LayerNorm | nn.GroupNorm)
    ]
    try:
        with torch.no_grad():
            was = teacher.training
            teacher.eval()
            out = teacher(*example)
            teacher.train(was)
    finally:
        for h in handles:
            h.remove()
    if len(order) != len(set(order)):
        raise UnsupportedLayerError("shrink_width needs each layer to run once per forward (a chain network)")
    student = copy.deepcopy(teacher)
    weights = [n for n in order if isinstance(get_module(teacher, n), nn.Conv2d | nn.Linear)]
    if not weights:
        raise UnsupportedLayerError(f"{type(teacher).__name__} has no Conv2d or Linear layers to shrink")
    prev_old: int | None = None
    prev_new: int | None = None
    for name in order:
        m = get_module(teacher, name)
        last = name == weights[-1]
        if isinstance(m, nn.Conv2d):
            cin = m.in_channels if prev_new is None else prev_new
            if prev_old is not None and m.in_channels != prev_old:
                raise UnsupportedLayerError(f"layer {name!r} does not take the previous layer's output: not a chain network")
            cout = m.out_channels if last else _scaled(m.out_channels, width)
            groups = m.groups
            if groups > 1 and groups == m.in_channels:  # depthwise: one group per (now fewer) input channel
                groups, cout = cin, cin * (m.out_channels // m.in_channels)
            elif groups > 1:  # g groups stay g groups: both widths rounded up to a multiple of g
                if cin % groups:
                    raise UnsupportedLayerError(f"grouped convolution {name!r} (groups={groups}) takes {cin} channels "
                                                f"after shrinking, not a multiple of its groups: give another width")
                cout = m.out_channels if last else -(-cout // groups) * groups
            new: nn.Module = nn.Conv2d(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                                       m.bias is not None, m.padding_mode)
            prev_old, prev_new = m.out_channels, cout
        elif isinstance(m, nn.Linear):
            if prev_old is None or m.in_features == prev_old:
                fin = m.in_features if prev_new is None else prev_new
            elif m.in_features % prev_old == 0:  # flattened feature map: spatial positions x channels
                fin = m.in_features // prev_old * prev_new
            else:
                raise UnsupportedLayerError(f"layer {name!r} does not take the previous layer's output: not a chain network")
            fout = m.out_features if last else _scaled(m.out_features, width)
            new = nn.Linear(fin, fout, m.bias is not None)
            prev_old, prev_new = m.out_features, fout
        elif isinstance(m, nn.LayerNorm):
            if prev_old is None or tuple(m.normalized_shape) != (prev_old,):
                raise UnsupportedLayerError(f"LayerNorm {name!r} does not normalize the previous layer's features: "
                                            "not a chain network")
            new = nn.LayerNorm(prev_new, m.eps, m.elementwise_affine, bias=m.bias is not None)
        elif isinstance(m, nn.GroupNorm):
            if prev_old is None or m.num_channels != prev_old or prev_new % m.num_groups:
                raise UnsupportedLayerError(f"GroupNorm {name!r} ({m.num_groups} groups) cannot take the shrunk "
                                            f"layer's {prev_new} channels: give another width")
            new = nn.GroupNorm(m.num_groups, prev_new, m.eps, m.affine)
        else:
            if prev_old is None or m.num_features != prev_old:
                raise UnsupportedLayerError(f"normalization {name!r} does not follow a shrunk layer: not a chain network")
            new = type(m)(prev_new, m.eps, m.momentum, m.affine, m.track_running_stats)
        set_module(student, name, new)
    try:
        with torch.no_grad():
            student.eval()
            s_out = student(*example)
    except Exception as e:
        raise UnsupportedLayerError(
            f"the width-reduced copy of {type(teacher).__name__} does not run ({type(e).__name__}: {e}); "
            "shrink_width supports chain networks only; pass your own student module instead"
        ) from None
    t_shape = getattr(out, "shape", None)
    if t_shape is not None and getattr(s_out, "shape", None) != t_shape:
        raise DataError(f"the width-reduced student's output {tuple(s_out.shape)} differs from the teacher's {tuple(t_shape)}")
    state.put(student, student={"kind": "width", "width": width})
    return student.train(teacher.training)


def as_student(module: Any, teacher: nn.Module | None = None) -> nn.Module:
    """A user-supplied student: checked to be a module distinct from the teacher."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"a student must be a torch.nn.Module, got {type(module).__name__}")
    if teacher is not None and module is teacher:
        raise ConfigError("the student is the teacher object itself; pass a separate module (e.g. copy.deepcopy)")
    return module


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
