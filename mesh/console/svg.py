"""Plots as inline SVG, drawn on the server: no chart library, no script, nothing to audit but
this module. Every label is escaped; every number is computed here from the records shown."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

# Colours people read without a legend: approved green, rejected red, no quorum amber.
OUTCOME_COLOURS = {"approved": "#2e7d32", "rejected": "#c62828", "no_quorum": "#f9a825"}
BAR_COLOUR = "#1565c0"
_W = 640


def _empty(title: str, height: int = 60) -> str:
    return (
        f'<svg class="plot" role="img" aria-label="{escape(title)}" viewBox="0 0 {_W} {height}" '
        f'width="{_W}" height="{height}"><text x="8" y="20" class="plot-title">{escape(title)}'
        '</text><text x="8" y="44" class="plot-note">nothing yet</text></svg>'
    )


def stacked_columns(
    title: str,
    columns: Sequence[tuple[str, Mapping[str, int]]],
    colours: Mapping[str, str] = OUTCOME_COLOURS,
) -> str:
    """One column per (label, counts by series), stacked in `colours`' order, with a legend.
    For decisions per minute by outcome."""
    if not columns or not any(sum(c.values()) for _, c in columns):
        return _empty(title)
    height, top, bottom, left = 200, 28, 36, 36
    plot_h = height - top - bottom
    most = max(sum(c.values()) for _, c in columns)
    step = (_W - left - 8) / len(columns)
    bar_w = max(2.0, step * 0.7)
    parts = [
        f'<svg class="plot" role="img" aria-label="{escape(title)}" viewBox="0 0 {_W} {height}" '
        f'width="{_W}" height="{height}">',
        f'<text x="8" y="16" class="plot-title">{escape(title)}</text>',
        f'<text x="4" y="{top + 10}" class="plot-note">{most}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{_W - 4}" y2="{top + plot_h}" stroke="#999"/>',
    ]
    for i, (label, counts) in enumerate(columns):
        x = left + i * step
        y = float(top + plot_h)
        for series, colour in colours.items():
            n = counts.get(series, 0)
            if not n:
                continue
            h = plot_h * n / most
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{escape(label)}: {n} {escape(series)}</title></rect>'
            )
        if len(columns) <= 12 or i % max(1, len(columns) // 8) == 0:
            parts.append(
                f'<text x="{x:.1f}" y="{height - bottom + 14}" class="plot-note">'
                f"{escape(label)}</text>"
            )
    lx = left
    for series, colour in colours.items():
        parts.append(
            f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="{height - 5}" class="plot-note">{escape(series)}</text>'
        )
        lx += 110
    parts.append("</svg>")
    return "".join(parts)


def bars(title: str, rows: Sequence[tuple[str, float, str]], *, unit: str = "") -> str:
    """Horizontal bars, one per (label, value, note). For vote latency per agent (value: the
    mean, note: count and max) and dead letters by reason (value: the count)."""
    if not rows:
        return _empty(title)
    row_h, top, label_w = 22, 26, 170
    height = top + row_h * len(rows) + 8
    most = max(v for _, v, _ in rows) or 1.0
    span = _W - label_w - 240  # room on the right for the value and its note
    parts = [
        f'<svg class="plot" role="img" aria-label="{escape(title)}" viewBox="0 0 {_W} {height}" '
        f'width="{_W}" height="{height}">',
        f'<text x="8" y="16" class="plot-title">{escape(title)}</text>',
    ]
    for i, (label, value, note) in enumerate(rows):
        y = top + i * row_h
        w = max(1.0, span * value / most)
        shown = (
            f"{value:,.0f}{unit}" if value >= 10 or value == int(value) else f"{value:.1f}{unit}"
        )
        parts.append(
            f'<text x="8" y="{y + 14}" class="plot-label">{escape(label[:26])}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{BAR_COLOUR}"><title>{escape(label)}: {escape(shown)} {escape(note)}</title>'
            f"</rect>"
            f'<text x="{label_w + w + 6:.1f}" y="{y + 14}" class="plot-note">{escape(shown)}'
            f"{' · ' + escape(note) if note else ''}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
