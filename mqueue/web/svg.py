"""Inline SVG charts: a sparkline of counts per minute and a histogram over ``history.BUCKETS``.

Drawn as elements of the page itself (no image requests, no script), with
a ``<title>`` on each bar so a pointer shows its value.  Presentation
attributes only (no ``style=``): the dashboard's Content-Security-Policy
forbids inline styles.
"""

from __future__ import annotations

from html import escape
from typing import Sequence


def sparkline(counts: Sequence[int], label: str, width: int = 120, height: int = 24) -> str:
    """A polyline of ``counts`` (oldest first), scaled to the largest; ``label`` is its accessible name."""
    if not counts:
        return ""
    top = max(max(counts), 1)
    step = width / max(len(counts) - 1, 1)
    points = " ".join(f"{i * step:.1f},{height - 1 - (height - 2) * n / top:.1f}" for i, n in enumerate(counts))
    return (f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(label)}"><title>{escape(label)}</title>'
            f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/></svg>')


#: Fewest bars a histogram draws.
MIN_BARS = 20


def histogram(counts: Sequence[int], labels: Sequence[str], title: str, height: int = 120) -> str:
    """Bars for the buckets from the first to the last non-empty one, each with its label and count.

    Every few bars get their label under the axis; all have it in their ``<title>``.
    """
    filled = [i for i, n in enumerate(counts) if n]
    if not filled:
        return f'<p class="empty">{escape(title)}: no jobs</p>'
    # At least ``MIN_BARS`` buckets, so one busy bucket still reads as a place on a scale.
    first = filled[0]
    last = min(max(filled[-1], first + MIN_BARS - 1), len(counts) - 1)
    first = max(0, min(first, last - MIN_BARS + 1))
    shown = list(range(first, last + 1))
    bar, gap, axis = 12, 2, 16
    width = len(shown) * (bar + gap)
    top = max(counts[i] for i in shown)
    parts = [f'<svg class="histogram" viewBox="0 0 {width} {height + axis}" width="{width}" '
             f'height="{height + axis}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>']
    every = max(1, len(shown) // 12)
    for x, index in enumerate(shown):
        n = counts[index]
        h = round(height * n / top) if n else 0
        left = x * (bar + gap)
        parts.append(f'<rect x="{left}" y="{height - h}" width="{bar}" height="{max(h, 0)}">'
                     f'<title>{escape(labels[index])}: {n}</title></rect>')
        if x % every == 0:
            parts.append(f'<text x="{left}" y="{height + axis - 3}" font-size="9">{escape(labels[index])}</text>')
    parts.append(f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="currentColor"/></svg>')
    return "".join(parts)
