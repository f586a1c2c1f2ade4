"""``measure(model, inputs)`` and ``compare(before, after)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.table import Table
from torch import nn

from torchshrink.measure.counts import count_macs, count_nonzero, count_params, run_model
from torchshrink.measure.latency import Timing, measure_latency


@dataclasses.dataclass(frozen=True)
class Measurement:
    params: int
    nonzero_params: int
    file_bytes: int
    macs: int
    latency: Timing | None
    quality: dict[str, float]
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latency"] = self.latency.to_dict() if self.latency else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        lat = d.get("latency")
        return cls(**{**d, "latency": Timing(**lat) if lat else None})


def measure(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    threads: int | None = None,
    runs: int = 30,
    warmup: int = 10,
    latency: bool = True,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    name: str = "",
) -> Measurement:
    """Parameters, nonzeros, bytes of the file torchshrink writes, MACs, latency and quality."""
    from torchshrink.export.io import saved_bytes

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    was = model.training
    model.eval()
    try:
        run_model(model, example_inputs)  # fails early, with a clear message, on a wrong shape
        lat = measure_latency(model, example_inputs, n_threads=threads, runs=runs, warmup=warmup) if latency else None
        return Measurement(
            params=count_params(model),
            nonzero_params=count_nonzero(model),
            file_bytes=saved_bytes(model),
            macs=int(count_macs(model, example_inputs)),
            latency=lat,
            quality=dict(evaluate(model)) if evaluate else {},
            name=name,
        )
    finally:
        model.train(was)


def _fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def compare(before: Measurement, after: Measurement) -> dict[str, dict[str, float | None]]:
    """Rows of (before, after, ratio after/before) for every measured quantity."""
    rows: dict[str, dict[str, float | None]] = {}

    def add(key: str, b: float | None, a: float | None) -> None:
        ratio = (a / b) if (a is not None and b not in (None, 0)) else None
        rows[key] = {"before": b, "after": a, "ratio": ratio}

    add("params", before.params, after.params)
    add("nonzero_params", before.nonzero_params, after.nonzero_params)
    add("file_bytes", before.file_bytes, after.file_bytes)
    add("macs", before.macs, after.macs)
    if before.latency and after.latency:
        add("latency_p50_ms", before.latency.p50_ms, after.latency.p50_ms)
        add("latency_p90_ms", before.latency.p90_ms, after.latency.p90_ms)
    for k in sorted(set(before.quality) | set(after.quality)):
        add(k, before.quality.get(k), after.quality.get(k))
    return rows


def _cell(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    if key == "file_bytes":
        return _fmt_bytes(v)
    if key in ("params", "nonzero_params", "macs"):
        return _fmt_int(v)
    if key.startswith("latency"):
        return f"{v:.3f} ms"
    return f"{v:.4f}"


def _ratio(key: str, r: float | None) -> str:
    if r is None:
        return "-"
    if key == "file_bytes" and r > 0:
        return f"{r:.3f}x ({1 / r:.1f}x smaller)"
    if key.startswith("latency") and r > 0:
        return f"{r:.3f}x ({1 / r:.2f}x speed)"
    return f"{r:.3f}x"


COUNTED = ("params", "nonzero_params", "file_bytes", "macs")


def change(key: str, r: dict[str, float | None]) -> str:
    """The change column: a ratio for sizes and times, a difference in points (pp, x100) for quality."""
    if key in COUNTED or key.startswith("latency"):
        return _ratio(key, r["ratio"])
    b, a = r["before"], r["after"]
    return "-" if a is None or b is None else f"{100.0 * (a - b):+.2f} pp"


def compare_table(rows: dict[str, dict[str, float | None]], title: str = "before / after") -> Table:
    table = Table(title=title)
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, r in rows.items():
        table.add_row(key, _cell(key, r["before"]), _cell(key, r["after"]), change(key, r))
    return table


def compare_markdown(rows: dict[str, dict[str, float | None]]) -> str:
    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for key, r in rows.items():
        lines.append(f"| {key} | {_cell(key, r['before'])} | {_cell(key, r['after'])} | {change(key, r)} |")
    return "\n".join(lines) + "\n"
