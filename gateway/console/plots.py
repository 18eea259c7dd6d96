"""Small SVG line charts drawn on the server: no script, no library, readable without JavaScript.

Agreement over time, the student's share over canary steps and loss curves are a few dozen
points each; a polyline per series, two axes and a threshold line say what a person needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 560, 210
LEFT, RIGHT, TOP, BOTTOM = 46, 12, 26, 34


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    css: str = "s1"
    """The stylesheet's class for its colour (``s1`` … ``s4``)."""
    step: bool = False
    """Hold each value until the next point (a share that changes in steps)."""


@dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]
    y_range: tuple[float, float] | None = None
    """Fixed bounds (rates: 0 to 1); else the data's own, padded."""
    marks: Sequence[tuple[float, str]] = field(default_factory=tuple)
    """Horizontal lines (a threshold), each with its label."""


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.2f}"


def _bounds(values: list[float], fixed: tuple[float, float] | None, pad: float = 0.08) -> tuple[float, float]:
    if fixed is not None:
        return fixed
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def render(chart: Chart) -> str:
    """The chart as an ``<svg>`` element (its text escaped), or a labelled empty frame."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(chart.title)}">',
        f'<text class="title" x="{LEFT}" y="16">{escape(chart.title)}</text>',
        f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>',
    ]
    points = [p for s in chart.series for p in s.points]
    if not points:
        out.append(f'<text class="empty" x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}">no data yet</text>')
        return "".join(out) + "</svg>"
    x0, x1 = _bounds([p[0] for p in points], None, pad=0.0)
    y0, y1 = _bounds([p[1] for p in points] + [m[0] for m in chart.marks], chart.y_range)

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return TOP + plot_h - (min(max(y, y0), y1) - y0) / (y1 - y0) * plot_h

    for i in range(5):  # y ticks
        v = y0 + (y1 - y0) * i / 4
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(v):.1f}" y2="{sy(v):.1f}"/>')
        out.append(
            f'<text class="tick" x="{LEFT - 4}" y="{sy(v) + 3:.1f}" text-anchor="end">{_fmt(v)}</text>'
        )
    for v in (x0, (x0 + x1) / 2, x1):
        v = round(v) if x1 - x0 >= 10 else v  # pair numbers, steps, seconds: whole ticks read better
        out.append(
            f'<text class="tick" x="{sx(v):.1f}" y="{TOP + plot_h + 13}" text-anchor="middle">{_fmt(v)}</text>'
        )
    for value, label in chart.marks:
        y = sy(value)
        out.append(f'<line class="mark" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(
            f'<text class="mark-label" x="{LEFT + plot_w - 2}" y="{y - 3:.1f}" text-anchor="end">{escape(label)}</text>'
        )
    for s in chart.series:
        coords: list[tuple[float, float]] = []
        for k, (x, y) in enumerate(s.points):
            if s.step and k:
                coords.append((sx(x), coords[-1][1]))
            coords.append((sx(x), sy(y)))
        text = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        out.append(
            f'<polyline class="line {s.css}" points="{text}"><title>{escape(s.name)}</title></polyline>'
        )
        if len(s.points) == 1:
            out.append(f'<circle class="dot {s.css}" cx="{coords[0][0]:.1f}" cy="{coords[0][1]:.1f}" r="3"/>')
    legend_x = LEFT + 8
    for s in chart.series:
        out.append(f'<text class="legend {s.css}" x="{legend_x}" y="{TOP + 14}">■ {escape(s.name)}</text>')
        legend_x += 12 + 7 * len(s.name)
    out.append(
        f'<text class="axis" x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle">{escape(chart.x_label)}</text>'
        f'<text class="axis" x="10" y="{TOP + plot_h / 2}" transform="rotate(-90 10 {TOP + plot_h / 2})" '
        f'text-anchor="middle">{escape(chart.y_label)}</text></svg>'
    )
    return "".join(out)
