"""The Jacobian's HTML report and printed summary, from computed results (never a model)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.report import Section, write_report


def write_jacobian_report(path: str | Path, title: str, detached, ordinary, analysis) -> Path:
    """One self-contained page: reconstruction scatter, singular spectra, decoded singular vectors.

    ``detached`` / ``ordinary``: :class:`~toolkit.jacobian.result.DetachedJacobian` (the ordinary one for
    contrast, or ``None``); ``analysis``: the detached one's :class:`~toolkit.jacobian.analysis.JacobianSVD`.

    Example:
        >>> write_jacobian_report(tmp / "report.html", "Marin", jac, None, svd).name
        'report.html'
    """
    from toolkit.plots.jacobian import decoded_tokens_table, reconstruction_scatter, singular_spectra

    rank_rows = [{"position": i, "token": repr(t), "stable rank": float(analysis.stable_rank[i]),
                  "sigma_1": float(analysis.singular_values[i, 0]),
                  "top left token": analysis.left[i][0]["tokens"][0],
                  "top right token": analysis.right[i][0]["tokens"][0]}
                 for i, t in enumerate(analysis.str_tokens)]
    sections = [
        Section("Reconstruction", text=(f"y = sum_i J_i x_i + c. Detached relative error "
                                        f"{detached.reconstruction_error:.2e}" +
                                        ("" if ordinary is None else
                                         f"; ordinary Jacobian {ordinary.reconstruction_error:.2e}") + "."),
                figure=reconstruction_scatter(detached, ordinary)),
        Section("Singular spectra", text="Singular values of the detached J_i for each input token.",
                figure=singular_spectra(analysis)),
        Section("Decoded singular vectors", text=("Left singular vectors decoded through W_U (sign: u·y > 0), "
                                                  "right ones by cosine with W_E rows; hover the grid for scores."),
                figure=decoded_tokens_table(analysis), table=rank_rows),
    ]
    return write_report(path, title, sections)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal from :func:`~toolkit.jacobian.run.run_jacobian`'s summary: errors,
    stable ranks and top decoded tokens per position.

    Example:
        >>> from toolkit.jacobian.run import run_jacobian
        >>> print(format_summary(run_jacobian(model, "Paris is", out=tmp)).splitlines()[1])   # doctest: +ELLIPSIS
        reconstruction error: detached ...e-0..., ordinary ...
    """
    if summary.get("route") == "matrix-free":
        lines = [f"{summary['model']} via {summary['backend']}, target {summary['target']!r}, {summary['n_tokens']} "
                 f"tokens, matrix-free top-{len(summary['singular_values'])} ({summary['reason']})"]
        lines += [f"  sigma {v['sigma']:.3g}  out: {' | '.join(v['output_tokens'][:3])!r}  from: "
                  f"{', '.join(repr(p['token']) for p in v['top_positions'][:3])}" for v in summary["vectors"]]
        return "\n".join(lines)
    a = summary["analysis"]
    lines = [f"{summary['model']} via {summary['backend']}, target {summary['target']!r}: {summary['prompt']!r}",
             f"reconstruction error: detached {summary['detached']['reconstruction_error']:.2e}, "
             f"ordinary {summary['ordinary']['reconstruction_error']:.2e}"]
    for i, tok in enumerate(a["str_tokens"]):
        left = " | ".join(e["tokens"][0] for e in a["left"][i])
        right = " | ".join(e["tokens"][0] for e in a["right"][i])
        lines.append(f"  {i:>2} {tok!r:<14} stable rank {a['stable_rank'][i]:6.2f}  out: {left!r:<32} in: {right!r}")
    return "\n".join(lines)


def write_figure_report(path: str | Path, title: str, text: str, figure, rows: list[dict]) -> Path:
    """One page for a result with one figure and one table (spectra, top-k SVDs).

    Example:
        >>> write_figure_report(tmp / "top.html", "Top-2 SVD", "...", top.figure(), []).stat().st_size > 0
        True
    """
    return write_report(path, title, [Section(title, text=text, figure=figure, table=rows)])
