"""The decomposition's HTML report and printed summary, from a result (never a model)."""
from __future__ import annotations

from pathlib import Path

from toolkit.plots import decomposition as figs
from toolkit.report import Section, write_report


def summary_rows(result) -> list[dict]:
    """One printed/CSV row per layer: rho [CI], RelErr, KL, control KL."""
    return [{"layer": r["layer"], "rho": round(r["rho"], 3),
             "rho_95ci": f"[{r['rho_ci_low']:.3f}, {r['rho_ci_high']:.3f}]", "rel_err": round(r["rel_err_mean"], 4),
             "kl": round(r["kl_mean"], 4), "kl_random": round(r["kl_random_mean"], 4),
             **({"rel_err_mlp": round(r["rel_err_mlp_mean"], 4)} if "rel_err_mlp_mean" in r else {})}
            for r in result.layer_summary]


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def format_summary(result) -> str:
    """The terminal summary: the per-layer table, the pooled rho with its interval, the timings.

    Example:
        >>> print(format_summary(result))                                   # doctest: +SKIP
    """
    pooled = result.model_summary["rho_pooled"]
    return (f"{format_table(summary_rows(result))}\npooled rho {pooled['rho']:.3f} "
            f"[{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}]; timings {result.settings['timings']}")


def _interval(ci) -> str:
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def write_decomposition_report(result, path: str | Path) -> Path:
    s, m = result.settings, result.model_summary
    intro = (f"{s['model_id']} via {s['backend']}; corpus {s['corpus']}; {s['function_class']} ({s['form']} form), "
             f"k={s['k']}, rank={s['rank']}; {s['n_train']} train / {s['n_test']} test texts of {s['seq_len']} "
             f"tokens, {s['per_text']} positions per text. Pooled Spearman rho = {m['rho_pooled']['rho']:.3f} "
             f"[{m['rho_pooled']['ci_low']:.3f}, {m['rho_pooled']['ci_high']:.3f}], mean over layers "
             f"{m['rho_layer_mean']:.3f}{_interval(m.get('rho_layer_mean_ci'))}. Removing the residual costs {m['kl_ratio_residual_vs_random']:.2f}x the KL "
             f"of an equal-norm random perturbation.")
    sections = [Section("Summary", text=intro, table=summary_rows(result)),
                Section("RelErr vs KL per token (Figure 2b)", figure=figs.rel_err_kl_scatter(result)),
                Section("Layerwise Spearman rho (Figure 2c)", figure=figs.layerwise_rho(result)),
                Section("Layerwise RelErr (Figure 2d)", figure=figs.layerwise_rel_err(result)),
                Section("Control: random direction of equal norm", figure=figs.kl_vs_random_control(result)),
                Section("Alignment (Figure 3a)", figure=figs.alignment_summary(result)),
                Section("Angles (Figure 3b)", figure=figs.angle_distributions(result)),
                Section("Projection onto the local map's top singular vectors (Figure 4)",
                        figure=figs.projection_fractions(result))]
    for parameter in ("k", "rank"):
        if result.sweeps.get(parameter):
            sections.append(Section(f"Sweep over {parameter} (Figure 5)", figure=figs.sweep(result, parameter)))
    for name, rows in result.regimes.items():
        sections.append(Section(f"Error regimes, {name} map (Table 2)", table=rows))
    return write_report(path, f"Tokenwise decomposition of layer updates: {s['model_id']}", sections)
