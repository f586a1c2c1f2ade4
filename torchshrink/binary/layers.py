"""Training layers with latent float weights: binary-weight, fully binary and ternary.

Modes (``mode=``):

- ``binaryconnect``: weights ``sign(W)``, float activations (Courbariaux et al., 2015).
- ``bwn``: weights ``alpha * sign(W)`` with ``alpha = mean|W|`` per output channel (Rastegari et
  al., XNOR-Net 2016, "Binary-Weight-Networks").
- ``bnn``: weights and activations binary, ``sign(W) (*) sign(x - tau)``, no scales (Hubara et al.,
  2016). ``tau`` is a per-input-channel threshold (ReActNet's RSign, Liu et al. 2020), calibrated
  to the channel median and trained; it keeps a ReLU in front of the layer from making every
  activation +1. With ``act_channels=C`` a Linear shares one threshold among each of ``C`` groups
  of ``in_features // C`` consecutive inputs (the flattened positions of one channel), so it can
  fold into that channel's BatchNorm (``fold.py``).
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
from torch import nn

from torchshrink.binary import ste
from torchshrink.binary.geometry import ConvGeometry, LinearGeometry, _Geometry, float_geometry
from torchshrink.core.errors import ConfigError
from torchshrink.export.modules import register_module

MODES = ("binaryconnect", "bwn", "bnn", "xnor", "twn", "ttq")
FULLY_BINARY = ("bnn", "xnor")
SCALED = ("bwn", "xnor")
TERNARY = ("twn", "ttq")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")


class _BinaryMixin(_Geometry):
    """Latent float weight, bias and the quantizer; the geometry class gives the shape and the op."""

    weight: nn.Parameter

    def _setup(  # type: ignore[override]
        self,
        bias: bool = True,
        mode: str = "bwn",
        act_estimator: str = "ste",
        weight_estimator: str = "ste",
        clip: float = 1.0,
        twn_factor: float = 0.7,
        per_channel: bool = False,
        ttq_threshold: float = 0.05,
        act_channels: int = 0,
    ) -> None:
        _check_mode(mode)
        self.weight = nn.Parameter(torch.empty(self.weight_shape))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(self.n_out)) if bias else None
        self.mode, self.act_estimator, self.weight_estimator = mode, act_estimator, weight_estimator
        self.clip, self.twn_factor, self.per_channel, self.ttq_threshold = clip, twn_factor, per_channel, ttq_threshold
        self.act_channels = 0
        if mode in FULLY_BINARY:
            self.act_threshold = nn.Parameter(torch.zeros(self.n_in))
            if act_channels:
                self.share_threshold(act_channels)
        if mode == "ttq":
            self.wp = nn.Parameter(torch.ones(1))
            self.wn = nn.Parameter(torch.ones(1))

    def option_args(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "act_estimator": self.act_estimator, "weight_estimator": self.weight_estimator,
            "clip": self.clip, "twn_factor": self.twn_factor, "per_channel": self.per_channel,
            "ttq_threshold": self.ttq_threshold, "act_channels": self.act_channels,
        }

    def share_threshold(self, channels: int) -> None:
        """Use one activation threshold per group of ``n_in // channels`` consecutive inputs (Linear
        after a Flatten of ``channels`` feature maps); resets the thresholds to 0."""
        if self.mode not in FULLY_BINARY:
            raise ConfigError(f"mode={self.mode!r} has no activation threshold; allowed: {', '.join(FULLY_BINARY)}")
        if channels <= 0 or self.n_in % channels or (self.is_conv and channels != self.n_in):
            allowed = f"{self.n_in}" if self.is_conv else f"a divisor of {self.n_in}"
            raise ConfigError(f"act_channels={channels} does not fit {self.n_in} inputs; allowed: {allowed}")
        self.act_channels = 0 if channels == self.n_in else channels
        dev = self.act_threshold.device
        self.act_threshold = nn.Parameter(torch.zeros(channels, device=dev))

    def threshold_vector(self) -> torch.Tensor:
        """The activation threshold per input feature / channel (shared ones repeated), ``[n_in]``."""
        tau = self.act_threshold
        return tau.repeat_interleave(self.n_in // tau.numel()) if tau.numel() != self.n_in else tau

    @classmethod
    def from_float(cls, m: nn.Linear | nn.Conv2d, **quant: Any) -> _BinaryMixin:
        """A training layer holding ``m``'s weight and bias as its latent float parameters."""
        new = cls(**float_geometry(m), bias=m.bias is not None, **quant)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)  # type: ignore[union-attr]
        new.init_scales()
        return new.to(m.weight.device)

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

    def binarize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign(x - tau), x - tau)`` with the configured straight-through estimator."""
        xs = x - self.threshold_vector().reshape(self.channel_shape)
        return ste.binary_estimator(self.act_estimator, xs, self.clip), xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quant_weight()
        if self.mode not in FULLY_BINARY:
            return self._op(x, w, self.bias)
        a, xs = self.binarize_input(x)
        out = self._op(a, w)
        if self.mode == "xnor":
            out = out * self.xnor_beta(xs)
        return self.add_bias(out)


@register_module
class BinaryLinear(_BinaryMixin, LinearGeometry):
    """Linear layer trained with a binary or ternary weight (and, for bnn/xnor, binary input)."""


@register_module
class BinaryConv2d(_BinaryMixin, ConvGeometry):
    """Conv2d trained with a binary or ternary weight (and, for bnn/xnor, binary input).

    Zero padding is applied to the binarized input, so padded taps contribute 0, as in the
    float layer; the packed kernel reproduces this exactly.
    """


TRAINING_LAYERS = (BinaryLinear, BinaryConv2d)
