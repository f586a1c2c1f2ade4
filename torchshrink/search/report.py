"""Markdown report of a search: budget, chosen point, Pareto front, sensitivity table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torchshrink.measure.machine import machine_markdown
from torchshrink.search.space import describe

if TYPE_CHECKING:
    from torchshrink.search.search import SearchResult


def pareto_markdown(result: SearchResult) -> str:
    rows = ["| trial | source | size | size ratio | latency ratio (pred.) | val quality | test quality | feasible | layers |",
            "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for p in result.pareto:
        rows.append(f"| {p.number} | {p.source} | {p.size_bytes:,} | {p.size_ratio:.3f} | {p.latency_ratio:.3f} | "
                    f"{p.quality:.2f} | {p.test_quality:.2f} | {'yes' if p.feasible else 'no'} | {describe(p.assignment)} |")
    return "\n".join(rows)


def write_search_report(result: SearchResult, path: str | Path, plot: Path | None = None) -> Path:
    c = result.chosen
    lines = [
        "# torchshrink search\n", machine_markdown(result.profile.machine), "",
        f"Budget: {result.budget.describe(result.base_bytes)}  ",
        f"Result: {'feasible' if result.feasible else 'INFEASIBLE'}: {result.message}\n",
        "## Chosen point\n",
        f"- layers: {describe(c.assignment)}",
        f"- file: {c.size_bytes:,} B ({c.size_ratio:.3f}x of {result.base_bytes:,} B)",
        f"- latency: {c.latency_ratio:.3f}x (predicted from per-layer timings on this machine)",
        f"- quality: search data {c.quality:.2f} (original {result.base_quality:.2f}), "
        f"held-out {c.test_quality:.2f} (original {result.base_test_quality:.2f})\n",
        "## Pareto front (size, predicted latency, quality on the search data)\n", pareto_markdown(result), "",
        *(["## Options left out (they failed to apply to this model)\n",
           *[f"- {k}: {v}" for k, v in result.profile.skipped.items()], ""] if result.profile.skipped else []),
        "## Sensitivity (quality drop in pp with one layer changed, no fine-tuning)\n",
        result.profile.sensitivity_markdown(), "",
    ]
    if plot is not None:
        lines += [f"![sensitivity]({Path(plot).name})", ""]
    out = Path(path)
    out.write_text("\n".join(lines))
    return out
