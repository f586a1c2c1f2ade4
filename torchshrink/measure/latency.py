"""Latency: warm-up, interleaved timing of several models, median / p90, pinned threads."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads for the duration of the block."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    threads: int

    def to_dict(self) -> dict[str, float]:
        return {"p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "mean_ms": self.mean_ms, "runs": self.runs, "threads": self.threads}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _timing(samples: list[float], n_threads: int) -> Timing:
    ms = [s * 1000 for s in samples]
    return Timing(statistics.median(ms), _percentile(ms, 0.9), statistics.fmean(ms), len(ms), n_threads)


def _as_call(m: nn.Module | Callable[[], object], inputs: Sequence[torch.Tensor] | None) -> Callable[[], object]:
    if isinstance(m, nn.Module):
        args = tuple(inputs or ())
        return lambda: m(*args)
    return m


def time_interleaved(
    candidates: Mapping[str, nn.Module | Callable[[], object]],
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    n_threads: int | None = None,
    warmup: int = 10,
    runs: int = 30,
    min_seconds: float = 0.0,
    burst: int = 1,
) -> dict[str, Timing]:
    """Time each candidate interleaved (A B, B A, A B, ...) in one process after warm-up.

    Candidates are modules (called on ``inputs``) or zero-argument callables. Interleaving makes
    the ratio of medians robust to the machine's load drifting during the run. ``burst`` > 1: each turn
    calls the candidate ``burst`` times back to back and times the calls after the first -- the latency of
    a model serving requests one after another, where single calls time each candidate right after the
    others ran (their threads and data displaced its own).
    """
    if burst < 1:
        raise ValueError(f"burst={burst}; allowed: 1 or more calls per turn")
    calls = {k: _as_call(m, inputs) for k, m in candidates.items()}
    samples: dict[str, list[float]] = {k: [] for k in calls}
    with threads(n_threads), torch.inference_mode():
        for _ in range(warmup):
            for f in calls.values():
                f()
        start = time.perf_counter()
        i = 0
        order = list(calls.items())
        while i < runs or (time.perf_counter() - start) < min_seconds:
            # alternate the order (A B, B A, ...) so no candidate always runs right after another
            for k, f in order if i % 2 == 0 else order[::-1]:
                for j in range(burst):
                    t0 = time.perf_counter()
                    f()
                    if j or burst == 1:
                        samples[k].append(time.perf_counter() - t0)
            i += 1
            if i >= runs * 20:
                break
        n = torch.get_num_threads()
    return {k: _timing(v, n) for k, v in samples.items()}


def measure_latency(
    model: nn.Module, inputs: Sequence[torch.Tensor], *, n_threads: int | None = None, warmup: int = 10, runs: int = 30
) -> Timing:
    return time_interleaved({"model": model}, inputs, n_threads=n_threads, warmup=warmup, runs=runs)["model"]
