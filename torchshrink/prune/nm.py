"""Semi-structured N:M pruning: in every group of M consecutive input weights keep exactly N.

2:4 is the pattern sparse tensor cores run; on a CPU it is a storage and accuracy format (the
saved file keeps only the nonzeros). Layers whose input dimension is not a multiple of M are left
dense (logged); a selection where no layer fits is an error.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.core.report import current
from torchshrink.core.select import Select, config_for
from torchshrink.prune.common import accumulate_grads, prunable_layers
from torchshrink.prune.hold import apply_masks, make_permanent, original_weight
from torchshrink.prune.importance import NEEDS_GRAD, input_last, nm_mask, scores_for
from torchshrink.prune.unstructured import hold_zeros

log = logging.getLogger(__name__)


def prune_nm(model: nn.Module, config: NMConfig, *, select: Select | None = None, data: Any = None,
             **_: Any) -> nn.Module:
    layers, skipped = [], []
    for name, m in prunable_layers(model, select):
        lc = config_for(name, config, select)
        width = input_last(original_weight(m)).shape[-1]
        (layers if width % lc.m == 0 else skipped).append((name, m, lc, width))
    for name, _, lc, width in skipped:
        current(model).skipped[name] = f"input dimension {width} is not a multiple of m={lc.m}"
        log.warning("N:M: layer %s left dense: its input dimension %d is not a multiple of m=%d", name, width, lc.m)
    if not layers:
        got = ", ".join(f"{n} (inputs {w})" for n, _, _, w in skipped[:4])
        raise UnsupportedLayerError(
            f"{config.n}:{config.m} pruning needs layers whose input dimension is a multiple of m={config.m}; "
            f"none of the selected layers fits: {got}"
        )
    needs_grad = any(lc.criterion in NEEDS_GRAD for _, _, lc, _ in layers)
    grads = accumulate_grads(model, [(n, m) for n, m, _, _ in layers], data) if needs_grad else {}
    masks, settings = {}, {}
    for i, (name, m, lc, _) in enumerate(layers):
        s = scores_for(lc.criterion, original_weight(m), grad=grads.get(name), seed=config.seed + i)
        masks[name] = nm_mask(s, lc.n, lc.m)
        settings[name] = {"kind": config.kind, "n": lc.n, "m": lc.m}
    apply_masks(model, masks, hold=False, settings=settings)
    return model


def on_step_nm(model: nn.Module, config: NMConfig, step: int, total: int) -> None:
    hold_zeros(model, config.kind)


def finalize_nm(model: nn.Module, config: NMConfig) -> nn.Module:
    make_permanent(model)
    return model


@dataclasses.dataclass(frozen=True, kw_only=True)
class NMConfig(Config):
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension (2:4, 4:8, ...)."""

    kind = "nm"
    family = "prune"
    n: int = 2
    m: int = 4
    criterion: Literal["magnitude", "l2", "random", "taylor"] = "magnitude"
    seed: int = 0

    def validate(self) -> None:
        check_range("nm.m", self.m, 1, 1024)
        check_range("nm.n", self.n, 1, 1024)
        if self.n > self.m:
            raise ConfigError(f"nm: n={self.n} > m={self.m}; N:M keeps n of every m weights, so 1 <= n <= m")


register(NMConfig, prune_nm, on_step=on_step_nm, finalize=finalize_nm)
