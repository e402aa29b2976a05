"""The decomposition's HTML report and printed summary, from a result (never a model)."""
from __future__ import annotations

from pathlib import Path

from toolkit.plots import controls as control_figs
from toolkit.plots import decomposition as figs
from toolkit.report import Section, write_report


def _r(v, digits: int = 3):
    return "-" if v is None else round(v, digits)


def verdict_rows(result) -> list[dict]:
    """The verdict table, one printed/HTML row per claim: value [95% CI], strongest control, verdict."""
    return [{"claim": v["claim"], "measure": v["measure"], "value": _r(v["value"]),
             "95% CI": "-" if v["ci_low"] is None else f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}]",
             "strongest control": v["strongest_control"], "control value": _r(v["control_value"]),
             "verdict": v["verdict"]} for v in result.verdicts]


def baseline_rows(result) -> list[dict]:
    """Per layer: the fitted map beside its null models (RelErr, update fit, R², KL) and massive anchors."""
    return [{"layer": r["layer"], "rel_err": _r(r["rel_err_mean"], 4), "rel_err_median": _r(r["rel_err_median"], 4),
             "identity": _r(r["rel_err_identity_mean"], 4), "mean_update": _r(r["rel_err_mean_update_mean"], 4),
             "global": _r(r.get("rel_err_global_mean"), 4), "random_nb": _r(r.get("rel_err_random_nb_mean"), 4),
             "update_err": _r(r["update_err_mean"]), "update_err_global": _r(r.get("update_err_global_mean")),
             "r2": _r(r["r2"]), "r2_global": _r(r.get("r2_global")), "r2_no_massive": _r(r["r2_no_massive"]),
             "kl": _r(r["kl_mean"], 4), "kl_median": _r(r["kl_median"], 4), "kl_identity": _r(r["kl_identity_mean"], 4),
             "kl_random": _r(r["kl_random_mean"], 4), "n_massive": r["n_massive"]}
            for r in result.layer_summary]


def size_control_rows(result) -> list[dict]:
    """Per layer: rho(RelErr, KL) beside the partial rho given the update's size, and the alignment
    of the fitted map against the global map, the mean update and chance."""
    chance = result.controls.get("chance_abs_cos")
    return [{"layer": r["layer"], "rho": _r(r["rho"]), "partial_rho": _r(r["partial_rho"]),
             "partial_95ci": f"[{r['partial_rho_ci_low']:.3f}, {r['partial_rho_ci_high']:.3f}]",
             "p_perm": _r(r["partial_rho_p_perm"], 4), "|cos(u,t)|": _r(r["abs_cos_full_tok"]),
             "|cos(u,t)| global": _r(r.get("abs_cos_full_tok_global_mean")),
             "|cos(u,t)| mean update": _r(r.get("abs_cos_full_tok_mean_update_mean")), "chance": _r(chance),
             "|cos(r,t)|": _r(r["abs_cos_res_tok"]), "|cos(r,t)| global": _r(r.get("abs_cos_res_tok_global_mean"))}
            for r in result.layer_summary]


def controls_text(result) -> str:
    """One paragraph: the split, the positions, the massive anchors and the pooled partial rho."""
    s, c = result.settings, result.controls
    part = c["partial_rho_within_layers"]
    return (f"Train/test split by {s.get('split', 'text')}; positions from {s.get('min_position', 1)} on; "
            f"{c['n_massive']} of {c['n_anchors']} anchors flagged massive (norm over "
            f"{s.get('baselines', {}).get('massive_factor', '?')}x the layer median). Pooled within layers: "
            f"rho(RelErr, KL) {part['plain_rho']:.3f}, partial rho given the update's relative size and the "
            f"identity's KL {part['rho']:.3f} [{part['ci_low']:.3f}, {part['ci_high']:.3f}], permutation "
            f"p = {part['p_perm']:.4f}. The identity's tokenwise update is 0, so its cosines are undefined: "
            f"its RelErr is the update's relative size. Verdict rules version {s['verdict_rules']['version']}, fixed in "
            f"toolkit/decompose/verdicts.py before any run and recorded in settings['verdict_rules'].")


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
        >>> "rho" in format_summary(decomposition)
        True
    """
    pooled = result.model_summary["rho_pooled"]
    verdicts = ("\nDo the claims survive the controls?\n" + format_table(verdict_rows(result))
                if result.verdicts else "")
    return (f"{format_table(summary_rows(result))}{verdicts}\npooled rho {pooled['rho']:.3f} "
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
    sections = [Section("Summary", text=intro, table=summary_rows(result))]
    if result.verdicts:
        sections.append(Section("Do the claims survive the controls?", text=controls_text(result),
                                table=verdict_rows(result)))
    # Figure 2b stays the page's first figure (the one readers hover first).
    sections.append(Section("RelErr vs KL per token (Figure 2b)", figure=figs.rel_err_kl_scatter(result)))
    if result.verdicts:
        sections += [Section("The fitted map beside its null models", figure=control_figs.baselines_by_layer(result),
                             table=baseline_rows(result)),
                     Section("Size confounding and alignment against chance",
                             figure=control_figs.partial_rho_by_layer(result), table=size_control_rows(result))]
    sections += [
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
