"""A global MAC budget spent across layers by their measured approximation error.

Every selected Linear (SVD) and Conv2d (Tucker-2; 1x1 convs by SVD) gets a ladder of ranks; for
each rung the MACs come from the layer's real input/output shapes (one forward pass on the
example input) and the error is the exact relative squared error of the truncated SVD / HOSVD
at that rank. :func:`torchshrink.lowrank.rank.allocate` then lowers, step by step, the layer
whose next rung costs the least error per MAC saved, until the selection's MACs reach
``macs_ratio`` of the original (no layer below ``min_layer_ratio`` of its own MACs, so that the
cut is not bought by crushing a few layers to rank 1 or 2). Layers where no rung saves MACs are
skipped and listed.

With ``check_latency`` every chosen layer is timed at batch 1 on this machine (in ``channels_last``
layout when the model will run that way). A layer measured ``sp`` times faster, below
``min_speedup``, keeps only the rungs with at most ``sp / min_speedup`` of the tried rung's MACs
(those that could pay if time followed MACs), and the budget is allocated again, so the MAC cut
moves to deeper cuts and to the layers where factorization measurably pays; a layer with no rung
left is skipped and listed with its measured speed-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.config import Config, check_range, register
from torchshrink.core.errors import DataError
from torchshrink.core.report import current
from torchshrink.core.select import Select, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.lowrank.common import (
    check_type,
    conv_skip_reason,
    first_inputs,
    io_shapes,
    note_done,
    note_skip,
    speedup,
)
from torchshrink.lowrank.rank import Option, allocate, fast_svd, round_rank
from torchshrink.lowrank.svd import factorize_linear, linear_options
from torchshrink.lowrank.tucker import factorize_tucker2, unfold


def hosvd_error_table(weight: torch.Tensor) -> torch.Tensor:
    """``err[r_out - 1, r_in - 1]``: relative squared error of the Tucker-2 HOSVD truncation."""
    w = weight.detach().double()
    u0 = fast_svd(unfold(w, 0))[0]
    u1 = fast_svd(unfold(w, 1))[0]
    core = torch.einsum("rikl,is->rskl", torch.einsum("or,oikl->rikl", u0, w), u1)  # two steps: cheap order
    energy = core.pow(2).sum((2, 3))
    total = float(w.pow(2).sum()) or 1.0
    return (1.0 - energy.cumsum(0).cumsum(1) / total).clamp_min(0.0)


def _conv_options(conv: nn.Conv2d, shapes: tuple, steps: int, multiple: int) -> list[Option]:
    (ishape, oshape) = shapes
    c_out, c_in, kh, kw = conv.weight.shape
    p_in, p_out = ishape[-1] * ishape[-2], oshape[-1] * oshape[-2]
    dense = c_out * c_in * kh * kw * p_out
    err = hosvd_error_table(conv.weight)
    opts: dict[tuple[int, int], Option] = {}
    for j in range(steps, 0, -1):
        if kh * kw == 1:
            r = round_rank(min(c_out, c_in) * j / steps, multiple, min(c_out, c_in))
            setting, macs = (r, r), r * c_in * p_out + r * c_out * p_out
            e = float(err[min(r, err.shape[0]) - 1, min(r, err.shape[1]) - 1])
        else:
            r_out = round_rank(c_out * j / steps, multiple, c_out)
            r_in = round_rank(c_in * j / steps, multiple, c_in)
            setting = (r_out, r_in)
            macs = c_in * r_in * p_in + r_in * r_out * kh * kw * p_out + r_out * c_out * p_out
            e = float(err[min(r_out, err.shape[0]) - 1, min(r_in, err.shape[1]) - 1])
        opts[setting] = Option(setting, macs, e)
    return [o for o in sorted(opts.values(), key=lambda o: -o.macs) if o.macs < dense]


def _build(m: nn.Module, opt: Option) -> nn.Module:
    return factorize_linear(m, opt.setting[0]) if isinstance(m, nn.Linear) else factorize_tucker2(m, *opt.setting)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetConfig(Config):
    """Factorize Linear (SVD) and Conv2d (Tucker-2) layers so that the selected layers keep
    ``macs_ratio`` of their MACs, spending the cut where the measured error grows least."""

    kind = "lowrank-budget"
    family = "factorize"
    macs_ratio: float = 0.5
    steps: int = 32
    rank_multiple: int = 1
    check_latency: bool = False
    min_speedup: float = 1.0
    channels_last: bool = False
    timing_runs: int = 20
    min_layer_ratio: float = 0.0

    def validate(self) -> None:
        check_range("lowrank-budget.macs_ratio", self.macs_ratio, 0.0, 1.0, lo_open=True)
        check_range("lowrank-budget.steps", self.steps, 2, 1024)
        check_range("lowrank-budget.rank_multiple", self.rank_multiple, 1, 4096)
        check_range("lowrank-budget.min_speedup", self.min_speedup, 0.0, 100.0)
        check_range("lowrank-budget.timing_runs", self.timing_runs, 3, 10_000)
        check_range("lowrank-budget.min_layer_ratio", self.min_layer_ratio, 0.0, 1.0)


def apply_budget(model: nn.Module, config: BudgetConfig, *, select: Select | None = None, data: Any = None,
                 **kwargs: Any) -> nn.Module:
    layers = select_modules(model, select, ("Linear", "Conv2d"), replaces=True)
    for name, module in layers:
        check_type(name, module, (nn.Linear, nn.Conv2d), "lowrank-budget")
    inputs = first_inputs(model, data)
    if inputs is None:
        raise DataError("lowrank-budget needs an example input to count each layer's MACs: pass data=[batch] "
                        "or load the model with torchshrink.load_model so its input shape is known")
    shapes = io_shapes(model, [n for n, _ in layers], inputs)
    options: dict[str, list[Option]] = {}
    dense: dict[str, int] = {}
    mods = dict(layers)
    for name, m in layers:
        if name not in shapes:
            note_skip(model, name, "not reached by the example input")
            continue
        if isinstance(m, nn.Linear):
            positions = max(1, int(torch.tensor(shapes[name][1]).prod()) // m.out_features)
            dense[name] = m.in_features * m.out_features * positions
            opts = linear_options(m.weight, positions, config.steps, config.rank_multiple)
        else:
            why = conv_skip_reason(m)
            if why is not None:
                note_skip(model, name, why)
                continue
            o = shapes[name][1]
            dense[name] = m.weight.numel() * o[-1] * o[-2]
            opts = _conv_options(m, shapes[name], config.steps, config.rank_multiple)
        opts = [o for o in opts if o.macs >= config.min_layer_ratio * dense[name]]  # no layer cut deeper than this
        if not opts:
            note_skip(model, name, "factorized form is larger at every rank")
            continue
        options[name] = opts
    total = sum(dense.values())
    budget = int(config.macs_ratio * total)
    timed: dict[tuple[str, tuple[int, ...]], tuple[float, nn.Module]] = {}
    slow: dict[str, float] = {}
    while True:
        fixed = sum(v for k, v in dense.items() if k not in options)
        chosen = allocate(options, {k: dense[k] for k in options}, budget - fixed)
        if not config.check_latency:
            break
        failed = False
        for name, opt in chosen.items():
            if opt is None:
                continue
            if (name, opt.setting) not in timed:
                new = _build(mods[name], opt)
                sp = speedup(mods[name], new, shapes[name][0], config.timing_runs, config.channels_last)
                timed[name, opt.setting] = (sp, new)
            sp = timed[name, opt.setting][0]
            if sp < config.min_speedup:  # drop this rung and the rungs that, even if time followed MACs, could not pay
                failed = True
                options[name] = [o for o in options[name] if o.macs <= opt.macs * sp / config.min_speedup]
                slow[name] = sp
                if not options[name]:
                    del options[name]
        if not failed:
            break
    for name in dense:
        if name in slow and chosen.get(name) is None:
            note_skip(model, name, f"factorized form not {config.min_speedup:g}x faster on this machine "
                      f"(measured {slow[name]:.2f}x at batch 1); the MAC cut went to other layers")
    achieved = sum(v for k, v in dense.items() if k not in options)
    for name, opt in chosen.items():
        if name not in options:
            continue
        if opt is None:
            if name not in slow:
                note_skip(model, name, "left dense by the budget (cheapest error elsewhere)")
            achieved += dense[name]
            continue
        sp, new = timed.get((name, opt.setting), (None, None))
        set_module(model, name, new if new is not None else _build(mods[name], opt))
        achieved += opt.macs
        info = dict(method=state.get(model.get_submodule(name), "lowrank", ""), setting=list(opt.setting),
                    macs_ratio=round(opt.macs / dense[name], 4), rel_sq_error=round(opt.error, 5))
        if sp is not None:
            info["measured_speedup"] = round(sp, 3)
        note_done(model, name, **info)
    current(model).notes["budget"] = {"target_ratio": config.macs_ratio, "achieved_ratio": achieved / max(total, 1),
                                      "selected_macs": total}
    return model


register(BudgetConfig, apply_budget)
