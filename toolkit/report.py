"""One self-contained HTML report from figures and tables.

Plotly's JavaScript is inlined once at the top, so the file opens from disk with no network.
All text that reaches the page (titles, token strings, table cells) is HTML-escaped.

Example:
    >>> import plotly.graph_objects as go
    >>> html = render_report("Demo", [Section("A figure", figure=go.Figure(go.Bar(y=[1, 2])))])
    >>> html.count("<script") >= 2
    True
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from toolkit.atomic import atomic_write_text

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}p.note{color:#555}"""


@dataclass
class Section:
    heading: str
    text: str = ""
    figure: go.Figure | None = None
    table: Sequence[dict] | None = field(default=None)


def table_html(rows: Sequence[dict]) -> str:
    """An HTML table from a list of dicts with the same keys (values escaped)."""
    if not rows:
        return "<p class='note'>(empty)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_report(title: str, sections: Sequence[Section]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.heading)}</h2>")
        if s.text:
            parts.append(f"<p class='note'>{html.escape(s.text)}</p>")
        if s.figure is not None:
            parts.append(s.figure.to_html(full_html=False, include_plotlyjs=False))
        if s.table is not None:
            parts.append(table_html(s.table))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """Write the report atomically (a reader never sees half a file)."""
    return atomic_write_text(path, render_report(title, sections))
