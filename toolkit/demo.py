"""The main job at a small scale on the embedded default (``make demo``).

Loads SmolLM2-135M (offline) and runs both analyses:

1. the tokenwise decomposition of layer updates on every block, with texts from the embedded
   corpus (settings as the paper's except for the number of texts), written to ``OUT`` as
   ``result.json``, ``anchors.csv``, ``anchors.npz`` and a self-contained ``report.html``;
2. the detached Jacobian of "The bridge out of Marin is the" at the output embedding, with its
   reconstruction error, the ordinary Jacobian for contrast and the decoded singular vectors,
   written to ``OUT/jacobian`` (``jacobian.json``, ``detached_jacobian/``, ``report.html``).
"""
from __future__ import annotations

import time
from pathlib import Path


def run_demo(out: Path, model_name: str = "smollm2-135m", backend: str | None = None, n_train: int = 48,
             n_test: int = 12, progress: bool = True) -> dict:
    """Run both analyses at a small scale into ``out``; returns the summary printed by ``make demo``.

    Example:
        >>> summary = run_demo(Path("runs/demo"))                            # doctest: +SKIP

        Settings are checked before any model is loaded or anything is written:

        >>> run_demo(tmp / "demo", n_train=0)
        Traceback (most recent call last):
        ...
        ValueError: n_train (--n-train) must be a positive integer (training texts), got 0; use 1 or more.
        >>> list(tmp.iterdir())
        []
    """
    import toolkit
    from toolkit.decompose.pipeline import check_decompose_settings, decompose
    from toolkit.decompose.report import format_table, summary_rows, write_decomposition_report
    from toolkit.jacobian.run import DEFAULT_PROMPT, run_jacobian

    check_decompose_settings(n_train=n_train, n_test=n_test)  # before the model loads
    t0 = time.perf_counter()
    model = toolkit.load_model(model_name, backend=backend)
    result = decompose(model, "embedded", n_train=n_train, n_test=n_test, mlp_steps=100, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out)
    report = write_decomposition_report(result, out / "report.html")
    t_jac = time.perf_counter()
    jac = run_jacobian(model, DEFAULT_PROMPT, out=out / "jacobian")
    jacobian_summary = {"prompt": DEFAULT_PROMPT,
                        "detached_reconstruction_error": f"{jac['detached']['reconstruction_error']:.1e}",
                        "ordinary_reconstruction_error": f"{jac['ordinary']['reconstruction_error']:.2f}",
                        "seconds": round(time.perf_counter() - t_jac, 1)}
    # The last position's top left singular vector, decoded: what the map pushes the output toward.
    jacobian_summary["last_position_u1_tokens"] = jac["analysis"]["left"][-1][0]["tokens"]
    pooled = result.model_summary["rho_pooled"]
    return {"model": repr(model), "settings": {k: result.settings[k] for k in ("function_class", "form", "k", "rank",
                                                                              "n_train", "n_test", "seq_len", "per_text")},
            "table": format_table(summary_rows(result)),
            "rho_pooled": f"{pooled['rho']:.3f} [{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}]",
            "rho_layer_mean": round(result.model_summary["rho_layer_mean"], 3),
            "rho_layer_mean_95ci": [round(v, 3) for v in result.model_summary["rho_layer_mean_ci"]],
            "kl_ratio_residual_vs_random": round(result.model_summary["kl_ratio_residual_vs_random"], 2),
            "timings": result.settings["timings"], "total_s": round(time.perf_counter() - t0, 1),
            "jacobian": jacobian_summary,
            "outputs": [str(out / n) for n in ("result.json", "anchors.csv", "anchors.npz")] + [str(report)]
                       + [str(out / "jacobian" / n) for n in ("jacobian.json", "report.html")]}
