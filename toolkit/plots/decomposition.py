"""Figures of the decomposition (the paper's Figures 2-5 and Tables 1-2); each returns a go.Figure.

Every function takes a :class:`~toolkit.decompose.result.DecompositionResult` (or several, for
comparisons across models), never a model.

Example:
    >>> fig = rel_err_kl_scatter(decomposition, layer=3)       # decomposition = toolkit.decompose_layers(...)
    >>> fig.write_html(tmp / "scatter.html")
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from toolkit.plots.style import COLORS, LABELS, finish


def rho_bars(results: Sequence) -> go.Figure:
    """Figure 2a: Spearman rho(RelErr, KL) per model (mean over layers, whiskers: min/max layer)."""
    names = [r.settings["model_id"] for r in results]
    rho = [r.model_summary["rho_layer_mean"] for r in results]
    lo = [r.model_summary["rho_layer_mean"] - r.model_summary["rho_layer_min"] for r in results]
    hi = [r.model_summary["rho_layer_max"] - r.model_summary["rho_layer_mean"] for r in results]
    fig = go.Figure(go.Bar(x=names, y=rho, marker_color=COLORS["full"],
                           error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo)))
    return finish(fig, "Spearman rho between RelErr and KL (mean over layers; bars: layer range)", "model",
                  "Spearman rho")


def sample_rows(selected: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """At most ``max_points`` of the selected row indices, a seeded uniform sample (sorted), so that a
    capped figure shows every layer in proportion rather than the first rows (= the first layer).

    Example:
        >>> rows = sample_rows(np.ones(10, bool), 4)
        >>> len(rows), bool((np.diff(rows) > 0).all())
        (4, True)
    """
    idx = np.flatnonzero(selected)
    if len(idx) <= max_points:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=max_points, replace=False))


def rel_err_kl_scatter(result, layer: int | None = None, max_points: int = 4000, seed: int = 0) -> go.Figure:
    """Figure 2b: token-level RelErr vs KL, the token and its context on hover.

    With more anchors than ``max_points``, a seeded sample across the selected layers is shown and
    the title says how many of how many.
    """
    a = result.anchors
    sel = np.ones(len(a["layer"]), bool) if layer is None else a["layer"] == layer
    idx = sample_rows(sel, max_points, seed)
    hover = [f"layer {a['layer'][i]}, text {a['text'][i]}, pos {a['position'][i]}<br>"
             f"token <b>{html.escape(repr(str(a['token'][i])), quote=False)}</b><br>…"
             f"{html.escape(str(a['context'][i]), quote=False)}"
             for i in idx]
    fig = go.Figure(go.Scattergl(x=a["rel_err"][idx], y=np.maximum(a["kl"][idx], 1e-12), mode="markers",
                                 marker=dict(size=5, color=a["layer"][idx], colorscale="Viridis", showscale=True,
                                             colorbar=dict(title="layer")),
                                 text=hover, hovertemplate="%{text}<br>RelErr %{x:.3f}, KL %{y:.3g}<extra></extra>"))
    fig.update_yaxes(type="log")
    what = "all layers" if layer is None else f"layer {layer}"
    shown = f"{len(idx)} anchors" if len(idx) == int(sel.sum()) else \
        f"a random {len(idx)} of {int(sel.sum())} anchors (seed {seed})"
    return finish(fig, f"RelErr vs KL per token ({what}; {shown})", "RelErr = ||h_{l+1} - T(h_l)|| / ||h_{l+1}||",
                  "KL(P_orig || P_patched) (nats, log scale)")


def layerwise_rho(result) -> go.Figure:
    """Figure 2c: rho per layer with its bootstrap 95% interval."""
    s = result.layer_summary
    x = [r["layer"] for r in s]
    y = np.array([r["rho"] for r in s])
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines+markers", line_color=COLORS["full"], name="rho",
                               error_y=dict(type="data", symmetric=False,
                                            array=np.array([r["rho_ci_high"] for r in s]) - y,
                                            arrayminus=y - np.array([r["rho_ci_low"] for r in s]))))
    return finish(fig, f"Spearman rho(RelErr, KL) per layer, 95% bootstrap CI ({result.settings['model_id']})",
                  "layer l (block h_l -> h_{l+1})", "Spearman rho")


def layerwise_rel_err(result) -> go.Figure:
    """Figure 2d: mean RelErr per layer (and the MLP's, when compared)."""
    s = result.layer_summary
    x = [r["layer"] for r in s]
    fig = go.Figure(go.Scatter(x=x, y=[r["rel_err_mean"] for r in s], mode="lines+markers",
                               line_color=COLORS["tokenwise"], name=result.settings["function_class"]))
    if "rel_err_mlp_mean" in s[0]:
        fig.add_trace(go.Scatter(x=x, y=[r["rel_err_mlp_mean"] for r in s], mode="lines+markers",
                                 line_color=COLORS["mlp"], name="mlp"))
    return finish(fig, "Mean RelErr per layer", "layer l", "mean RelErr")


def kl_vs_random_control(result) -> go.Figure:
    """Control: KL of the tokenwise replacement vs an equal-norm random perturbation, per layer."""
    s = result.layer_summary
    x = [r["layer"] for r in s]
    fig = go.Figure([go.Scatter(x=x, y=[r["kl_mean"] for r in s], mode="lines+markers", name="residual removed",
                                line_color=COLORS["residual"]),
                     go.Scatter(x=x, y=[r["kl_random_mean"] for r in s], mode="lines+markers",
                                name="random direction, same norm", line_color=COLORS["random"])])
    fig.update_yaxes(type="log")
    return finish(fig, "Is the residual functionally special? Mean KL per layer", "layer l",
                  "mean KL (nats, log scale)")


def alignment_summary(result) -> go.Figure:
    """Figure 3a: mean |cos| of (full, tokenwise) and (residual, tokenwise) per layer."""
    s = result.layer_summary
    x = [r["layer"] for r in s]
    fig = go.Figure([go.Scatter(x=x, y=[r["abs_cos_full_tok"] for r in s], mode="lines+markers",
                                name="|cos(full, tokenwise)|", line_color=COLORS["full"]),
                     go.Scatter(x=x, y=[r["abs_cos_res_tok"] for r in s], mode="lines+markers",
                                name="|cos(residual, tokenwise)|", line_color=COLORS["residual"])])
    return finish(fig, "Alignment with the tokenwise update", "layer l", "mean |cos|")


def angle_distributions(result, layer: int | None = None) -> go.Figure:
    """Figure 3b: distributions of the angles (degrees) to the tokenwise update."""
    a = result.anchors
    sel = np.ones(len(a["layer"]), bool) if layer is None else a["layer"] == layer
    fig = go.Figure([go.Histogram(x=a["angle_full_tok"][sel], name="full vs tokenwise", opacity=0.6,
                                  marker_color=COLORS["full"], nbinsx=60),
                     go.Histogram(x=a["angle_res_tok"][sel], name="residual vs tokenwise", opacity=0.6,
                                  marker_color=COLORS["residual"], nbinsx=60)])
    fig.update_layout(barmode="overlay")
    return finish(fig, "Angles to the tokenwise update", "angle (degrees)", "anchors")


def projection_fractions(result) -> go.Figure:
    """Figure 4: energy fraction in the top-1/4/8 left singular vectors, with the random k/d line."""
    s = result.layer_summary
    fig = go.Figure()
    for kind in ("full", "tokenwise", "residual"):
        fig.add_trace(go.Bar(x=[f"top-{k}" for k in (1, 4, 8)],
                             y=[np.mean([r[f"proj_{kind}_{k}"] for r in s]) for k in (1, 4, 8)],
                             name=LABELS[kind], marker_color=COLORS[kind]))
    fig.add_trace(go.Scatter(x=[f"top-{k}" for k in (1, 4, 8)], y=[s[0][f"proj_random_{k}"] for k in (1, 4, 8)],
                             mode="markers+lines", name="random vector (k/d)", line=dict(color=COLORS["random"],
                                                                                        dash="dash")))
    fig.update_layout(barmode="group")
    return finish(fig, "Energy in the local map's top singular directions (mean over anchors and layers)",
                  "subspace", "fraction of squared norm")


def sweep(result, parameter: str) -> go.Figure:
    """Figure 5: RelErr and rho as functions of ``k`` or ``rank`` at one layer."""
    rows = result.sweeps.get(parameter)
    if not rows:
        raise ValueError(f"this result has no {parameter!r} sweep; run decompose(..., sweep_{parameter}=[...]).")
    x = [r[parameter] for r in rows]
    fig = go.Figure([go.Scatter(x=x, y=[r["rel_err_mean"] for r in rows], name="mean RelErr", mode="lines+markers",
                                line_color=COLORS["tokenwise"]),
                     go.Scatter(x=x, y=[r["rho"] for r in rows], name="Spearman rho", mode="lines+markers",
                                yaxis="y2", line_color=COLORS["full"])])
    fig.update_layout(yaxis2=dict(overlaying="y", side="right", title="Spearman rho"))
    return finish(fig, f"Sweep over {parameter} (layer {rows[0]['layer']})", parameter, "mean RelErr")


def summary_table(result) -> list[dict]:
    """Table 1 layout: per-layer rho with interval, RelErr, KL, control KL."""
    keys = ("layer", "n", "rho", "rho_ci_low", "rho_ci_high", "p_value", "rel_err_mean", "kl_mean", "kl_random_mean")
    return [{k: r[k] for k in keys} for r in result.layer_summary]
