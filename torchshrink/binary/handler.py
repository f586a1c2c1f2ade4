"""The binarize handler (shared by the six binarize kinds, whose configs are in ``configs.py``):
training layers in place of the selected Linear / Conv2d layers, threshold calibration, and finalize.

``torchshrink.prepare(model, BWNConfig())`` returns the model with training layers (latent float
weights); train it (``ts.apply(..., train_data=...)`` or a recipe stage does), then ``finalize``
(or :func:`convert`) swaps them for bit-packed inference modules, folds their per-channel scales /
biases into a following BatchNorm or float layer where exact (``fold``, see ``fold.py``) and stores
the first and last Linear/Conv2d layers, which stay unbinarized unless ``keep_first_last: false``,
at ``keep_dtype``. The packed layers' float parameters are stored as ``param_dtype``. For the fully
binary kinds (bnn, xnor) with ``fold_threshold`` (default), a ReLU between a BatchNorm and a
binarized layer is replaced by Identity when binarizing, so that finalize folds the layer's
activation threshold into the BatchNorm (``fold.fold_thresholds``); the report
``ts.report(model)[-1].notes["threshold_into"]`` lists {layer: BatchNorm}.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchshrink.binary.fold import fold_into_neighbours, fold_thresholds, sign_sources
from torchshrink.binary.layers import FULLY_BINARY, TRAINING_LAYERS, BinaryConv2d, BinaryLinear
from torchshrink.binary.modules import to_packed
from torchshrink.core.data import calibrate
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.core.report import current
from torchshrink.core.select import Select, config_for, is_plain, select_modules
from torchshrink.core.surgery import get_module, set_module

if TYPE_CHECKING:
    from torchshrink.binary.configs import BinarizeConfig

log = logging.getLogger(__name__)
SUPPORTED = ("Linear", "Conv2d")


def _unsupported_reason(m: nn.Module) -> str | None:
    if not is_plain(m, nn.Linear, nn.Conv2d):
        return f"{type(m).__name__} is not a plain Linear or Conv2d (supported: {', '.join(SUPPORTED)})"
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str):
            return f"Conv2d with padding={m.padding!r} (use integer padding)"
        if m.padding_mode != "zeros":
            return f"Conv2d with padding_mode={m.padding_mode!r} (only 'zeros' is supported)"
    return None


def _layer_kwargs(cfg: BinarizeConfig) -> dict[str, Any]:
    return {
        "mode": cfg.mode,
        "act_estimator": getattr(cfg, "act_estimator", "ste"),
        "weight_estimator": getattr(cfg, "weight_estimator", "ste"),
        "clip": getattr(cfg, "clip", 1.0),
        "twn_factor": getattr(cfg, "threshold_factor", 0.7),
        "per_channel": getattr(cfg, "per_channel", False),
        "ttq_threshold": getattr(cfg, "threshold", 0.05),
    }


def _gap_median(vals: torch.Tensor) -> torch.Tensor:
    """Per-row median moved into the gap above its cluster (values within 1e-4 of the row's largest
    magnitude of it), or, where nothing lies above, into the gap below, which gives the same signs.
    Inputs of a layer after a binary layer take few distinct values (up to rounding); a threshold
    on one of them would let rounding noise (float vs integer kernel, a threshold folded into a
    BatchNorm) flip signs, so it is put in the gap instead."""
    med = vals.median(1, keepdim=True).values
    eps = 1e-4 * vals.abs().amax(1, keepdim=True)
    inf = torch.full_like(vals, float("inf"))
    near = (vals - med).abs() <= eps  # holds the median itself
    top, bottom = torch.where(near, vals, -inf).amax(1), torch.where(near, vals, inf).amin(1)
    above = torch.where(vals > med + eps, vals, inf).amin(1)
    below = torch.where(vals < med - eps, vals, -inf).amax(1)
    down = torch.where(torch.isfinite(below), (below + bottom) / 2, med[:, 0])
    return torch.where(torch.isfinite(above), (top + above) / 2, down)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, layers: list[nn.Module], data: Any, max_batches: int = 8) -> int:
    """Set each fully binary layer's activation threshold to its per-channel input median (see _gap_median)."""
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        if isinstance(mod, BinaryConv2d):
            ch = x.transpose(0, 1).reshape(x.shape[1], -1)
        else:  # [features, samples]; thresholds shared by groups of features pool their samples
            n = mod.act_threshold.numel()
            ch = x.reshape(-1, n, x.shape[-1] // n).transpose(0, 1).reshape(n, -1)
        seen[id(mod)].append(ch[:, :4096])

    names = {id(m): n for n, m in model.named_modules()}
    n = calibrate(model, data, {names[id(m)]: hook for m in layers}, pre=True, limit=max_batches, inference=False)
    for m in layers:
        if seen[id(m)]:
            m.act_threshold.copy_(_gap_median(torch.cat(seen[id(m)], 1)))  # type: ignore[operator]
    return n


def apply_binarize(model: nn.Module, config: BinarizeConfig, *, select: Select | None = None, data: Any = None,
                   **_: Any) -> nn.Module:
    if select is not None and select.types:
        bad = [t for t in select.types if t.rsplit(".", 1)[-1] not in SUPPORTED]
        if bad:
            raise UnsupportedLayerError(f"{config.kind} cannot binarize layers of type {bad[0]!r}; supported: {', '.join(SUPPORTED)}")
    chosen = select_modules(model, select, SUPPORTED, replaces=True)
    all_layers = [n for n, m in model.named_modules() if n and is_plain(m, nn.Linear, nn.Conv2d)]
    explicit = set(select.include) if select is not None else set()
    protected = {all_layers[0], all_layers[-1]} - explicit if config.keep_first_last and all_layers else set()
    report: dict[str, Any] = {"binarized": [], "kept_float": [], "skipped": {}}
    new_layers = []
    for name, m in chosen:
        if name in protected:
            report["kept_float"].append(name)
            continue
        reason = _unsupported_reason(m)
        if reason is not None:
            if name in explicit:
                raise UnsupportedLayerError(f"cannot binarize layer {name!r}: {reason}")
            report["skipped"][name] = reason
            log.warning("%s: skipping layer %r: %s", config.kind, name, reason)
            continue
        cfg = config_for(name, config, select)
        cls = BinaryLinear if isinstance(m, nn.Linear) else BinaryConv2d
        layer = cls.from_float(m, **_layer_kwargs(cfg))  # type: ignore[arg-type]
        set_module(model, name, layer)
        new_layers.append(layer)
        report["binarized"].append(name)
    if not new_layers:
        log.warning("%s: no layer was binarized (kept float: %s; skipped: %s)", config.kind,
                    report["kept_float"], list(report["skipped"]))
    fully = [m for m in new_layers if m.mode in FULLY_BINARY]
    if fully:
        report["threshold_into"] = prepare_sign_inputs(model, fully) if getattr(config, "fold_threshold", False) else {}
    if fully and data is not None and getattr(config, "threshold_init", "zero") == "median":
        for m in fully:  # in order, so each layer sees the inputs its calibrated predecessors give
            calibrate_thresholds(model, [m], data)
    for m in fully:
        m.act_threshold.requires_grad_(getattr(config, "learn_threshold", True))
    rep = current(model)
    rep.changed.update({n: config.kind for n in report["binarized"]})
    rep.skipped.update(report["skipped"])
    rep.notes.update(report)
    return model


def prepare_sign_inputs(model: nn.Module, layers: list[nn.Module]) -> dict[str, str]:
    """For each fully binary layer in ``layers`` fed by a BatchNorm through ReLU / MaxPool / Flatten
    / Dropout / Identity only (each output used once), replace the ReLUs on that path by Identity
    (XNOR-Net's BN -> sign -> binary layer order: the sign is the nonlinearity) and let a Linear
    after a Flatten share one threshold per channel, so that finalize folds the thresholds into the
    BatchNorm exactly (``fold.fold_thresholds``). Returns {layer: BatchNorm}; other layers keep
    their ReLU and a stored threshold."""
    ids = {id(m) for m in layers}
    done = {}
    for name, src in sign_sources(model, allow_relu=True).items():
        layer = get_module(model, name)
        if id(layer) not in ids:
            continue
        for relu in src.relus:
            set_module(model, relu, nn.Identity())
            log.info("binary layer %r: ReLU %r before it replaced by Identity (sign is the nonlinearity)", name, relu)
        if src.flattened and not layer.is_conv:
            layer.share_threshold(src.channels)
        done[name] = src.bn
    kept = [n for n, m in model.named_modules() if id(m) in ids and n not in done]
    if kept:
        log.info("binary layers whose input thresholds cannot fold into a BatchNorm (stored): %s", kept)
    return done


def convert(model: nn.Module, backend: str = "auto", *, inplace: bool = False, param_dtype: str = "float32",
            fold: bool = False) -> nn.Module:
    """Replace every binary / ternary training layer with its packed inference module (float
    parameters stored as ``param_dtype``); with ``fold=True`` also fold scales / biases into
    neighbours (:func:`torchshrink.binary.fold.fold_into_neighbours`). Works on a copy unless
    ``inplace=True``."""
    if not inplace:
        model = copy.deepcopy(model)
    if fold:  # thresholds first, while they are float32
        fold_thresholds(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, TRAINING_LAYERS):
            packed = to_packed(m, backend, param_dtype)
            if not name:
                return packed
            set_module(model, name, packed)
    if fold:
        fold_into_neighbours(model)
    return model


def store_kept_layers(model: nn.Module, names: list[str], keep_dtype: str) -> dict[str, str]:
    """Store the layers kept out of binarization at ``keep_dtype``: ``float16`` (weights in half
    precision, run in it) or ``int8`` (Linear: per-channel int8 weight-only; Conv2d: float16, as
    torchshrink has no int8 weight-only conv). Returns {layer: what it became}."""
    from torchshrink.quant.cast import CastWrapper
    from torchshrink.quant.modules import WeightOnlyLinear

    done = {}
    if keep_dtype == "float32":
        return done
    for name in names:
        m = get_module(model, name)
        if is_plain(m, nn.Linear) and keep_dtype == "int8":
            new: nn.Module = WeightOnlyLinear.from_float(m, bits=8, group_size=0)
        elif is_plain(m, nn.Linear, nn.Conv2d):
            new = CastWrapper(m, "float16")
        else:
            continue
        set_module(model, name, new.to(m.weight.device))
        done[name] = type(new).__name__
    return done


def finalize_binarize(model: nn.Module, config: BinarizeConfig) -> nn.Module:
    model = convert(model, getattr(config, "backend", "auto"), inplace=True, param_dtype=config.param_dtype,
                    fold=config.fold)
    notes = current(model).notes
    if "kept_float" in notes:
        notes["kept_stored_as"] = store_kept_layers(model, notes["kept_float"], config.keep_dtype)
    return model


# --------------------------------------------------------------------------- configs

