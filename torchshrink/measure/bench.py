"""Shared plumbing for benchmark scripts: targets with PASS/FAIL, results as JSON + Markdown with
the machine at the top, and ``--check`` exiting non-zero on a FAIL. Timed comparisons are taken
interleaved in one run (:func:`torchshrink.measure.latency.time_interleaved`)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchshrink.measure.machine import machine_info, machine_markdown

BENCH_LOCK = "/tmp/torchshrink-bench.lock"


@contextlib.contextmanager
def bench_lock(path: str | None = BENCH_LOCK) -> Iterator[None]:
    """Hold the machine-wide benchmark lock (the one ``flock /tmp/torchshrink-bench.lock`` takes) around
    timed work so no two timing runs overlap. ``path=None`` or TORCHSHRINK_BENCH_LOCKED=1 (the process
    already runs under ``flock``) make it a no-op; taking it twice would wait on ourselves."""
    if path is None or os.environ.get("TORCHSHRINK_BENCH_LOCKED") == "1":
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass
class Target:
    name: str
    value: float | None
    op: str  # ">=" or "<=" or "=="
    bound: float
    unit: str = ""
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        if self.op == ">=":
            return self.value >= self.bound
        if self.op == "<=":
            return self.value <= self.bound
        return self.value == self.bound

    def row(self) -> str:
        v = "n/a" if self.value is None else f"{self.value:.4g}{self.unit}"
        return f"| {self.name} | {v} | {self.op} {self.bound:g}{self.unit} | {'PASS' if self.passed else 'FAIL'} | {self.note} |"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; results are for everyone to read
    os.replace(tmp, path)


def write_results(
    name: str, targets: list[Target], tables: dict[str, str], data: dict[str, Any], out_dir: str | Path = "benchmarks/results",
    machine: dict[str, Any] | None = None,
) -> bool:
    """Write ``<name>.json`` and ``<name>.md``; returns True when every target passed. ``machine``: the
    :func:`machine_info` the figures were measured on (a report rebuilt from stored results keeps its machine);
    default this one."""
    out = Path(out_dir)
    info = machine or machine_info()
    md = [f"# {name}\n", machine_markdown(info), ""]
    if targets:
        md += ["## Targets\n", "| target | measured | required | result | note |", "|---|---:|---:|---|---|"]
        md += [t.row() for t in targets] + [""]
    for title, table in tables.items():
        md += [f"## {title}\n", table, ""]
    payload = {"name": name, "machine": info, "targets": [dict(dataclasses.asdict(t), passed=t.passed) for t in targets], **data}
    _atomic_write(out / f"{name}.json", json.dumps(payload, indent=1, default=str))
    _atomic_write(out / f"{name}.md", "\n".join(md))
    return all(t.passed for t in targets)


def previous_results(name: str, out_dir: str | Path, keep: bool) -> dict[str, Any]:
    """``<name>.json`` from an earlier run when ``keep`` (a script re-running one part keeps the other parts'
    rows), else {}."""
    path = Path(out_dir) / f"{name}.json"
    return json.loads(path.read_text()) if keep and path.is_file() else {}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
