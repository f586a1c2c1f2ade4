"""Run reports: Markdown, JSON and a self-contained HTML page with plots; per-layer summaries."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from torchshrink.core import state
from torchshrink.measure.machine import machine_markdown
from torchshrink.measure.report import _cell, change, compare_markdown
from torchshrink.recipe.svg import bar_chart, line_chart


def layer_summary(model: nn.Module) -> list[dict[str, Any]]:
    """Per weight-bearing layer: type, parameters, density (nonzero fraction), storage bits, rank."""
    rows = []
    for name, m in model.named_modules():
        if not name or any(True for _ in m.children()) and not hasattr(m, "logical_params"):
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) and not hasattr(m, "logical_params"):
            continue
        params = int(m.logical_params()) if hasattr(m, "logical_params") else int(w.numel())
        nnz = int(m.logical_nonzero()) if hasattr(m, "logical_nonzero") else int(torch.count_nonzero(w.detach())) if isinstance(w, torch.Tensor) else params
        q = getattr(m, "qweight", None)
        if isinstance(getattr(m, "bits", None), int):
            bits = m.bits
        elif isinstance(q, torch.Tensor):
            bits = 8 * q.element_size()
        elif isinstance(w, torch.Tensor) and w.dtype.is_floating_point:
            bits = torch.finfo(w.dtype).bits
        else:
            bits = None
        fused = state.get(m, "fused_from")
        rows.append({"layer": f"{fused} (fused)" if fused else name, "type": type(m).__name__, "params": params,
                     "density": nnz / params if params else 1.0, "bits": bits, "rank": getattr(m, "rank", None)})
    return rows


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# torchshrink report: {report['recipe']['name']} on {report['model']}\n", machine_markdown(report["machine"]),
             f"\n{report['timing']}\n"]
    lines += [f"\n> warning: {w}\n" for w in report.get("warnings", [])]
    if report.get("provenance"):
        lines += ["\n## Where the figures come from\n"]
        lines += [f"- {k}: {v}" for k, v in report["provenance"].items()]
    lines += ["\n## Original -> final\n", compare_markdown(report["summary"])]
    for s in report["stages"]:
        lines += [f"\n## Stage {s['name']} ({s['seconds']:.1f} s)\n", compare_markdown(s["vs_previous"])]
    if report.get("layers"):
        lines += ["\n## Layers of the final model\n", "| layer | type | params | density | bits |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['layer']} | {r['type']} | {r['params']:,} | {r['density']:.3f} | {r['bits'] or '-'} |" for r in report["layers"]]
    lines += ["\n## Load it\n", "```python\n" + load_snippet(report) + "\n```\n"]
    lines += ["\n## Recipe\n", "```yaml\n" + yaml.safe_dump(report["recipe"], sort_keys=False) + "```\n"]
    return "\n".join(lines)


def _html_table(rows: dict[str, dict[str, Any]]) -> str:
    body = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(_cell(k, r['before']))}</td><td>{escape(_cell(k, r['after']))}</td>"
        f"<td>{escape(change(k, r))}</td></tr>"
        for k, r in rows.items()
    )
    return f"<table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>{body}</table>"


def _points(report: dict[str, Any], xkey: str) -> list[tuple[float, float, str]]:
    primary = report.get("primary") or next(iter(report["original"]["quality"]), None)
    if primary is None:
        return []
    meas = [("original", report["original"])] + [(s["kind"], s["measurement"]) for s in report["stages"]]
    pts = []
    for label, m in meas:
        x = m["file_bytes"] / 1e3 if xkey == "size" else (m["latency"] or {}).get("p50_ms")
        y = m["quality"].get(primary)
        if x is not None and y is not None:
            pts.append((float(x), float(y), label))
    return pts


def report_html(report: dict[str, Any]) -> str:
    primary = report.get("primary") or "quality"
    charts = [
        line_chart(f"{primary} vs size across stages", "file kB", primary, _points(report, "size")),
        line_chart(f"{primary} vs latency across stages", "p50 latency ms", primary, _points(report, "latency")),
    ]
    for s in report["stages"]:
        hist = [h for h in s.get("finetune_history") or [] if isinstance(h.get("loss"), int | float)]
        if hist:
            charts.append(line_chart(f"fine-tune loss, stage {s['name']}", "epoch", "training loss",
                                     [(float(h["epoch"]), float(h["loss"]), f"e{h['epoch']}") for h in hist]))
    layers = report.get("layers") or []
    if layers:
        charts.append(bar_chart("density per layer (final)", "nonzero fraction", [(r["layer"], r["density"]) for r in layers]))
        charts.append(bar_chart("bits per weight (final)", "bits", [(r["layer"], float(r["bits"] or 0)) for r in layers]))
    stages = "".join(f"<h3>Stage {escape(s['name'])} ({s['seconds']:.1f} s)</h3>{_html_table(s['vs_previous'])}" for s in report["stages"])
    layer_rows = "".join(
        f"<tr><td>{escape(r['layer'])}</td><td>{escape(r['type'])}</td><td>{r['params']:,}</td><td>{r['density']:.3f}</td><td>{escape(str(r['bits'] or '-'))}</td></tr>"
        for r in layers
    )
    m = report["machine"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>torchshrink report: {escape(report['recipe']['name'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
.charts{{display:flex;flex-wrap:wrap;gap:12px}}</style></head>
<body><h1>torchshrink report: {escape(report['recipe']['name'])} on {escape(str(report['model']))}</h1>
<p>Machine: {escape(str(m.get('cpu')))}; SIMD: {escape(', '.join(m.get('simd', [])))}; torch {escape(str(m.get('torch')))}.
{escape(report['timing'])}</p>
{''.join(f'<p class="warn">warning: {escape(w)}</p>' for w in report.get('warnings', []))}
{_provenance_html(report)}
<h2>Original &rarr; final</h2>{_html_table(report['summary'])}
<h2>Plots</h2><div class="charts">{''.join(charts)}</div>
<h2>Stages</h2>{stages}
<h2>Layers of the final model</h2><table><tr><th>layer</th><th>type</th><th>params</th><th>density</th><th>bits</th></tr>{layer_rows}</table>
<h2>Load it</h2><pre>{escape(load_snippet(report))}</pre>
<h2>Recipe</h2><pre>{escape(yaml.safe_dump(report['recipe'], sort_keys=False))}</pre>
</body></html>
"""


def load_snippet(report: dict[str, Any], folder: str = "OUT/model") -> str:
    """How to load and run the result (a class of the user's own needs its architecture)."""
    spec = str(report.get("model", ""))
    own = ":" in spec and not spec.startswith(("zoo:", "torchvision:", "hf:"))
    arch = spec.split("@")[0]
    lines = ["import torchshrink as ts",
             f"model = ts.load({folder!r}{', model=YourModel()' if own else ''})  # data only: safe to load",
             "y = model(x)"]
    cli = f"torchshrink measure -m {arch + '@' if own else ''}{folder}   # size and latency here"
    return "\n".join(lines) + "\n\n" + cli


def _provenance_html(report: dict[str, Any]) -> str:
    items = "".join(f"<li>{escape(str(k))}: {escape(str(v))}</li>" for k, v in (report.get("provenance") or {}).items())
    return f"<h2>Where the figures come from</h2><ul>{items}</ul>" if items else ""


def regenerate(directory: str | Path) -> Path:
    """``torchshrink report DIR``: rebuild report.md / report.html from report.json. The file is data:
    a report.json of another layout is refused in one line, and nothing is rewritten unless both
    pages were built (each then replaced atomically)."""
    from torchshrink.core.errors import ModelLoadError
    from torchshrink.core.files import write_atomic
    from torchshrink.export.schema import read_json

    d = Path(directory)
    path = d / "report.json"
    if not path.is_file():
        raise ModelLoadError(f"{d} has no report.json; give the output folder of `torchshrink compress`")
    report = read_json(path, 256 << 20, "a report")
    try:
        if not isinstance(report, dict):
            raise TypeError("not an object")
        pages = {"report.md": report_markdown(report), "report.html": report_html(report)}
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ModelLoadError(f"{path} does not have the layout torchshrink writes ({type(e).__name__}: {str(e)[:120]})") from None
    for name, text in pages.items():
        write_atomic(d / name, text)
    return d / "report.html"
