"""Calibration observers: watch activations, then give a clipping range and quantization params.

``minmax``, ``moving_average`` (EMA of batch min/max), ``percentile`` (clip at the p-th percentile
of |x|), ``mse`` (clip that minimizes the quantization MSE on the seen samples) and ``entropy``
(the TensorRT-style KL-divergence threshold on a histogram).
"""

from __future__ import annotations

import math

import torch

from torchshrink.core.errors import ConfigError, DataError
from torchshrink.quant.primitives import fake_quantize, qparams_from_minmax

_SAMPLES = 1 << 16  # values kept per observer for percentile / mse


class Observer:
    name = "minmax"

    def __init__(self) -> None:
        self.min_val: float | None = None
        self.max_val: float | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError("calibration saw NaN or infinite activations; check the calibration data")
        self._update(x, lo, hi)
        self.batches += 1

    def _update(self, x: torch.Tensor, lo: float, hi: float) -> None:
        self.min_val = lo if self.min_val is None else min(self.min_val, lo)
        self.max_val = hi if self.max_val is None else max(self.max_val, hi)

    def _check(self) -> None:
        if self.batches == 0:
            raise DataError("an observer saw no data: calibration needs at least one batch that reaches the layer")

    def range(self) -> tuple[float, float]:
        self._check()
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val

    def qparams(self, *, bits: int = 8, signed: bool = False, symmetric: bool = False) -> tuple[float, int]:
        lo, hi = self.range()
        s, z = qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), bits=bits, signed=signed, symmetric=symmetric)
        return float(s), int(z)


class MovingAverageObserver(Observer):
    name = "moving_average"

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum

    def _update(self, x: torch.Tensor, lo: float, hi: float) -> None:
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            m = self.momentum
            self.min_val = (1 - m) * self.min_val + m * lo
            self.max_val = (1 - m) * self.max_val + m * hi


class _SampleObserver(Observer):
    """Keeps a bounded random sample of the values (plus exact min/max)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(0)

    def _update(self, x: torch.Tensor, lo: float, hi: float) -> None:
        super()._update(x, lo, hi)
        flat = x.reshape(-1)
        if flat.numel() > _SAMPLES // 4:
            flat = flat[torch.randint(0, flat.numel(), (_SAMPLES // 4,), generator=self._gen)]
        self.samples.append(flat)
        total = sum(s.numel() for s in self.samples)
        if total > _SAMPLES:
            allv = torch.cat(self.samples)
            self.samples = [allv[torch.randperm(allv.numel(), generator=self._gen)[:_SAMPLES]]]

    def values(self) -> torch.Tensor:
        self._check()
        return torch.cat(self.samples)


class PercentileObserver(_SampleObserver):
    name = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile={percentile} must be in (50, 100]")
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        v = self.values()
        q = self.percentile / 100.0
        return float(torch.quantile(v, 1 - q)), float(torch.quantile(v, q))


class MSEObserver(_SampleObserver):
    """Searches a shrink factor of the min/max range that minimizes the fake-quant MSE."""

    name = "mse"

    def __init__(self, bits: int = 8, symmetric: bool = False, steps: int = 40) -> None:
        super().__init__()
        self.bits, self.symmetric, self.steps = bits, symmetric, steps

    def range(self) -> tuple[float, float]:
        v = self.values()
        lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        signed = lo < 0 and self.symmetric
        best, best_err = (lo, hi), float("inf")
        for i in range(self.steps):
            r = 1.0 - i / (self.steps + 1) * 0.9
            s, z = qparams_from_minmax(torch.tensor(lo * r), torch.tensor(hi * r), bits=self.bits, signed=signed,
                                       symmetric=self.symmetric)
            err = float(((fake_quantize(v, s, z, bits=self.bits, signed=signed) - v) ** 2).mean())
            if err < best_err:
                best, best_err = (lo * r, hi * r), err
        return best


class EntropyObserver(_SampleObserver):
    """KL-divergence calibration on a 2048-bin histogram of |x| (threshold chosen among 128..2048 bins)."""

    name = "entropy"

    def __init__(self, bits: int = 8, bins: int = 2048) -> None:
        super().__init__()
        self.bits, self.bins = bits, bins

    def range(self) -> tuple[float, float]:
        v = self.values()
        lo, hi = float(v.min()), float(v.max())
        amax = max(abs(lo), abs(hi), 1e-12)
        hist = torch.histc(v.abs(), bins=self.bins, min=0.0, max=amax).double()
        levels = 2 ** (self.bits - 1) if lo < 0 else 2**self.bits
        best_i, best_kl = self.bins, float("inf")
        for i in range(levels, self.bins + 1, max(1, self.bins // 128)):
            p = hist[:i].clone()
            p[i - 1] += hist[i:].sum()
            # quantize the first i bins into `levels` buckets, spreading each bucket over its nonzero bins
            idx = torch.arange(i) * levels // i
            qsum = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, hist[:i])
            nz = (hist[:i] > 0).double()
            cnt = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, nz)
            q = torch.where(nz > 0, qsum[idx] / cnt[idx].clamp_min(1), torch.zeros_like(p))
            p, q = p / p.sum(), q / q.sum().clamp_min(1e-12)
            mask = p > 0
            kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum())
            if kl < best_kl:
                best_i, best_kl = i, kl
        t = amax * best_i / self.bins
        return max(lo, -t), min(hi, t)


OBSERVERS: dict[str, type[Observer]] = {
    c.name: c for c in (Observer, MovingAverageObserver, PercentileObserver, MSEObserver, EntropyObserver)
}


def make_observer(name: str, *, bits: int = 8) -> Observer:
    if name not in OBSERVERS:
        raise ConfigError(f"observer={name!r} is not known; allowed: {', '.join(OBSERVERS)}")
    if name in ("mse", "entropy"):
        return OBSERVERS[name](bits=bits)  # type: ignore[call-arg]
    return OBSERVERS[name]()
