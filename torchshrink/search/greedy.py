"""The fast baseline: greedy per-layer choices from the sensitivity table and the measured
per-layer sizes / latencies, no trial runs. Also the static bounds that prove a budget infeasible."""

from __future__ import annotations

from torchshrink.search.budget import Budget
from torchshrink.search.profile import LayerProfile
from torchshrink.search.space import FLOAT, SearchSpace


def _drop(profile: LayerProfile, layer: str, label: str) -> float:
    if profile.base_quality is None or label not in profile.quality.get(layer, {}):
        return 0.0
    return max(0.0, profile.base_quality - profile.quality[layer][label])


def greedy(space: SearchSpace, profile: LayerProfile, budget: Budget) -> dict[str, str]:
    """Start all-float; repeatedly take the (layer, option) change with the least sensitivity
    (quality drop, no fine-tuning) per byte saved (or per ms saved when only latency is bounded)
    until the predicted size and latency meet the budget. Sensitivities are added per layer."""
    assign = {layer: FLOAT for layer in space.layers}
    size_limit = budget.size_limit(profile.model_bytes)
    lat_limit = budget.max_latency_ratio

    def ok() -> bool:
        size_ok = size_limit is None or profile.predict_bytes(assign) <= size_limit
        lat_ok = lat_limit is None or profile.predict_latency_ratio(assign) <= lat_limit
        return size_ok and lat_ok

    while not ok():
        size_short = size_limit is not None and profile.predict_bytes(assign) > size_limit
        best, best_score = None, float("inf")
        for layer in space.layers:
            cur = assign[layer]
            for label in space.labels(layer):
                if label == cur:
                    continue
                if size_short:
                    gain = profile.bytes[layer][cur] - profile.bytes[layer][label]
                else:
                    gain = profile.latency_ms[layer][cur] - profile.latency_ms[layer][label]
                if gain <= 0:
                    continue
                cost = _drop(profile, layer, label) - _drop(profile, layer, cur) + 1e-3
                score = cost / gain
                if score < best_score:
                    best, best_score = (layer, label), score
        if best is None:
            break  # nothing left that helps: the caller reports the budget as infeasible
        assign[best[0]] = best[1]
    return assign


def extremes(space: SearchSpace, profile: LayerProfile) -> dict[str, tuple[dict[str, str], float]]:
    """The smallest-size and lowest-latency points of the space, by the profile."""
    small = {layer: min(space.labels(layer), key=lambda lab, layer=layer: profile.bytes[layer][lab]) for layer in space.layers}
    fast = {layer: min(space.labels(layer), key=lambda lab, layer=layer: profile.latency_ms[layer][lab]) for layer in space.layers}
    return {"size": (small, float(profile.predict_bytes(small))), "latency": (fast, profile.predict_latency_ratio(fast))}


def static_infeasibility(space: SearchSpace, profile: LayerProfile, budget: Budget) -> list[str]:
    """Constraints that no point of the space can meet, by the measured per-layer costs."""
    problems = []
    ext = extremes(space, profile)
    size_limit = budget.size_limit(profile.model_bytes)
    if size_limit is not None and ext["size"][1] > size_limit:
        problems.append(f"size <= {size_limit:,.0f} B cannot be met: the smallest point in the search space is "
                        f"{ext['size'][1]:,.0f} B ({ext['size'][1] / profile.model_bytes:.3f}x of {profile.model_bytes:,} B)")
    if budget.max_latency_ratio is not None and ext["latency"][1] > budget.max_latency_ratio:
        problems.append(f"latency <= {budget.max_latency_ratio:g}x cannot be met on this machine: the fastest point "
                        f"in the search space is predicted at {ext['latency'][1]:.3f}x")
    return problems
