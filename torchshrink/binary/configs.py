"""Binarize / ternarize configs (family ``binarize``), their handler and finalize.

``torchshrink.binarize(model, BWNConfig())`` returns the model with training layers (latent float
weights) in place of the selected Linear / Conv2d layers; fine-tune it (a recipe stage does), then
``finalize`` (or :func:`convert`) swaps them for bit-packed inference modules. First and last
Linear/Conv2d layers (in module order) stay float unless ``keep_first_last: false``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.binary.layers import FULLY_BINARY, TRAINING_LAYERS, BinaryConv2d, BinaryLinear
from torchshrink.binary.modules import to_packed
from torchshrink.core.config import Config, check_range, register
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.core.select import Select, config_for, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.measure.quality import iter_batches

log = logging.getLogger(__name__)
SUPPORTED = ("Linear", "Conv2d")


def _unsupported_reason(m: nn.Module) -> str | None:
    if type(m) not in (nn.Linear, nn.Conv2d):
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
    """Per-row median moved half-way to the next larger value seen. Inputs of a layer after a binary
    layer take few distinct values; a threshold that sits on one of them would let rounding noise
    (float vs integer kernel) flip signs, so it is put in the gap instead."""
    med = vals.median(1).values
    above = torch.where(vals > med[:, None], vals, torch.full_like(vals, float("inf"))).min(1).values
    return torch.where(torch.isfinite(above), (med + above) / 2, med)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, layers: list[nn.Module], data: Any, max_batches: int = 8) -> int:
    """Set each fully binary layer's activation threshold to its per-channel input median (see _gap_median)."""
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        ch = x.transpose(0, 1).reshape(x.shape[1], -1) if isinstance(mod, BinaryConv2d) else x.reshape(-1, x.shape[-1]).T
        seen[id(mod)].append(ch[:, :4096])

    hooks = [m.register_forward_pre_hook(hook) for m in layers]
    was = model.training
    model.eval()
    n = 0
    try:
        for inputs, _ in iter_batches(data):
            model(*inputs)
            n += 1
            if n >= max_batches:
                break
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
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
    chosen = select_modules(model, select, SUPPORTED)
    all_layers = [n for n, m in model.named_modules() if n and type(m) in (nn.Linear, nn.Conv2d)]
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
    if fully and data is not None and getattr(config, "threshold_init", "zero") == "median":
        for m in fully:  # in order, so each layer sees the inputs its calibrated predecessors give
            calibrate_thresholds(model, [m], data)
    for m in fully:
        m.act_threshold.requires_grad_(getattr(config, "learn_threshold", True))
    model._torchshrink_binary_report = report
    return model


def convert(model: nn.Module, backend: str = "auto", *, inplace: bool = False) -> nn.Module:
    """Replace every binary / ternary training layer with its packed inference module.

    Works on a copy unless ``inplace=True``."""
    if not inplace:
        model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, TRAINING_LAYERS):
            if name:
                set_module(model, name, to_packed(m, backend))
            else:
                model = to_packed(m, backend)
    return model


def finalize_binarize(model: nn.Module, config: BinarizeConfig) -> nn.Module:
    return convert(model, getattr(config, "backend", "auto"), inplace=True)


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinarizeConfig(Config):
    """Fields every binarize kind has."""

    family = "binarize"
    mode = ""
    keep_first_last: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ActivationFields(BinarizeConfig):
    act_estimator: Literal["ste", "approx_sign"] = "ste"
    clip: float = 1.0
    threshold_init: Literal["median", "zero"] = "median"
    learn_threshold: bool = True
    backend: Literal["auto", "c", "numpy"] = "auto"

    def validate(self) -> None:
        check_range(f"{self.kind}.clip", self.clip, 0, 1e6, lo_open=True)


_reg = lambda: register(apply_binarize, finalize=finalize_binarize)  # noqa: E731


@_reg()
@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryConnectConfig(BinarizeConfig):
    """BinaryConnect: weights sign(W), activations float."""

    kind = "binaryconnect"
    mode = "binaryconnect"


@_reg()
@dataclasses.dataclass(frozen=True, kw_only=True)
class BWNConfig(BinarizeConfig):
    """Binary-weight network: alpha * sign(W), alpha = mean|W| per output channel."""

    kind = "bwn"
    mode = "bwn"
    weight_estimator: Literal["ste", "magnitude_aware"] = "ste"


@_reg()
@dataclasses.dataclass(frozen=True, kw_only=True)
class BNNConfig(_ActivationFields):
    """Fully binary (BNN): sign(W) (*) sign(x - tau), run by the XNOR-popcount kernel."""

    kind = "bnn"
    mode = "bnn"


@_reg()
@dataclasses.dataclass(frozen=True, kw_only=True)
class XNORConfig(_ActivationFields):
    """XNOR-Net: alpha * (sign(W) (*) sign(x - tau)) * beta, run by the XNOR-popcount kernel."""

    kind = "xnor"
    mode = "xnor"
    weight_estimator: Literal["ste", "magnitude_aware"] = "ste"


@_reg()
@dataclasses.dataclass(frozen=True, kw_only=True)
class TWNConfig(BinarizeConfig):
    """Ternary weight network: alpha * {-1, 0, 1}, threshold threshold_factor * mean|W|."""

    kind = "twn"
    mode = "twn"
    threshold_factor: float = 0.7
    per_channel: bool = False

    def validate(self) -> None:
        check_range("twn.threshold_factor", self.threshold_factor, 0, 10, lo_open=True)


@_reg()
@dataclasses.dataclass(frozen=True, kw_only=True)
class TTQConfig(BinarizeConfig):
    """Trained ternary quantization: {-Wn, 0, Wp} with learned scales, threshold t * max|W|."""

    kind = "ttq"
    mode = "ttq"
    threshold: float = 0.05

    def validate(self) -> None:
        check_range("ttq.threshold", self.threshold, 0, 1, lo_open=True, hi_open=True)
