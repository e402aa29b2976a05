"""What a :class:`~toolkit.decompose.result.DecompositionResult` shows: figures, tables and its report.

The figures are the functions of :mod:`toolkit.plots.decomposition` (each returns a
``plotly.graph_objects.Figure``); here they become methods of the result, so a notebook writes
``result.figure("scatter")`` or ``result.rel_err_kl_scatter()`` without another import.

Example:
    >>> sorted(FIGURES)[:3]
    ['alignment', 'angles', 'kl_vs_random']
"""
from __future__ import annotations

from pathlib import Path

FIGURES = {  # figure kind -> function name in toolkit.plots.decomposition
    "scatter": "rel_err_kl_scatter",        # Figure 2b
    "rho": "layerwise_rho",                 # Figure 2c
    "rel_err": "layerwise_rel_err",
    "kl_vs_random": "kl_vs_random_control",
    "alignment": "alignment_summary",
    "angles": "angle_distributions",
    "projections": "projection_fractions",  # Figure 4
    "sweep": "sweep",                       # Figure 5 (parameter="k" or "rank")
}


class DecompositionViews:
    """Figures, pandas tables and the HTML report of a decomposition result (mixed into it)."""

    def figure(self, kind: str = "scatter", **kwargs):
        """One figure by kind: ``"scatter"`` (RelErr vs KL, Figure 2b), ``"rho"`` (per layer, 2c),
        ``"rel_err"``, ``"kl_vs_random"``, ``"alignment"``, ``"angles"``, ``"projections"`` (Figure 4),
        ``"sweep"`` (Figure 5, ``parameter="k"`` or ``"rank"``).

        Example:
            >>> decomposition.figure("rho").layout.title.text is not None     # .show() in a notebook
            True
        """
        if kind not in FIGURES:
            raise ValueError(f"unknown figure {kind!r}; choose one of {', '.join(FIGURES)}.")
        from toolkit.plots import decomposition as plots
        return getattr(plots, FIGURES[kind])(self, **kwargs)

    def rel_err_kl_scatter(self, layer: int | None = None, max_points: int = 4000):
        """Figure 2b: RelErr against KL per anchor (hover: the token in its context)."""
        return self.figure("scatter", layer=layer, max_points=max_points)

    def layerwise_rho(self):
        """Figure 2c: Spearman rho(RelErr, KL) per block with its bootstrap interval."""
        return self.figure("rho")

    def projection_fractions(self):
        """Figure 4: energy in the local map's top-k directions, against the k/d baseline."""
        return self.figure("projections")

    def to_frame(self):
        """The anchors as a ``pandas.DataFrame``: one row per test anchor and block.

        Example:
            >>> decomposition.to_frame().groupby("layer").rel_err.mean().index.tolist()
            [2, 3]
        """
        import pandas as pd
        return pd.DataFrame({name: column for name, column in self.anchors.items() if column.ndim == 1})

    def layers_frame(self):
        """The per-block summary (rho with interval, means, projections) as a ``pandas.DataFrame``.

        Example:
            >>> decomposition.layers_frame()[["layer", "rho", "rho_ci_low", "rho_ci_high"]].shape
            (2, 4)
        """
        import pandas as pd
        return pd.DataFrame(self.layer_summary)

    def verdicts_frame(self):
        """The verdict table (the paper's claims against their null models) as a ``pandas.DataFrame``.

        Example:
            >>> "verdict" in decomposition.verdicts_frame().columns
            True
        """
        import pandas as pd
        return pd.DataFrame(self.verdicts)

    def report(self, path: str | Path) -> Path:
        """Write the self-contained HTML report (figures, tables, settings) to ``path``.

        Example:
            >>> decomposition.report(tmp / "report.html").exists()
            True
        """
        from toolkit.decompose.report import write_decomposition_report
        return write_decomposition_report(self, path)
