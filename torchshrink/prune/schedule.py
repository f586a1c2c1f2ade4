"""Sparsity schedules: one-shot, iterative (k prune / fine-tune rounds) and gradual AGP.

A schedule is a plain function ``sparsity_at(step, total) -> sparsity`` evaluated by the shared
fine-tune loop (through ``on_step``) before every optimizer step.
"""

from __future__ import annotations

import math


def oneshot(target: float, step: int, total: int) -> float:
    return target


def iterative(target: float, step: int, total: int, *, rounds: int) -> float:
    """Round r of k (r = 1..k, each a equal share of the steps) prunes to density (1 - target)^(r/k):
    the same fraction of the remaining weights each round; the last round reaches the target."""
    if total <= 0 or step >= total:
        r = rounds
    else:
        r = min(rounds, step * rounds // total + 1)
    return 1.0 - (1.0 - target) ** (r / rounds)


def agp(target: float, step: int, total: int, *, initial: float = 0.0, start: float = 0.0, end: float = 0.75,
        update_every: int = 1) -> float:
    """Zhu & Gupta (2017), "To prune, or not to prune": s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,
    updated every ``update_every`` steps from ``start`` to ``end`` (fractions of the total steps)."""
    if total <= 0 or step >= total:
        return target
    t0, t1 = start * total, max(end * total, start * total + 1)
    if step < t0:
        return initial
    t = t0 + math.floor((step - t0) / max(update_every, 1)) * max(update_every, 1)
    frac = min(1.0, (t - t0) / (t1 - t0))
    return target + (initial - target) * (1.0 - frac) ** 3
