"""Shared figure style: one colour per vector kind, the same in every figure."""
from __future__ import annotations

import plotly.graph_objects as go

COLORS = {
    "full": "#1f77b4",       # the full update h_{l+1} - h_l
    "tokenwise": "#2ca02c",  # the tokenwise update T(h_l) - h_l
    "residual": "#d62728",   # the residual h_{l+1} - T(h_l)
    "random": "#7f7f7f",     # random baselines and controls
    "mlp": "#9467bd",
}
LABELS = {"full": "full update", "tokenwise": "tokenwise update", "residual": "residual", "random": "random"}


def finish(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    """Title, axis labels and a plain template, in one place."""
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig
