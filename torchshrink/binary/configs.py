"""The six binarize kinds (family ``binarize``): BinaryConnect, BWN, BNN, XNOR-Net, TWN and TTQ.
They share one handler (``handler.py``) and differ in what they binarize and how they scale."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, TypeVar, dataclass_transform

from torchshrink.binary.handler import apply_binarize, finalize_binarize
from torchshrink.core.config import Config, check_range, register

C = TypeVar("C", bound=type)


@dataclass_transform(frozen_default=True, kw_only_default=True)
def _binarize_kind(cls: C) -> C:
    """Make ``cls`` a frozen keyword-only config dataclass (registered with the binarize handler below)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinarizeConfig(Config):
    """Fields every binarize kind has; the layer mode is the kind. ``ranges``: {field: (lo, hi,
    lo_open, hi_open)} checked by :meth:`validate`."""

    family = "binarize"
    ranges: ClassVar[dict[str, tuple[float, float, bool, bool]]] = {}
    keep_first_last: bool = True
    keep_dtype: Literal["float32", "float16", "int8"] = "int8"
    param_dtype: Literal["float16", "float32"] = "float16"
    fold: bool = True

    @property
    def mode(self) -> str:
        return self.kind

    def validate(self) -> None:
        for name, (lo, hi, lo_open, hi_open) in self.ranges.items():
            check_range(f"{self.kind}.{name}", getattr(self, name), lo, hi, lo_open=lo_open, hi_open=hi_open)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScaledFields(BinarizeConfig):
    weight_estimator: Literal["ste", "magnitude_aware"] = "ste"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ActivationFields(BinarizeConfig):
    ranges = {"clip": (0, 1e6, True, False)}
    act_estimator: Literal["ste", "approx_sign"] = "ste"
    clip: float = 1.0
    threshold_init: Literal["median", "zero"] = "median"
    learn_threshold: bool = True
    # a ReLU between a BatchNorm and a fully binary layer becomes Identity (XNOR-Net's BN -> sign ->
    # binary layer order), so the layer's threshold folds into the BatchNorm bias and is not stored
    fold_threshold: bool = True
    backend: Literal["auto", "c", "numpy"] = "auto"


@_binarize_kind
class BinaryConnectConfig(BinarizeConfig):
    """BinaryConnect: weights sign(W), activations float."""

    kind = "binaryconnect"


@_binarize_kind
class BWNConfig(_ScaledFields):
    """Binary-weight network: alpha * sign(W), alpha = mean|W| per output channel."""

    kind = "bwn"


@_binarize_kind
class BNNConfig(_ActivationFields):
    """Fully binary (BNN): sign(W) (*) sign(x - tau), run by the XNOR-popcount kernel."""

    kind = "bnn"


@_binarize_kind
class XNORConfig(_ActivationFields, _ScaledFields):
    """XNOR-Net: alpha * (sign(W) (*) sign(x - tau)) * beta, run by the XNOR-popcount kernel."""

    kind = "xnor"


@_binarize_kind
class TWNConfig(BinarizeConfig):
    """Ternary weight network: alpha * {-1, 0, 1}, threshold threshold_factor * mean|W|."""

    kind = "twn"
    ranges = {"threshold_factor": (0, 10, True, False)}
    threshold_factor: float = 0.7
    per_channel: bool = False


@_binarize_kind
class TTQConfig(BinarizeConfig):
    """Trained ternary quantization: {-Wn, 0, Wp} with learned scales, threshold t * max|W|."""

    kind = "ttq"
    ranges = {"threshold": (0, 1, True, True)}
    threshold: float = 0.05


for _kind in (BinaryConnectConfig, BWNConfig, BNNConfig, XNORConfig, TWNConfig, TTQConfig):
    register(_kind, apply_binarize, finalize=finalize_binarize, trains=True)
