"""Line charts as hand-written SVG (no plotting dependency): categorical x, one line per series."""

from __future__ import annotations

from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 360, 240, 56, 16, 28, 40


def panel(title: str, xs: list[str], series: dict[str, list[float | None]], y_label: str, x0: int = 0) -> str:
    """One chart at horizontal offset `x0`; `series`: name -> one value (or None) per x."""
    values = [v for vs in series.values() for v in vs if v is not None]
    top = max(values) * 1.1 if values else 1.0
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def px(i: int) -> float:
        return x0 + PAD_L + (pw * (i + 0.5) / len(xs))

    def py(v: float) -> float:
        return PAD_T + ph * (1 - v / top)

    out = [f'<text x="{x0 + W / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<line x1="{x0 + PAD_L}" y1="{PAD_T + ph}" x2="{x0 + PAD_L + pw}" y2="{PAD_T + ph}" stroke="#333"/>',
           f'<line x1="{x0 + PAD_L}" y1="{PAD_T}" x2="{x0 + PAD_L}" y2="{PAD_T + ph}" stroke="#333"/>',
           f'<text x="{x0 + 12}" y="{PAD_T + ph / 2}" font-size="11" transform="rotate(-90 {x0 + 12} '
           f'{PAD_T + ph / 2})" text-anchor="middle">{escape(y_label)}</text>']
    for k in range(5):
        v = top * k / 4
        out.append(f'<text x="{x0 + PAD_L - 4}" y="{py(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.3g}</text>')
    for i, x in enumerate(xs):
        out.append(f'<text x="{px(i):.1f}" y="{PAD_T + ph + 16}" font-size="10" text-anchor="middle">{escape(x)}</text>')
    for j, (name, vs) in enumerate(series.items()):
        color = COLORS[j % len(COLORS)]
        pts = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(vs) if v is not None)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{x0 + PAD_L + 8}" y="{PAD_T + 12 + 13 * j}" font-size="11" fill="{color}">'
                   f'{escape(name)}</text>')
    return "\n".join(out)


def figure(panels: list[str], caption: str = "") -> str:
    width = W * len(panels)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{H + 18}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(panels)
            + f'\n<text x="6" y="{H + 12}" font-size="10" fill="#555">{escape(caption)}</text>\n</svg>\n')
