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
    """Points joined in order (stage by stage), each labelled; the axes show the data's own range."""
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    _, _, fx = _scale(xs, PAD, W - RIGHT)
    _, _, fy = _scale(ys, H - PAD, 24)
    path = " ".join(f"{'M' if i == 0 else 'L'}{fx(x):.1f},{fy(y):.1f}" for i, (x, y, _) in enumerate(points))
    dots = "".join(
        f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="4" fill="#1f77b4"><title>{escape(lbl)}: {x:.4g}, {y:.4g}</title></circle>'
        f'<text x="{fx(x) + 6:.1f}" y="{fy(y) - 6:.1f}" font-size="10">{escape(lbl)}</text>'
        for x, y, lbl in points
    )
    return _frame(title, xlabel, ylabel, (min(xs), max(xs), fx), (min(ys), max(ys), fy)) + \
        f'<path d="{path}" fill="none" stroke="#1f77b4"/>{dots}</svg>'


def bar_chart(title: str, ylabel: str, bars: list[tuple[str, float]]) -> str:
    """One labelled bar per layer (the layer's name under it, its value on top)."""
    if not bars:
        return ""
    vals = [b[1] for b in bars] + [0.0]
    _, _, fy = _scale(vals, H - PAD, 24)
    bw = (W - PAD - 12) / len(bars)
    rects = "".join(
        f'<rect x="{PAD + i * bw + 1:.1f}" y="{min(fy(v), fy(0)):.1f}" width="{max(bw - 2, 1):.1f}" '
        f'height="{abs(fy(0) - fy(v)):.1f}" fill="#ff7f0e"><title>{escape(name)}: {v:.4g}</title></rect>'
        f'<text x="{PAD + (i + 0.5) * bw:.1f}" y="{min(fy(v), fy(0)) - 2:.1f}" font-size="8" '
        f'text-anchor="middle">{v:.3g}</text>'
        f'<text x="{PAD + (i + 0.5) * bw:.1f}" y="{H - PAD + 10}" font-size="8" text-anchor="end" '
        f'transform="rotate(-35 {PAD + (i + 0.5) * bw:.1f} {H - PAD + 10})">{escape(_short(name))}</text>'
        for i, (name, v) in enumerate(bars)
    )
    return _frame(title, "", ylabel, None, (min(vals), max(vals), fy)) + rects + "</svg>"


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else "..." + name[-(n - 3):]


def _frame(title: str, xlabel: str, ylabel: str, xr: tuple | None, yr: tuple) -> str:
    """Axes with ticks at the data's smallest and largest values (``(lo, hi, to_pixels)``)."""
    ticks = ""
    if xr:
        for v in sorted({xr[0], xr[1]}):
            ticks += f'<text x="{xr[2](v):.1f}" y="{H - PAD + 14}" font-size="10" text-anchor="middle">{v:.4g}</text>'
    for v in sorted({yr[0], yr[1]}):
        ticks += (f'<line x1="{PAD - 3}" y1="{yr[2](v):.1f}" x2="{PAD}" y2="{yr[2](v):.1f}" stroke="#444"/>'
                  f'<text x="{PAD - 5}" y="{yr[2](v) + 3:.1f}" font-size="10" text-anchor="end">{v:.4g}</text>')
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">'
        f'<title>{escape(title)}</title><rect width="{W}" height="{H}" fill="white"/>'
        f'<text x="{W / 2}" y="14" font-size="12" text-anchor="middle" font-weight="bold">{escape(title)}</text>'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 12}" y2="{H - PAD}" stroke="#444"/>'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{PAD}" y2="20" stroke="#444"/>'
        f'<text x="{W / 2}" y="{H - 4}" font-size="11" text-anchor="middle">{escape(xlabel)}</text>'
        f'<text x="12" y="{H / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {H / 2})">{escape(ylabel)}</text>'
        + ticks
    )
