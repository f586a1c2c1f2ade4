"""Depthwise-separable replacement of a standard conv: ``Conv(I -> O, k x k)`` becomes a depthwise
``k x k`` conv (``I -> I*m``, groups ``I``) followed by a pointwise ``1x1`` conv (``I*m -> O``).

Initialization is a least-squares fit to the original kernel: for every input channel i the
``O x k*k`` slice ``W[:, i]`` is approximated by a rank-m product (pointwise column x depthwise
filter), which is the Frobenius-optimal choice (Eckart-Young). With ``fit="data"`` the pointwise
weights are then refitted by least squares on the calibration activations, so the replacement
matches the original's outputs rather than its kernel. Fine-tune afterwards as for any stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core.config import Config, check_range, register
from torchshrink.core.errors import DataError
from torchshrink.core.select import Select
from torchshrink.lowrank.common import mark, run_calibration
from torchshrink.lowrank.tucker import replace_convs


def separable_factors(weight: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(depthwise [I*m, 1, kh, kw], pointwise [O, I*m, 1, 1])`` fitted to ``weight [O, I, kh, kw]``."""
    c_out, c_in, kh, kw = weight.shape
    slices = weight.detach().double().permute(1, 0, 2, 3).reshape(c_in, c_out, kh * kw)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # batched over input channels
    root = s[:, :multiplier].sqrt()
    dw = (root[:, :, None] * vh[:, :multiplier]).reshape(c_in * multiplier, 1, kh, kw)
    pw = (u[:, :, :multiplier] * root[:, None, :]).permute(1, 0, 2).reshape(c_out, c_in * multiplier, 1, 1)
    return dw.to(weight.dtype), pw.to(weight.dtype)


def factorize_separable(conv: nn.Conv2d, multiplier: int) -> nn.Sequential:
    dt, dev = conv.weight.dtype, conv.weight.device
    c_out, c_in = conv.out_channels, conv.in_channels
    mid = c_in * multiplier
    dw_w, pw_w = separable_factors(conv.weight, multiplier)
    depthwise = nn.Conv2d(c_in, mid, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, groups=c_in, bias=False, padding_mode=conv.padding_mode,
                          device=dev, dtype=dt)
    pointwise = nn.Conv2d(mid, c_out, 1, bias=conv.bias is not None, device=dev, dtype=dt)
    with torch.no_grad():
        depthwise.weight.copy_(dw_w)
        pointwise.weight.copy_(pw_w)
        if conv.bias is not None:
            pointwise.bias.copy_(conv.bias)
    return mark(nn.Sequential(depthwise, pointwise), "separable")


@torch.no_grad()
def refit_pointwise(seq: nn.Sequential, conv: nn.Conv2d, inputs: list[torch.Tensor], damp: float = 1e-4,
                    max_rows: int = 200_000) -> None:
    """Least-squares refit of the pointwise weights so ``seq`` matches ``conv`` on ``inputs``."""
    zs, ys = [], []
    for x in inputs:
        z = seq[0](x).double()
        y = conv(x).double()
        if conv.bias is not None:
            y = y - conv.bias.double()[None, :, None, None]
        zs.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        ys.append(y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]))
    z, y = torch.cat(zs)[:max_rows], torch.cat(ys)[:max_rows]
    gram = z.T @ z
    gram += damp * float(gram.diagonal().mean().clamp_min(1e-12)) * torch.eye(gram.shape[0], dtype=gram.dtype)
    p = torch.linalg.solve(gram, z.T @ y)  # [mid, O]
    seq[1].weight.copy_(p.T.reshape_as(seq[1].weight).to(seq[1].weight.dtype))


def layer_inputs(model: nn.Module, names: list[str], data: Any) -> dict[str, list[torch.Tensor]]:
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    run_calibration(model, data, {n: (lambda m, a, o, n=n: got[n].append(a[0].detach())) for n in names})
    return {n: [t.clone() for t in v] for n, v in got.items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeparableConfig(Config):
    """Depthwise-separable replacement of Conv2d layers.

    ``multiplier``: depthwise outputs per input channel (at most k*k and O). ``fit``: ``weights``
    (least squares on the kernel) or ``data`` (then refit the pointwise conv on calibration data).
    ``no_gain`` / ``check_latency`` as for the other low-rank kinds.
    """

    kind = "separable"
    family = "factorize"
    multiplier: int = 1
    fit: Literal["weights", "data"] = "weights"
    no_gain: Literal["skip", "fuse"] = "skip"
    check_latency: bool = False

    def validate(self) -> None:
        check_range("separable.multiplier", self.multiplier, 1, 1024)


def apply_separable(model: nn.Module, config: SeparableConfig, *, select: Select | None = None, data: Any = None,
                    **kwargs: Any) -> nn.Module:
    from torchshrink.core.report import current

    if config.fit == "data" and not data:
        raise DataError("separable with fit='data' needs calibration batches (data=[...]); none were given")

    def plan(conv: nn.Conv2d, cfg: SeparableConfig, name: str, q: float) -> tuple[int]:
        c_out, _, kh, kw = conv.weight.shape
        upper = min(c_out, kh * kw)
        if cfg.multiplier > upper:
            from torchshrink.core.errors import ConfigError

            raise ConfigError(f"separable.multiplier={cfg.multiplier} is too large for layer {name!r}: "
                              f"it must be in [1, {upper}] (= min(out_channels, kh*kw))")
        return (cfg.multiplier,)

    def cost(conv: nn.Conv2d, s: tuple[int], q: float) -> tuple[float, float]:
        c_out, c_in, kh, kw = conv.weight.shape
        if kh * kw == 1:
            return float("inf"), float(c_out * c_in)  # nothing to separate in a 1x1 conv
        return float(c_in * s[0] * (kh * kw + c_out)), float(c_out * c_in * kh * kw)

    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    acts = layer_inputs(model, list(originals), data) if config.fit == "data" else {}
    out = replace_convs(model, config, select, data, "separable", plan,
                        lambda conv, s: factorize_separable(conv, s[0]), cost)
    for name in current(out).changed:
        if name in acts and acts[name]:
            refit_pointwise(dict(out.named_modules())[name], originals[name], acts[name])
    return out


register(SeparableConfig, apply_separable)
