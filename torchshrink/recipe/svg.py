"""Tiny self-contained SVG charts for the HTML report (no JavaScript, no external files)."""

from __future__ import annotations

from html import escape

W, H, PAD, RIGHT = 440, 260, 48, 70  # RIGHT: room for point labels


def _scale(vals: list[float], lo_px: float, hi_px: float) -> tuple[float, float, callable]:
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 if lo else -0.5, hi + 0.5 if hi else 0.5
    span = hi - lo
    lo, hi = lo - 0.08 * span, hi + 0.08 * span
    return lo, hi, lambda v: lo_px + (v - lo) / (hi - lo) * (hi_px - lo_px)


def line_chart(title: str, xlabel: str, ylabel: str, points: list[tuple[float, float, str]]) -> str:
    """Points joined in order (stage by stage), each labelled."""
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, fx = _scale(xs, PAD, W - RIGHT)
    y0, y1, fy = _scale(ys, H - PAD, 24)
    path = " ".join(f"{'M' if i == 0 else 'L'}{fx(x):.1f},{fy(y):.1f}" for i, (x, y, _) in enumerate(points))
    dots = "".join(
        f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="4" fill="#1f77b4"><title>{escape(lbl)}: {x:.4g}, {y:.4g}</title></circle>'
        f'<text x="{fx(x) + 6:.1f}" y="{fy(y) - 6:.1f}" font-size="10">{escape(lbl)}</text>'
        for x, y, lbl in points
    )
    return _frame(title, xlabel, ylabel, (x0, x1), (y0, y1)) + f'<path d="{path}" fill="none" stroke="#1f77b4"/>{dots}</svg>'


def bar_chart(title: str, ylabel: str, bars: list[tuple[str, float]]) -> str:
    if not bars:
        return ""
    vals = [b[1] for b in bars] + [0.0]
    y0, y1, fy = _scale(vals, H - PAD, 24)
    bw = (W - PAD - 12) / len(bars)
    rects = "".join(
        f'<rect x="{PAD + i * bw + 1:.1f}" y="{min(fy(v), fy(0)):.1f}" width="{max(bw - 2, 1):.1f}" '
        f'height="{abs(fy(0) - fy(v)):.1f}" fill="#ff7f0e"><title>{escape(name)}: {v:.4g}</title></rect>'
        for i, (name, v) in enumerate(bars)
    )
    return _frame(title, "layer", ylabel, None, (y0, y1)) + rects + "</svg>"


def _frame(title: str, xlabel: str, ylabel: str, xr: tuple[float, float] | None, yr: tuple[float, float]) -> str:
    ticks = ""
    if xr:
        ticks += f'<text x="{PAD}" y="{H - PAD + 14}" font-size="10">{xr[0]:.4g}</text>'
        ticks += f'<text x="{W - RIGHT}" y="{H - PAD + 14}" font-size="10" text-anchor="end">{xr[1]:.4g}</text>'
    ticks += f'<text x="{PAD - 4}" y="{H - PAD}" font-size="10" text-anchor="end">{yr[0]:.4g}</text>'
    ticks += f'<text x="{PAD - 4}" y="30" font-size="10" text-anchor="end">{yr[1]:.4g}</text>'
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">'
        f'<title>{escape(title)}</title><rect width="{W}" height="{H}" fill="white"/>'
        f'<text x="{W / 2}" y="14" font-size="12" text-anchor="middle" font-weight="bold">{escape(title)}</text>'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 12}" y2="{H - PAD}" stroke="#444"/>'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{PAD}" y2="20" stroke="#444"/>'
        f'<text x="{W / 2}" y="{H - 10}" font-size="11" text-anchor="middle">{escape(xlabel)}</text>'
        f'<text x="12" y="{H / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {H / 2})">{escape(ylabel)}</text>'
        + ticks
    )
