"""Training layers with latent float weights: binary-weight, fully binary and ternary.

Modes (``mode=``):

- ``binaryconnect``: weights ``sign(W)``, float activations (Courbariaux et al., 2015).
- ``bwn``: weights ``alpha * sign(W)`` with ``alpha = mean|W|`` per output channel (Rastegari et
  al., XNOR-Net 2016, "Binary-Weight-Networks").
- ``bnn``: weights and activations binary, ``sign(W) (*) sign(x - tau)``, no scales (Hubara et al.,
  2016). ``tau`` is a per-input-channel threshold (ReActNet's RSign, Liu et al. 2020), calibrated
  to the channel median and trained; it keeps a ReLU in front of the layer from making every
  activation +1.
- ``xnor``: ``alpha * (sign(W) (*) sign(x - tau)) * beta``, ``beta`` = mean |x - tau| over the
  input channels (and, for convolutions, averaged over the kernel window) (XNOR-Net).
- ``twn``: ternary ``alpha * {-1, 0, 1}`` with threshold ``0.7 * mean|W|`` (Ternary Weight Networks).
- ``ttq``: ternary ``{-Wn, 0, Wp}`` with trained scales, threshold ``t * max|W|`` (Zhu et al., TTQ).

After training, :func:`torchshrink.binary.modules.to_packed` turns each layer into a bit-packed
inference module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.binary import ste
from torchshrink.export.modules import register_module

MODES = ("binaryconnect", "bwn", "bnn", "xnor", "twn", "ttq")
FULLY_BINARY = ("bnn", "xnor")
SCALED = ("bwn", "xnor")
TERNARY = ("twn", "ttq")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")


class _BinaryMixin(nn.Module):
    """Shared quantizer logic; subclasses hold ``weight``, ``bias`` and the layer geometry."""

    weight: nn.Parameter
    mode: str
    act_estimator: str
    weight_estimator: str
    clip: float
    twn_factor: float
    per_channel: bool
    ttq_threshold: float

    def _setup_quant(
        self,
        n_in: int,
        mode: str,
        act_estimator: str,
        weight_estimator: str,
        clip: float,
        twn_factor: float,
        per_channel: bool,
        ttq_threshold: float,
    ) -> None:
        _check_mode(mode)
        self.mode, self.act_estimator, self.weight_estimator = mode, act_estimator, weight_estimator
        self.clip, self.twn_factor, self.per_channel, self.ttq_threshold = clip, twn_factor, per_channel, ttq_threshold
        if mode in FULLY_BINARY:
            self.act_threshold = nn.Parameter(torch.zeros(n_in))
        if mode == "ttq":
            self.wp = nn.Parameter(torch.ones(1))
            self.wn = nn.Parameter(torch.ones(1))

    def _quant_args(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "act_estimator": self.act_estimator, "weight_estimator": self.weight_estimator,
            "clip": self.clip, "twn_factor": self.twn_factor, "per_channel": self.per_channel,
            "ttq_threshold": self.ttq_threshold,
        }

    def init_scales(self) -> None:
        """Set TTQ's Wp / Wn from the current latent weight (call after loading weights)."""
        if self.mode == "ttq":
            wp, wn = ste.ttq_init_scales(self.weight, self.ttq_threshold)
            with torch.no_grad():
                self.wp.fill_(wp)
                self.wn.fill_(wn)

    def quant_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (differentiable w.r.t. the latent weight)."""
        w = self.weight
        if self.mode in ("binaryconnect", "bnn"):
            return ste.sign_ste(w, self.clip)
        if self.mode in SCALED:
            if self.weight_estimator == "magnitude_aware":
                return ste.magnitude_aware_sign(w, self.clip)
            return ste.channel_mean_abs(w).detach() * ste.sign_ste(w, self.clip)
        if self.mode == "twn":
            return ste.twn_ste(w, self.twn_factor, self.per_channel)
        return ste.ttq(w, self.wp, self.wn, self.ttq_threshold)

    def weight_signs(self) -> torch.Tensor:
        """sign(W) in {-1, 1} (binary modes) or the ternary codes in {-1, 0, 1}."""
        w = self.weight.detach()
        if self.mode == "twn":
            return ste.twn_codes_and_scale(w, self.twn_factor, self.per_channel)[0]
        if self.mode == "ttq":
            return ste.ttq_codes(w, self.ttq_threshold)
        return ste.sign(w)

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2) if isinstance(self, BinaryConv2d) else (-1,)
        return x - self.act_threshold.reshape(shape)

    def binarize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign(x - tau), x - tau)`` with the configured straight-through estimator."""
        xs = self._shift(x)
        return ste.binary_estimator(self.act_estimator, xs, self.clip), xs


@register_module
class BinaryLinear(_BinaryMixin):
    """Linear layer trained with a binary or ternary weight (and, for bnn/xnor, binary input)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "bwn",
        act_estimator: str = "ste",
        weight_estimator: str = "ste",
        clip: float = 1.0,
        twn_factor: float = 0.7,
        per_channel: bool = False,
        ttq_threshold: float = 0.05,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._setup_quant(in_features, mode, act_estimator, weight_estimator, clip, twn_factor, per_channel, ttq_threshold)

    @classmethod
    def from_float(cls, m: nn.Linear, **quant: Any) -> BinaryLinear:
        new = cls(m.in_features, m.out_features, m.bias is not None, **quant)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)  # type: ignore[union-attr]
        new.init_scales()
        return new.to(m.weight.device)

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, **self._quant_args()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quant_weight()
        if self.mode not in FULLY_BINARY:
            return F.linear(x, w, self.bias)
        a, xs = self.binarize_input(x)
        out = F.linear(a, w)
        if self.mode == "xnor":
            out = out * xs.abs().mean(-1, keepdim=True)
        return out + self.bias if self.bias is not None else out


@register_module
class BinaryConv2d(_BinaryMixin):
    """Conv2d trained with a binary or ternary weight (and, for bnn/xnor, binary input).

    Zero padding is applied to the binarized input, so padded taps contribute 0, as in the
    float layer; the packed kernel reproduces this exactly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int] | int,
        stride: tuple[int, int] | int = 1,
        padding: tuple[int, int] | int = 0,
        dilation: tuple[int, int] | int = 1,
        groups: int = 1,
        bias: bool = True,
        mode: str = "bwn",
        act_estimator: str = "ste",
        weight_estimator: str = "ste",
        clip: float = 1.0,
        twn_factor: float = 0.7,
        per_channel: bool = False,
        ttq_threshold: float = 0.05,
    ) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._setup_quant(in_channels, mode, act_estimator, weight_estimator, clip, twn_factor, per_channel, ttq_threshold)

    @classmethod
    def from_float(cls, m: nn.Conv2d, **quant: Any) -> BinaryConv2d:
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,  # type: ignore[arg-type]
                  m.groups, m.bias is not None, **quant)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)  # type: ignore[union-attr]
        new.init_scales()
        return new.to(m.weight.device)

    def init_args(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
            **self._quant_args(),
        }

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quant_weight()
        if self.mode not in FULLY_BINARY:
            return self._conv(x, w, self.bias)
        a, xs = self.binarize_input(x)
        out = self._conv(a, w)
        if self.mode == "xnor":
            out = out * xnor_beta(xs, self.kernel_size, self.stride, self.padding, self.dilation)
        return out + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else out


def xnor_beta(
    xs: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """XNOR-Net's K: the channel mean of |x - tau| averaged over each kernel window, ``[B, 1, Ho, Wo]``."""
    mean_abs = xs.abs().mean(1, keepdim=True)
    box = torch.full((1, 1, *kernel_size), 1.0 / (kernel_size[0] * kernel_size[1]), dtype=xs.dtype, device=xs.device)
    return F.conv2d(mean_abs, box, None, stride, padding, dilation)


TRAINING_LAYERS = (BinaryLinear, BinaryConv2d)
