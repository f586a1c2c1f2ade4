"""Weight-only quantization of language-model Linears: the grid (bits, group size, symmetric or
asymmetric), round-to-nearest, and GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"): columns are quantized one at a time and the
rounding error of each is spread over the columns not yet quantized, weighted by the inverse Hessian
``H = X^T X`` of the layer's calibration inputs. Options as in the reference implementation and
GPTQModel: ``act_order`` (columns in decreasing ``diag(H)``), ``damp`` (fraction of the mean diagonal
added to it), ``static_groups`` (group scales fixed from the unpermuted weight before the sweep, so
act-order keeps contiguous groups on disk).

A group size that does not divide a layer's input width falls back to per-channel scales for that
layer (reported), never to a silently different grid."""

from __future__ import annotations

import dataclasses
import math

import torch

from torchshrink.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Grid:
    bits: int = 4
    group: int = 64  # 0: one scale per output channel
    sym: bool = False
    clip: bool = False  # search a shrunk range per group (MSE clipping)
    full: bool = False  # symmetric on the full signed range: the largest magnitude maps to -2^(bits-1)
    # (the scale takes its sign), as llama.cpp's Q4_0; else the restricted range +-(2^(bits-1) - 1)

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"bits={self.bits} is not supported; allowed: 2, 3, 4, 8")
        if self.group < 0 or (self.group and self.group & (self.group - 1)):
            raise ConfigError(f"group={self.group} must be 0 (per channel) or a power of two (32, 64, 128)")

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def for_width(self, width: int) -> Grid:
        """This grid, or per-channel where the group size does not divide ``width``."""
        return self if not self.group or width % self.group == 0 else dataclasses.replace(self, group=0)

    @property
    def label(self) -> str:
        return (f"W{self.bits} {'g' + str(self.group) if self.group else 'per-channel'} "
                f"{('sym full' if self.full else 'sym') if self.sym else 'asym'}"
                f"{' clip' if self.clip else ''}")


def _minmax_params(w: torch.Tensor, grid: Grid, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    if grid.sym and grid.full:
        peak = w.gather(-1, w.abs().argmax(-1, keepdim=True)) * shrink
        peak = torch.where(peak.abs() < 1e-12, torch.full_like(peak, 1e-12), peak)
        scale = _fp16(peak / -((grid.qmax + 1) // 2))
        zero = torch.full_like(scale, (grid.qmax + 1) // 2)
    elif grid.sym:
        amax = (w.abs().amax(-1, keepdim=True) * shrink).clamp_min(1e-12)
        scale = _fp16(amax / (grid.qmax // 2))  # restricted range: +-amax map to codes zero +- qmax//2
        zero = torch.full_like(scale, (grid.qmax + 1) // 2)
    else:
        lo = (w.amin(-1, keepdim=True) * shrink).clamp_max(0)
        hi = (w.amax(-1, keepdim=True) * shrink).clamp_min(0)
        scale = _fp16((hi - lo) / grid.qmax)
        zero = torch.round(-lo / scale).clamp(0, grid.qmax)
    return scale, zero


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """Scales as the fp16 values they are stored as (so what is evaluated is what is saved); a full-range
    symmetric grid's scales keep their sign."""
    mag = scale.abs().clamp(6.1e-5, 6.5e4).half().float()
    return torch.where(scale < 0, -mag, mag)


def params(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` (rows = output channels x groups, already reshaped). With
    ``grid.clip``, the range of each row is shrunk by the factor (1.0 .. 0.5, 20 steps) that minimizes
    the row's |w - dequant(quant(w))|^2.4 (the clipping search of the GPTQ reference code's ``mse`` option
    and of AWQ)."""
    w = w.float()
    scale, zero = _minmax_params(w, grid)
    if not grid.clip:
        return scale, zero
    best = (w - dequantize(quantize(w, scale, zero, grid), scale, zero)).abs().pow(2.4).sum(-1, keepdim=True)
    for i in range(1, 20):
        s, z = _minmax_params(w, grid, 1 - i / 40)
        err = (w - dequantize(quantize(w, s, z, grid), s, z)).abs().pow(2.4).sum(-1, keepdim=True)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.where(better, err, best)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes in [0, qmax]."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, grid.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1] // group, group) if group else w[:, None, :]


@dataclasses.dataclass
class Quantized:
    """Codes ``[out, in]`` and per (row, group) scale / zero ``[out, n_groups]`` of one weight."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    grid: Grid

    def dequantized(self) -> torch.Tensor:
        g = self.grid.group or self.codes.shape[1]
        q = self.codes.float().reshape(self.codes.shape[0], -1, g)
        return ((q - self.zero[..., None]) * self.scale[..., None]).reshape(self.codes.shape)


def rtn(w: torch.Tensor, grid: Grid) -> Quantized:
    """Round-to-nearest on the grid (per row and group)."""
    grid = grid.for_width(w.shape[1])
    gw = _grouped(w.detach(), grid.group)
    scale, zero = params(gw, grid)
    q = quantize(gw, scale, zero, grid)
    return Quantized(q.reshape(w.shape).to(torch.uint8), scale[..., 0], zero[..., 0], grid)


def gptq(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = 0.01, act_order: bool = True,
         static_groups: bool = True, block: int = 128) -> Quantized:
    """GPTQ of one weight ``[out, in]`` with ``hessian = X^T X`` (any positive scale) of its inputs."""
    grid = grid.for_width(w.shape[1])
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = grid.group or cols
    # static group parameters from the (unpermuted) weight; per-channel grids have one group
    s_all, z_all = params(_grouped(W, grid.group), grid)
    s_all, z_all = s_all[..., 0], z_all[..., 0]  # [out, n_groups]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:  # not positive definite even after damping: more damping
        H += 0.1 * torch.mean(torch.diag(H)) * torch.eye(cols)
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    dynamic = bool(grid.group) and not act_order and not static_groups  # group scales from error-updated columns
    if dynamic:
        block = g * max(1, block // g)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % g == 0:
                s, z = params(W1[:, i:i + g], grid)
                s_all[:, col // g], z_all[:, col // g] = s[:, 0], z[:, 0]
            grp = int(perm[col]) // g
            s, z = s_all[:, grp:grp + 1], z_all[:, grp:grp + 1]
            w1 = W1[:, i:i + 1]
            q = dequantize(quantize(w1, s, z, grid), s, z)
            Q[:, col] = q[:, 0]
            err = (w1 - q) / Hinv1[i, i]
            W1[:, i:] -= err * Hinv1[i, i:][None, :]
            Err1[:, i] = err[:, 0]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    Q = Q[:, inv]
    codes = quantize(_grouped(Q, grid.group), s_all[..., None], z_all[..., None], grid).reshape(Q.shape)
    out = Quantized(codes.to(torch.uint8), s_all, z_all, grid)
    assert torch.allclose(out.dequantized(), Q, atol=1e-4 * float(s_all.max()) + 1e-6), "GPTQ codes do not reproduce"
    return out


def layer_error(w: torch.Tensor, q: Quantized, hessian: torch.Tensor) -> float:
    """Output error ``tr(dW H dW^T)`` relative to ``tr(W H W^T)``: what the layer loses on its inputs."""
    d = (q.dequantized() - w.float())
    num = float(torch.einsum("oi,ij,oj->", d, hessian.float(), d))
    den = float(torch.einsum("oi,ij,oj->", w.float(), hessian.float(), w.float()))
    return num / max(den, 1e-30)


def bits_per_weight(grid: Grid, width: int) -> float:
    """Storage per weight as :class:`~torchshrink.llm.modules.PackedLinear` holds it: the packed code plus
    its group's fp16 scale and uint8 zero point."""
    from torchshrink.llm.modules import packed_width

    g = grid.for_width(width).group or width
    return 8 * packed_width(width, grid.bits) / width + 24 / g if g else math.nan
