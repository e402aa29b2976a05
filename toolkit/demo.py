"""The main job at a small scale on the embedded default (``make demo``).

Loads SmolLM2-135M (offline), collects hidden-state pairs for every block from the embedded
corpus, summarises how much each block changes the residual stream, and writes
``summary.json`` and a self-contained ``report.html`` into the output folder. The analyses
(tokenwise decomposition, detached Jacobian) add their own sections as they land.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import plotly.graph_objects as go
import torch

from toolkit.report import Section, write_report


def update_profile(train) -> list[dict]:
    """Per block: mean ||h_{l+1} - h_l|| / ||h_l|| and mean cos(h_l, h_{l+1}) over the collected rows."""
    rows = []
    for layer in train.layers:
        x, y = train.pairs(layer)
        rel = ((y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).mean().item()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=1).mean().item()
        rows.append({"layer": layer, "relative_update_norm": rel, "cos_in_out": cos})
    return rows


def run_demo(out: Path, model_name: str = "smollm2-135m", backend: str | None = None, n_train: int = 64,
             n_test: int = 16) -> dict:
    import toolkit
    from toolkit.collection.from_corpus import collect_from_corpus

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = toolkit.load_model(model_name, backend=backend)
    t_load = time.perf_counter() - t0
    train, test = collect_from_corpus(model, "embedded", n_train=n_train, n_test=n_test)
    t_collect = time.perf_counter() - t0 - t_load
    profile = update_profile(train)
    fig = go.Figure(go.Scatter(x=[r["layer"] for r in profile], y=[r["relative_update_norm"] for r in profile],
                               mode="lines+markers", name="||h_{l+1}-h_l|| / ||h_l||"))
    fig.update_layout(title=f"How much each block changes the residual stream ({model.info.model_id})",
                      xaxis_title="block l", yaxis_title="mean relative update norm (unitless)")
    summary = {"model": repr(model), "n_train_texts": train.meta["n_texts"], "n_test_texts": test.meta["n_texts"],
               "rows_per_boundary": train.meta["n_texts"] * train.meta["per_text"],
               "load_s": round(t_load, 2), "collect_s": round(t_collect, 2),
               "train_store": str(train.directory), "update_profile": profile}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(out / "report.html", "Layer updates: demo on the embedded default",
                 [Section("Update size per block", text=f"{summary['model']}; {summary['rows_per_boundary']} "
                          "sampled positions from the embedded corpus.", figure=fig),
                  Section("Per-block table", table=profile)])
    summary["report"] = str(out / "report.html")
    return summary
