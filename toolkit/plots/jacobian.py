"""Figures of the detached Jacobian; each takes results (never a model) and returns a go.Figure.

* :func:`reconstruction_scatter` — ``y`` against ``sum_i J_i x_i + c``, detached and ordinary;
* :func:`singular_spectra` — singular values of each ``J_i``, one line per input token (log y);
* :func:`decoded_tokens_table` — the decoded singular vectors as a table, with a hoverable grid.

Example:
    >>> import torch
    >>> from toolkit.jacobian.analysis import analyze_jacobian
    >>> from toolkit.jacobian.result import DetachedJacobian
    >>> r = DetachedJacobian(torch.randn(2, 4, 4), torch.randn(4), torch.randn(2, 4), torch.zeros(4),
    ...                      torch.tensor([1, 2]))
    >>> analysis = analyze_jacobian(r, torch.randn(4, 10), torch.randn(10, 4), str, top_k=3, n_vectors=2)
    >>> fig = decoded_tokens_table(analysis)
    >>> fig.write_html("/tmp/decoded.html")                       # doctest: +SKIP
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toolkit.plots.style import finish

JACOBIAN_COLORS = {"detached": "#1f77b4", "ordinary": "#ff7f0e", "identity": "#7f7f7f"}


def _tok(s: str) -> str:
    return html.escape(repr(str(s)))


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
        >>> r = DetachedJacobian(torch.randn(2, 4, 4), torch.randn(4), torch.randn(2, 4), torch.zeros(4),
        ...                      torch.tensor([1, 2]))
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
        fig.add_trace(go.Scatter(x=np.arange(1, k + 1), y=s, mode="lines", name=f"{i}: {tok!r}",
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
        >>> r = DetachedJacobian(torch.randn(2, 4, 4), torch.randn(4), torch.randn(2, 4), torch.zeros(4),
        ...                      torch.tensor([1, 2]))
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
    fig.add_trace(go.Table(header=dict(values=[html.escape(h) for h in header], align="left"),
                           cells=dict(values=[[html.escape(str(v)) for v in col] for col in columns],
                                      align="left", font=dict(size=11))), row=1, col=1)
    x_labels = [f"{side} {k + 1}" for side in sides for k in range(n)]
    z = np.array([[getattr(analysis, side)[i][k]["value"] for side in sides for k in range(n)] for i in range(T)])
    text = [[getattr(analysis, side)[i][k]["tokens"][0] for side in sides for k in range(n)] for i in range(T)]
    hover = [[_hover(getattr(analysis, side)[i][k], side) for side in sides for k in range(n)] for i in range(T)]
    y_labels = [f"{i}: {t!r}" for i, t in enumerate(analysis.str_tokens)]
    fig.add_trace(go.Heatmap(z=np.log10(np.maximum(z, 1e-12)), x=x_labels, y=y_labels, text=text,
                             texttemplate="%{text}", customdata=hover, colorscale="Blues",
                             colorbar=dict(title="log10 σ", y=0.22, len=0.45),
                             hovertemplate="%{y}<br>%{customdata}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_layout(height=300 + 60 * T, title="Singular vectors decoded to tokens (left: W_U logits; "
                      "right: W_E cosine)", template="plotly_white")
    return fig
