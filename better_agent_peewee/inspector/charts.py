"""Charts as inline SVG, drawn here in a few lines: no chart library, nothing fetched.

Two kinds: stacked bars of runs per hour by status, and p50/p95 bars of run durations per
agent. Every label goes through `markup.tag`, so it is escaped like any other text.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .markup import Markup, duration, iso, join, tag

__all__ = ["STATUS_ORDER", "hourly", "bucket", "durations", "percentile"]

#: Statuses in the order they are stacked (bottom first), each with its CSS class.
STATUS_ORDER = ("completed", "running", "interrupted", "aborted", "failed")
HOUR = 3_600_000


def bucket(hours_by_status: Dict[str, Dict[int, int]], now_ms: int, hours: int) -> List[Dict[str, int]]:
    """Counts per status for each of the last `hours` hours (oldest first), from runs counted
    per status and hour number (an hour's start // `HOUR`; others are left out)."""
    first = now_ms // HOUR - hours + 1
    bins: List[Dict[str, int]] = [{} for _ in range(hours)]
    for status, counted in hours_by_status.items():
        for number, n in counted.items():
            if 0 <= number - first < hours and n:
                counts = bins[number - first]
                counts[status] = counts.get(status, 0) + n
    return bins


def hourly(bins: List[Dict[str, int]], now_ms: int, label: str, partial_before: Optional[int] = None,
           width: int = 720, height: int = 160) -> Markup:
    """Stacked bars, one per hour; hours before `partial_before` (ms) are drawn as sampled."""
    hours = len(bins)
    first = (now_ms // HOUR - hours + 1) * HOUR
    top = max([sum(b.values()) for b in bins] + [1])
    plot_h, bar_w = height - 24, width / hours
    shapes: List[Markup] = []
    for i, counts in enumerate(bins):
        y = float(plot_h)
        start = first + i * HOUR
        sampled = " sampled" if partial_before is not None and start < partial_before else ""
        when = iso(start) if counts else ""
        for status in STATUS_ORDER:
            n = counts.get(status, 0)
            if not n:
                continue
            h = n / top * (plot_h - 4)
            y -= h
            # Numbers and our own status names only (no stored string): written directly, for speed.
            x, w = i * bar_w + 0.5, max(bar_w - 1, 1)
            shapes.append(Markup(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                                 f'class="s-{status}{sampled}"><title>{when} UTC: {n} {status}</title>'
                                 '</rect>'))
    ticks = []
    step = 6 if hours <= 48 else 24
    for i in range(0, hours, step):
        stamp = iso(first + i * HOUR)
        text = stamp[11:16] if hours <= 48 else stamp[5:10]
        ticks.append(tag("text", {"x": f"{i * bar_w:.1f}", "y": str(height - 6), "class": "tick"}, text))
    axis = tag("line", {"x1": "0", "y1": str(plot_h), "x2": str(width), "y2": str(plot_h), "class": "axis"})
    return tag("svg", {"class": "chart", "viewBox": f"0 0 {width} {height}", "role": "img",
                       "aria-label": label, "preserveAspectRatio": "none"},
               tag("title", None, label), join(shapes), axis, join(ticks))


def percentile(values: Sequence[int], p: float) -> Optional[int]:
    """The `p`-th percentile (nearest rank) of `values`, or None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(int(-(-p * len(ordered) // 100)), 1)  # ceil(p/100 * n), at least the first
    return ordered[min(rank, len(ordered)) - 1]


def durations(rows: List[Tuple[str, Optional[int], Optional[int], int]], width: int = 720) -> Markup:
    """Horizontal bars per agent: p50 (solid) inside p95 (light); rows are (agent, p50, p95, n)."""
    shown = [r for r in rows if r[2] is not None]
    if not shown:
        return tag("p", {"class": "muted"}, "No finished runs yet.")
    line, left = 26, 160
    top = max(r[2] or 0 for r in shown) or 1
    height = line * len(shown) + 8
    shapes: List[Markup] = []
    for i, (agent, p50, p95, n) in enumerate(shown):
        y = i * line + 4
        scale = (width - left - 150) / top
        shapes.append(tag("text", {"x": str(left - 8), "y": str(y + 15), "class": "label",
                                   "text-anchor": "end"}, agent[:24]))
        shapes.append(tag("rect", {"x": str(left), "y": str(y + 3), "height": "16", "class": "p95",
                                   "width": f"{max((p95 or 0) * scale, 1):.1f}"},
                          tag("title", None, f"{agent}: p95 {duration(p95)} over {n} runs")))
        shapes.append(tag("rect", {"x": str(left), "y": str(y + 3), "height": "16", "class": "p50",
                                   "width": f"{max((p50 or 0) * scale, 1):.1f}"},
                          tag("title", None, f"{agent}: p50 {duration(p50)} over {n} runs")))
        shapes.append(tag("text", {"x": f"{left + (p95 or 0) * scale + 6:.1f}", "y": str(y + 15),
                                   "class": "tick"}, f"p50 {duration(p50)} · p95 {duration(p95)}"))
    return tag("svg", {"class": "chart bars", "viewBox": f"0 0 {width} {height}", "role": "img",
                       "aria-label": "run duration p50 and p95 per agent"},
               tag("title", None, "run duration p50 and p95 per agent"), join(shapes))
