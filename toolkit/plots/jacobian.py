"""Figures of the detached Jacobian; each takes results (never a model) and returns a go.Figure.

* :func:`reconstruction_scatter` — ``y`` against ``sum_i J_i x_i + c``, detached and ordinary;
* :func:`singular_spectra` — singular values of each ``J_i``, one line per input token (log y);
* :func:`decoded_tokens_table` — the decoded singular vectors as a table, with a hoverable grid;
* :func:`layerwise_figure` — Figure 6 of the paper: per-layer spectra, dimensionality curves
  (stable rank, energy rank) and overlap with the last layer's top singular subspace, for the
  residual stream, attention and MLP outputs;
* :func:`steering_comparison` — steered vs unsteered continuations over λ × layer (table and
  heatmap of the concept's log-probability gain, continuations in the cells and hover).

Example:
    >>> import torch
    >>> from toolkit.jacobian.analysis import analyze_jacobian
    >>> from toolkit.jacobian.result import DetachedJacobian
    >>> r = DetachedJacobian.random(T=2, d_out=4)
    >>> analysis = analyze_jacobian(r, torch.randn(4, 10), torch.randn(10, 4), str, top_k=3, n_vectors=2)
    >>> fig = decoded_tokens_table(analysis)
    >>> fig.write_html(tmp / "decoded.html")
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toolkit.plots.style import finish

JACOBIAN_COLORS = {"detached": "#1f77b4", "ordinary": "#ff7f0e", "identity": "#7f7f7f"}


def _text(s) -> str:
    """A string as Plotly text: ``<``, ``>``, ``&`` escaped so Plotly shows token strings literally
    (it would read ``<b>``, ``<br>`` as markup); quotes left alone (table cells show ``&quot;`` raw)."""
    return html.escape(str(s), quote=False)


def _tok(s: str) -> str:
    return _text(repr(str(s)))


def reconstruction_scatter(detached, ordinary=None, max_points: int = 5000) -> go.Figure:
    """``y`` (x axis) vs ``sum_i J_i x_i + c`` (y axis) per output dimension; detached and ordinary in two colours.

    Points on the diagonal are reconstructed exactly; the legend carries each relative error.

    Example:
        >>> import torch
        >>> from toolkit.jacobian.result import DetachedJacobian
        >>> r = DetachedJacobian(torch.eye(2)[None], torch.ones(2), torch.ones(1, 2), torch.zeros(2), torch.tensor([1]))
        >>> len(reconstruction_scatter(r).data)
        2
    """
    fig = go.Figure()
    lo, hi = np.inf, -np.inf
    for name, r in (("detached", detached), ("ordinary", ordinary)):
        if r is None:
            continue
        y = r.y.double().cpu().numpy()[:max_points]
        rec = r.reconstruction().cpu().numpy()[:max_points]
        lo, hi = min(lo, y.min(), rec.min()), max(hi, y.max(), rec.max())
        fig.add_trace(go.Scattergl(x=y, y=rec, mode="markers", name=f"{name} (rel. err {r.reconstruction_error:.1e})",
                                   marker=dict(size=4, color=JACOBIAN_COLORS[name], opacity=0.7),
                                   customdata=np.arange(len(y)),
                                   hovertemplate="dim %{customdata}<br>y %{x:.4g}<br>sum J x + c %{y:.4g}"
                                                 "<extra>" + name + "</extra>"))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = reconstruction",
                             line=dict(color=JACOBIAN_COLORS["identity"], dash="dash", width=1)))
    target = detached.settings.get("target", "output")
    return finish(fig, f"Reconstruction of y (target {target!r}) from the Jacobian", "y (model output)",
                  "sum_i J_i x_i + c")


def singular_spectra(analysis, max_rank: int | None = None) -> go.Figure:
    """Singular values of ``J_i`` for every input position ``i``, one line per input token, log y axis.

    Example:
        >>> import torch
        >>> from toolkit.jacobian.analysis import analyze_jacobian
        >>> from toolkit.jacobian.result import DetachedJacobian
        >>> r = DetachedJacobian.random(T=2, d_out=4)
        >>> analysis = analyze_jacobian(r, torch.randn(4, 10), torch.randn(10, 4), str, top_k=3, n_vectors=2)
        >>> fig = singular_spectra(analysis)
        >>> fig.layout.yaxis.type
        'log'
    """
    S = analysis.singular_values.cpu().numpy()
    k = S.shape[1] if max_rank is None else min(max_rank, S.shape[1])
    fig = go.Figure()
    for i, tok in enumerate(analysis.str_tokens):
        s = np.maximum(S[i, :k], 1e-12)
        fig.add_trace(go.Scatter(x=np.arange(1, k + 1), y=s, mode="lines", name=f"{i}: {_tok(tok)}",
                                 hovertemplate=f"pos {i} {_tok(tok)}<br>stable rank "
                                               f"{float(analysis.stable_rank[i]):.2f}<br>"
                                               "sigma_%{x} = %{y:.3g}<extra></extra>"))
    fig.update_yaxes(type="log")
    return finish(fig, "Singular values of J_i per input token", "index (descending)", "singular value (log)")


def _cell(entry: dict, n: int = 5) -> str:
    return ", ".join(repr(t) for t in entry["tokens"][:n])


def _hover(entry: dict, kind: str) -> str:
    rows = "<br>".join(f"{_tok(t)} {s:.3g}" for t, s in zip(entry["tokens"], entry["scores"]))
    return f"{kind} {entry['index'] + 1}, sigma {entry['value']:.3g}<br>{rows}"


def decoded_tokens_table(analysis, sides: Sequence[str] = ("left", "right")) -> go.Figure:
    """Decoded singular vectors: a ``go.Table`` (top tokens per position and vector) above a
    grid (positions x singular vectors, colour = singular value) whose hover lists every token
    with its score (logit for left vectors, cosine for right ones).

    Example:
        >>> import torch
        >>> from toolkit.jacobian.analysis import analyze_jacobian
        >>> from toolkit.jacobian.result import DetachedJacobian
        >>> r = DetachedJacobian.random(T=2, d_out=4)
        >>> analysis = analyze_jacobian(r, torch.randn(4, 10), torch.randn(10, 4), str, top_k=3, n_vectors=2)
        >>> fig = decoded_tokens_table(analysis)
        >>> fig.data[0].type
        'table'
    """
    T = len(analysis.str_tokens)
    n = analysis.U.shape[-1]
    header = ["pos", "token", "stable rank"]
    columns: list[list] = [list(range(T)), [repr(t) for t in analysis.str_tokens],
                           [f"{float(s):.2f}" for s in analysis.stable_rank]]
    for side in sides:
        entries = getattr(analysis, side)
        for k in range(n):
            header.append(f"{side} {k + 1}")
            columns.append([f"σ={entries[i][k]['value']:.3g}: {_cell(entries[i][k])}" for i in range(T)])
    fig = make_subplots(rows=2, cols=1, row_heights=[0.55, 0.45], vertical_spacing=0.08,
                        specs=[[{"type": "table"}], [{"type": "xy"}]])
    fig.add_trace(go.Table(header=dict(values=[_text(h) for h in header], align="left"),
                           cells=dict(values=[[_text(v) for v in col] for col in columns],
                                      align="left", font=dict(size=11))), row=1, col=1)
    x_labels = [f"{side} {k + 1}" for side in sides for k in range(n)]
    z = np.array([[getattr(analysis, side)[i][k]["value"] for side in sides for k in range(n)] for i in range(T)])
    text = [[_text(getattr(analysis, side)[i][k]["tokens"][0]) for side in sides for k in range(n)]
            for i in range(T)]
    hover = [[_hover(getattr(analysis, side)[i][k], side) for side in sides for k in range(n)] for i in range(T)]
    y_labels = [f"{i}: {_tok(t)}" for i, t in enumerate(analysis.str_tokens)]
    fig.add_trace(go.Heatmap(z=np.log10(np.maximum(z, 1e-12)), x=x_labels, y=y_labels, text=text,
                             texttemplate="%{text}", customdata=hover, colorscale="Blues",
                             colorbar=dict(title="log10 σ", y=0.22, len=0.45),
                             hovertemplate="%{y}<br>%{customdata}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_layout(height=300 + 60 * T, title="Singular vectors decoded to tokens (left: W_U logits; "
                      "right: W_E cosine)", template="plotly_white")
    return fig


KIND_COLORS = {"resid": "#1f77b4", "attn": "#ff7f0e", "mlp": "#9467bd", "output": "#2ca02c"}
KIND_LABELS = {"resid": "residual stream h_l", "attn": "attention output", "mlp": "MLP output",
               "output": "final-norm output"}


def layerwise_figure(spectra, max_rank: int | None = 64) -> go.Figure:
    """Four panels from a :class:`~toolkit.jacobian.layerwise.LayerwiseSpectra`: singular spectra per
    layer (residual stream, colour = depth, log y), stable rank, energy rank, and the overlap of each
    layer's top-k left singular subspace with the reference's (the last layer), one line per kind.

    Example:
        >>> import torch
        >>> from toolkit.jacobian.layerwise import layerwise_spectra
        >>> from toolkit.jacobian.result import DetachedJacobian
        >>> rs = {n: DetachedJacobian.random(T=2, d_out=4, settings={"n_layers": 2}) for n in (1, 2, "mlp.0", "output")}
        >>> fig = layerwise_figure(layerwise_spectra(rs, k=2))
        >>> len(fig.layout.annotations)
        4
    """
    energy = spectra.settings.get("energy", 0.9)
    k = spectra.settings.get("k", 8)
    ref = spectra.settings.get("reference", "output")
    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.1, vertical_spacing=0.16, subplot_titles=(
        "Singular values per layer (residual stream)", "Stable rank ||J||_F^2 / ||J||_2^2",
        f"Singular values for {energy:.0%} of the energy", f"Overlap of top-{k} left singular subspace with {ref!r}"))
    block = spectra.settings.get("block", "all")
    what = "[J_1 ... J_T]" if block == "all" else f"J_{block}"
    finish(fig, f"Layerwise detached Jacobians ({what}, position {spectra.settings.get('position')})", "", "")
    S = spectra.singular_values.cpu().numpy()
    r = S.shape[1] if max_rank is None else min(max_rank, S.shape[1])
    resid = [i for i, kind in enumerate(spectra.kinds) if kind in ("resid", "output")]
    n = max(len(resid) - 1, 1)
    for j, i in enumerate(resid):
        name = spectra.names[i]
        fig.add_trace(go.Scatter(x=np.arange(1, r + 1), y=np.maximum(S[i, :r], 1e-12), mode="lines",
                                 name=f"{name}", legendgroup="spectra", showlegend=False,
                                 line=dict(color=f"rgba(31, 119, 180, {0.2 + 0.8 * j / n:.2f})"),
                                 hovertemplate=f"{name!r}<br>sigma_%{{x}} = %{{y:.3g}}<extra></extra>"), row=1, col=1)
    fig.update_yaxes(type="log", title_text="singular value", row=1, col=1)
    fig.update_xaxes(title_text="index", row=1, col=1)
    panels = {(1, 2): "stable_rank", (2, 1): "energy_rank", (2, 2): "overlap_left"}
    for kind in ("resid", "attn", "mlp", "output"):
        if kind not in spectra.kinds:
            continue
        for (row, col), quantity in panels.items():
            layers, values = spectra.curve(kind, quantity)
            fig.add_trace(go.Scatter(x=layers, y=values, mode="lines+markers" if len(layers) > 1 else "markers",
                                     name=KIND_LABELS[kind], legendgroup=kind, showlegend=(row, col) == (1, 2),
                                     marker=dict(color=KIND_COLORS[kind], size=6 if kind == "output" else 4),
                                     line=dict(color=KIND_COLORS[kind]),
                                     hovertemplate=f"{kind} %{{x}}<br>{quantity} %{{y:.3g}}<extra></extra>"),
                          row=row, col=col)
    for (row, col), quantity in panels.items():
        fig.update_xaxes(title_text="layer (boundary; block for attn/MLP)", row=row, col=col)
    fig.update_yaxes(range=[0, 1.02], row=2, col=2)
    fig.update_layout(height=800)
    return fig


def _plain(text: str, max_chars: int | None = None) -> str:
    """Continuation text for a Plotly cell: newlines shown as ``⏎``, cut to ``max_chars``, ``<>&`` escaped."""
    text = str(text).replace("\r", "").replace("\n", "⏎")
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars - 1] + "…"
    return html.escape(text, quote=False)


def steering_comparison(result, max_chars: int = 36) -> go.Figure:
    """Steered vs unsteered continuations of a :class:`~toolkit.jacobian.steering_result.SteeringResult`.

    Top: a table, the unsteered baseline first, one row per ``(layer, λ)`` with the rise of
    ``log sum p(concept tokens)`` at the first generated step over the baseline, the tracked
    tokens generated, the edit size relative to ``|h_l|`` and the continuation. Bottom: a
    heatmap over λ (x) × layer (y), colour = that log-probability rise, each cell showing its
    continuation; the hover lists the tokens one by one (escaped) next to the baseline's.

    Example:
        >>> from toolkit.jacobian.steering_result import SteeringResult, SteeringRun
        >>> base = SteeringRun(None, 0.0, [1], " a<b>", [" a<b>"], [[-2.0]], [-0.1])
        >>> runs = [SteeringRun(l, lam, [2], " Gate", [" Gate"], [[-1.0]], [-0.2], hits=1)
        ...         for l in (10, 20) for lam in (0.5, 1.0)]
        >>> fig = steering_comparison(SteeringResult("c", "p", [1], [2], [2], [" Gate"], base, runs))
        >>> [t.type for t in fig.data], fig.data[1].z.shape
        (['table', 'heatmap'], (2, 2))
    """
    runs = [result.baseline, *result.runs]
    header = ["layer", "λ", "Δ log p(concept), step 0", "concept hits", "edit / |h_l|", "continuation"]
    cells = [["—" if r.layer is None else str(r.layer) for r in runs], [f"{r.lam:g}" for r in runs],
             [f"{result.delta_concept_logprob(r):+.3f}" for r in runs], [str(r.hits) for r in runs],
             [f"{r.edit_ratio:.3f}" for r in runs], [_plain(r.text) for r in runs]]
    layers, lams = result.layers, result.lams
    z = np.full((len(layers), len(lams)), np.nan)
    text = [["" for _ in lams] for _ in layers]
    hover = [["" for _ in lams] for _ in layers]
    base_tokens = " | ".join(_plain(t) for t in result.baseline.str_tokens)
    for r in result.runs:
        i, j = layers.index(r.layer), lams.index(r.lam)
        z[i, j] = result.delta_concept_logprob(r)
        text[i][j] = _plain(r.text, max_chars)
        hover[i][j] = (f"layer {r.layer}, λ {r.lam:g}<br>Δ log p(concept) {z[i, j]:+.3f}, hits {r.hits}, "
                       f"edit/|h| {r.edit_ratio:.3f}<br>steered: {' | '.join(_plain(t) for t in r.str_tokens)}"
                       f"<br>unsteered: {base_tokens}")
    fig = make_subplots(rows=2, cols=1, row_heights=[0.5, 0.5], vertical_spacing=0.1,
                        specs=[[{"type": "table"}], [{"type": "xy"}]])
    fig.add_trace(go.Table(header=dict(values=[_plain(h) for h in header], align="left"),
                           columnwidth=[1, 1, 2, 1.3, 1.3, 8],
                           cells=dict(values=cells, align="left", font=dict(size=11))), row=1, col=1)
    fig.add_trace(go.Heatmap(z=z, x=[f"λ={lam:g}" for lam in lams], y=[f"layer {l}" for l in layers], text=text,
                             texttemplate="%{text}", textfont=dict(size=10), customdata=hover,
                             colorscale="RdBu", zmid=0, colorbar=dict(title="Δ log p", y=0.22, len=0.45),
                             hovertemplate="%{customdata}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    title = (f"Steering with the detached Jacobian of {_plain(repr(result.concept_prompt))} — "
             f"prompt {_plain(repr(result.prompt))}")
    fig.update_layout(height=420 + 28 * len(runs) + 60 * len(layers), title=title, template="plotly_white")
    return fig
