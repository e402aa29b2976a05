"""Figures of the decomposition's null models and size controls; each returns a go.Figure.

Both take a :class:`~toolkit.decompose.result.DecompositionResult` made with the controls on.

Example:
    >>> fig = baselines_by_layer(decomposition)          # decomposition = toolkit.decompose_layers(...)
    >>> len(fig.data) > 0
    True
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from toolkit.plots.style import COLORS, finish

# layer_summary key -> (legend name, colour, dash)
_BASELINES = {"rel_err_mean": ("fitted local map", COLORS["tokenwise"], "solid"),
              "rel_err_identity_mean": ("identity T(h) = h (no update)", COLORS["random"], "dot"),
              "rel_err_mean_update_mean": ("constant mean update", COLORS["random"], "dash"),
              "rel_err_global_mean": ("global ridge map", COLORS["mlp"], "solid"),
              "rel_err_random_nb_mean": ("random neighbourhoods", COLORS["residual"], "dash")}


def _check(result) -> list[dict]:
    s = result.layer_summary
    if not s or "rel_err_identity_mean" not in s[0]:
        raise ValueError("this result has no controls; run decompose(..., controls=True) (the default).")
    return s


def baselines_by_layer(result) -> go.Figure:
    """Mean RelErr per layer of the fitted map beside its null models."""
    s = _check(result)
    x = [r["layer"] for r in s]
    fig = go.Figure([go.Scatter(x=x, y=[r.get(key, np.nan) for r in s], mode="lines+markers", name=name,
                                line=dict(color=color, dash=dash))
                     for key, (name, color, dash) in _BASELINES.items() if key in s[0]])
    return finish(fig, "Does the fitted map beat its null models? Mean RelErr per layer", "layer l",
                  "mean RelErr = ||h_{l+1} - T(h_l)|| / ||h_{l+1}||")


def partial_rho_by_layer(result) -> go.Figure:
    """Spearman rho(RelErr, KL) per layer beside the partial rho given the update's size (95% intervals)."""
    s = _check(result)
    x = [r["layer"] for r in s]
    traces = []
    for key, name, color in (("rho", "rho(RelErr, KL)", COLORS["full"]),
                             ("partial_rho", "partial rho given ||Δ||/||h_{l+1}|| and identity KL",
                              COLORS["residual"])):
        y = np.array([r[key] for r in s])
        traces.append(go.Scatter(x=x, y=y, mode="lines+markers", name=name, line_color=color,
                                 error_y=dict(type="data", symmetric=False,
                                              array=np.array([r[f"{key}_ci_high"] for r in s]) - y,
                                              arrayminus=y - np.array([r[f"{key}_ci_low"] for r in s]))))
    return finish(go.Figure(traces), "Is RelErr's association with KL more than the update's size?", "layer l",
                  "Spearman rho")
