"""The ``weight-only`` kind: INT8 / INT4 weights (group-wise, INT4 packed two per byte) dequantized
in the GEMM; activations stay float."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from torch import nn

from torchshrink.core.config import Config, register
from torchshrink.core.errors import ConfigError
from torchshrink.core.report import current
from torchshrink.core.select import Select, config_for, is_plain, select_modules
from torchshrink.core.surgery import set_module
from torchshrink.quant.common import note_float
from torchshrink.quant.modules import WeightOnlyLinear

log = logging.getLogger(__name__)


def fitting_group(group_size: int, in_features: int) -> int:
    """``group_size`` when it divides ``in_features``; else the largest half of it (down to 16) that does; else 0
    (one scale per output channel)."""
    g = group_size
    while g >= 16 and in_features % g:
        g //= 2
    return g if g >= 16 and group_size else 0


def apply_weight_only(model: nn.Module, config: WeightOnlyConfig, *, select: Select | None = None,
                      data: Any = None, **_: Any) -> nn.Module:
    for name, lin in select_modules(model, select, ("Linear",), replaces=True):
        cfg = config_for(name, config, select)
        if not is_plain(lin, nn.Linear):
            note_float(model, name, f"{type(lin).__name__} is not a plain Linear")
            continue
        if cfg.bits == 4 and lin.in_features % 2:
            note_float(model, name, f"in_features={lin.in_features} is odd; int4 packs two values per byte")
            continue
        group = fitting_group(cfg.group_size, lin.in_features)
        if group != cfg.group_size:  # a small layer (in_features 64 under group 128) gets smaller groups, not float
            current(model).notes.setdefault("group_size", {})[name] = (
                f"{group or 'per channel'}: group_size={cfg.group_size} does not divide in_features={lin.in_features}")
        set_module(model, name, WeightOnlyLinear.from_float(lin, bits=cfg.bits, group_size=group))
    return model


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightOnlyConfig(Config):
    """Weight-only quantization of Linear layers: int8 (per channel or per group) or int4 per group,
    packed two values per byte. ``group_size: 0`` means per output channel. Per-layer ``bits`` via
    select overrides gives mixed precision."""

    kind = "weight-only"
    family = "quantize"
    bits: Literal[4, 8] = 4
    group_size: int = 128

    def validate(self) -> None:
        if self.group_size and self.group_size not in (16, 32, 64, 128, 256):
            raise ConfigError(f"weight-only.group_size={self.group_size} is not allowed; allowed: 0 (per channel), 16, 32, 64, 128, 256")
        if self.bits == 4 and self.group_size == 0:
            pass  # per-channel int4 is allowed (lower quality)


register(WeightOnlyConfig, apply_weight_only)
