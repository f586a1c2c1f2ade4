"""Per-layer pruning sensitivity: the quality metric when one layer alone is pruned to each sparsity.

``sensitivity(model, val_loader)`` returns a table (a list of rows), ``sensitivity_markdown`` renders
it, ``plot_sensitivity`` writes a PNG (matplotlib, imported only there). Use it to pick per-layer
overrides: a layer whose curve falls early deserves a lower sparsity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core.config import check_range
from torchshrink.core.select import Select
from torchshrink.prune.common import prunable_layers
from torchshrink.prune.importance import scores_for, sparsity_mask


def sensitivity(model: nn.Module, data: Any, *, sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
                select: Select | None = None, criterion: str = "magnitude",
                evaluate: Callable[[nn.Module], float] | None = None) -> list[dict[str, Any]]:
    """Rows ``{"layer", "sparsity", "metric", "drop"}``; the first row is the unpruned baseline
    (layer ``"(none)"``). ``evaluate(model) -> float`` defaults to accuracy on ``data``. The model is
    restored after every trial and left as it was."""
    from torchshrink.measure.quality import accuracy

    for s in sparsities:
        check_range("sensitivity sparsity", s, 0.0, 1.0, hi_open=True)
    evaluate = evaluate or (lambda m: accuracy(m, data))
    base = float(evaluate(model))
    rows: list[dict[str, Any]] = [{"layer": "(none)", "sparsity": 0.0, "metric": base, "drop": 0.0}]
    for name, module in prunable_layers(model, select):
        w = module.weight
        saved = w.detach().clone()
        scores = scores_for(criterion, saved)
        try:
            for s in sparsities:
                with torch.no_grad():
                    w.copy_(saved * sparsity_mask(scores, s).to(saved.dtype))
                metric = float(evaluate(model))
                rows.append({"layer": name, "sparsity": float(s), "metric": metric, "drop": base - metric})
        finally:
            with torch.no_grad():
                w.copy_(saved)
    return rows


def sensitivity_markdown(rows: list[dict[str, Any]]) -> str:
    sps = sorted({r["sparsity"] for r in rows if r["layer"] != "(none)"})
    layers = list(dict.fromkeys(r["layer"] for r in rows if r["layer"] != "(none)"))
    base = next((r["metric"] for r in rows if r["layer"] == "(none)"), float("nan"))
    table = {(r["layer"], r["sparsity"]): r["metric"] for r in rows}
    lines = [f"Baseline metric: {base:.4f}\n", "| layer | " + " | ".join(f"{s:.0%}" for s in sps) + " |",
             "|---|" + "---:|" * len(sps)]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(f"{table[(layer, s)]:.4f}" for s in sps) + " |")
    return "\n".join(lines) + "\n"


def plot_sensitivity(rows: list[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Metric vs sparsity, one line per layer, written as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for layer in dict.fromkeys(r["layer"] for r in rows if r["layer"] != "(none)"):
        pts = sorted((r["sparsity"], r["metric"]) for r in rows if r["layer"] == layer)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=layer)
    base = [r["metric"] for r in rows if r["layer"] == "(none)"]
    if base:
        ax.axhline(base[0], color="gray", linestyle="--", label="unpruned")
    ax.set_xlabel("sparsity of the layer")
    ax.set_ylabel("metric")
    ax.set_title(title or "pruning sensitivity per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
