"""Quantization-aware training with learned step sizes (LSQ, Esser et al. 2020).

prepare (this handler): Conv2d / Linear get fake-quant weights (per-channel, symmetric
[-(2^(b-1)-1), 2^(b-1)-1]) and fake-quant inputs (per tensor), both with a learnable step and a
straight-through estimator -> the shared fine-tune loop trains weights and steps -> ``finalize``
converts to the same integer modules as static PTQ (Int8Conv2d / Int8Linear / QuantizedAdd): the
weights keep their trained low-bit grid (per-channel scale absorbs the BatchNorm fold), activations
run as quint8 with scales calibrated on the batches given at prepare time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.report import carry, current
from torchshrink.core.select import Select, config_for, is_plain, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.quant.common import calibration_batches
from torchshrink.quant.static import Int8StaticConfig, apply_int8_static


class LSQ(nn.Module):
    """Fake-quantizer with a learnable step; initialized from the first tensor it sees."""

    def __init__(self, bits: int, *, signed: bool | None, channels: int = 0) -> None:
        super().__init__()
        self.bits, self.signed, self.channels = bits, signed, channels
        self.step = nn.Parameter(torch.ones(channels if channels else 1))
        self.register_buffer("initialized", torch.tensor(False))

    def _range(self) -> tuple[int, int]:
        half = 2 ** (self.bits - 1) - 1
        return (-half, half) if self.signed else (0, 2**self.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1) if self.channels else (1,)
        if not bool(self.initialized):
            if self.signed is None:
                self.signed = bool(x.min() < 0)
            _, qmax = self._range()
            a = x.detach().abs()
            m = a.reshape(x.shape[0], -1).mean(1) if self.channels else a.mean().reshape(1)
            self.step.data.copy_((2 * m / math.sqrt(qmax)).clamp_min(1e-8))
            self.initialized.fill_(True)
        qmin, qmax = self._range()
        g = 1.0 / math.sqrt(max(x.numel() / self.step.numel(), 1) * qmax)
        s = self.step * g + (self.step - self.step * g).detach()  # LSQ gradient scaling
        s = s.abs().clamp_min(1e-8).reshape(shape)
        v = torch.clamp(x / s, qmin, qmax)
        return (v.round() - v).detach() * s + v * s

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(x)


class QATLayer(nn.Module):
    """Conv2d or Linear with LSQ-quantized weights and inputs (training state only, never saved as a result)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        self.layer = layer
        self.wq = LSQ(weight_bits, signed=True, channels=layer.weight.shape[0])
        self.aq = LSQ(act_bits, signed=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.wq(self.layer.weight)
        x = self.aq(x)
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.linear(x, w, self.layer.bias)


def apply_qat(model: nn.Module, config: QATConfig, *, select: Select | None = None, data: Any = None,
              **_: Any) -> nn.Module:
    calib = calibration_batches(data, 8)  # initializes the steps; finalize calibrates again on its data
    for name, m in select_modules(model, select, ("Conv2d", "Linear"), replaces=True):
        if not is_plain(m, nn.Conv2d, nn.Linear):
            continue
        cfg = config_for(name, config, select)
        set_module(model, name, QATLayer(m, cfg.weight_bits, cfg.act_bits))
    was = model.training
    model.eval()
    with torch.no_grad():
        calib[0](model)
    model.train(was)
    return model


def finalize_qat(model: nn.Module, config: QATConfig, *, data: Any = None) -> nn.Module:
    """Weights onto their trained grid, then static INT8 modules whose activation scales are
    calibrated on ``data`` (ts.finalize(model, data=calib); apply / the stage runner pass theirs)."""
    calib = calibration_batches(data, 8)
    bits: dict[str, int] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLayer):
            layer = m.layer
            layer.weight.data = m.wq.quantized(layer.weight.detach())
            set_module(model, name, layer)
            bits[name] = m.wq.bits
    sel = Select(overrides={n: {"weight_bits": b} for n, b in bits.items()}) if bits else None
    out = apply_int8_static(model.eval(), Int8StaticConfig(weight_bits=8), select=sel, data=calib)
    carry(model, out)
    current(out).notes.update({"weight_bits": config.weight_bits, "act_bits": config.act_bits,
                               "execution": "int8 kernels; weights on the trained low-bit grid, quint8 activations"})
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATConfig(Config):
    """QAT with LSQ at ``weight_bits`` / ``act_bits`` (2..8; per-layer via overrides). Needs calibration
    batches (data=...) and a fine-tune stage; finalize converts to integer modules."""

    kind = "qat"
    family = "quantize"
    weight_bits: int = 8
    act_bits: int = 8

    def validate(self) -> None:
        check_range("qat.weight_bits", self.weight_bits, 2, 8)
        check_range("qat.act_bits", self.act_bits, 2, 8)


register(QATConfig, apply_qat, finalize=finalize_qat, trains=True)
