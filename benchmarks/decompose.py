"""The whole decomposition pipeline on SmolLM2 against one bare forward pass over the same texts.

Pipeline: all layers, lowrank k=64 r=64 (update form), 8 positions per text, with the MLP
comparison, the random-direction control and the default controls (baselines, size controls,
verdicts: ``decompose(controls=True)``), collection cache off. Issue 14's target: the total at
most 2x the bare forward with the controls on. Reported per stage
(collect, fit, interventions) and as a ratio to the baseline: plain HF forward passes over the
same number of texts of the same length, in the same batches, measured in the same run, once
before and once after the pipeline (the ratio uses their mean: this shared machine's speed
drifts by tens of percent within minutes).

Scale: 256 training and 64 test texts of 192 tokens (the defaults' 4:1 split). The fit has a
fixed part that does not grow with the texts (each layer's MLP: 300 Adam steps of 256 rows), so
smaller runs have a higher ratio: ``--texts 128 32`` reports it.

Beside it, the plain intervention approach (one full forward per patched position, what
:func:`toolkit.decompose.interventions.patched_kl_plain` does) on a subset of the same
interventions, extrapolated linearly to the full count (stated in the row) -- running it in full
would take an hour at this scale -- against the cached fast path on exactly that subset.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import peak_rss_mb, print_table, timed, write_json


def bare_forward(model, texts, batch_size: int, route: str) -> dict:
    row: dict = {"route": route}
    with timed(row), torch.no_grad():
        for s in range(0, len(texts), batch_size):
            model.hf_model(texts[s:s + batch_size])
    return row


def run(out_dir: Path, n_train: int = 256, n_test: int = 64, seq_len: int = 192, batch_size: int = 8,
        plain_texts: int = 2, plain_layers: tuple[int, ...] = (0, 15, 29), quick: bool = False) -> list[dict]:
    import toolkit
    from toolkit.data import chunk_corpus, load_corpus
    from toolkit.decompose.interventions import patched_kl, patched_kl_plain
    from toolkit.decompose.pipeline import decompose, fit_layer
    from toolkit.collection.from_corpus import collect_from_corpus

    if quick:
        n_train, n_test, seq_len, plain_layers = 16, 4, 64, (0, 29)
    model = toolkit.load_model("smollm2-135m", backend="nnsight")
    texts = chunk_corpus(load_corpus("wikitext-test"), model.tokenizer, seq_len=seq_len,
                         max_texts=n_train + n_test).tokens
    before = bare_forward(model, texts, batch_size, "bare HF forward over the same texts, before the pipeline")
    result = decompose(model, "wikitext-test", n_train=n_train, n_test=n_test, seq_len=seq_len, form="update",
                       batch_size=batch_size, n_boot=200, progress=False, use_cache=False)
    after = bare_forward(model, texts, batch_size, "bare HF forward over the same texts, after the pipeline")
    base = {"route": "baseline: mean of the two bare passes",
            "seconds": round((before["seconds"] + after["seconds"]) / 2, 3)}
    t = result.settings["timings"]
    rows = [before, after, base] + [{"route": f"pipeline: {stage}", "seconds": t[f"{stage}_s"]}
                                    for stage in ("collect", "fit", "interventions", "summaries")]
    rows.insert(rows.index(next(r for r in rows if r["route"] == "pipeline: fit")) + 1,
                {"route": "pipeline: of which the controls' fits (baselines)", "seconds": t["controls_fit_s"]})
    rows.append({"route": "pipeline: total (all layers, k=64, r=64, 8 positions/text, controls on)",
                 "seconds": t["total_s"]})
    total = rows[-1]
    variants = 2 + result.settings["compare_mlp"] + result.settings.get("controls", False)   # + identity
    n_interventions = len(result.anchors["kl"]) * variants

    # Plain vs fast on the same subset of interventions (cache hit: the states are collected above).
    train, test = collect_from_corpus(model, "wikitext-test", n_train=n_train, n_test=n_test, seq_len=seq_len,
                                      layers=list(plain_layers), progress=False)
    tokens, positions = test.tokens[:plain_texts], test.positions[:plain_texts]
    rows_sub = positions.numel()
    values = {}
    for layer in plain_layers:
        fit, _, _, _ = fit_layer(train, test, layer, "lowrank", "update", 64, 64)
        values[layer + 1] = fit.predictions[:rows_sub]
    fast: dict = {"route": f"interventions, fast path, subset ({len(values) * rows_sub} patches)"}
    with timed(fast):
        kl_fast = patched_kl(model, tokens, positions, values, progress=False)
    plain: dict = {"route": f"interventions, plain full forwards, subset ({len(values) * rows_sub} patches)"}
    with timed(plain):
        kl_plain = patched_kl_plain(model, tokens, positions, values)
    max_diff = max(float((kl_fast[b] - kl_plain[b]).abs().max()) for b in values)
    per_patch = plain["seconds"] / (len(values) * rows_sub)
    extrapolated = {"route": f"plain approach, whole pipeline (extrapolated: {n_interventions} patches)",
                    "seconds": round(t["collect_s"] + t["fit_s"] + per_patch * n_interventions, 1)}
    rows += [fast, plain, extrapolated]
    for row in rows:
        row["ratio_to_baseline"] = round(row["seconds"] / base["seconds"], 2)
    fast["ratio_plain_to_fast"] = round(plain["seconds"] / fast["seconds"], 1)
    fast["max_abs_kl_diff"] = f"{max_diff:.1e}"
    total["peak_rss_mb"] = peak_rss_mb()
    print_table(rows)
    write_json(out_dir, "decompose", rows, {"model": "smollm2-135m", "corpus": "wikitext-test", "n_train": n_train,
                                            "n_test": n_test, "seq_len": seq_len, "per_text": 8, "k": 64,
                                            "rank": 64, "form": "update", "compare_mlp": True,
                                            "random_control": True, "controls": result.settings["controls"],
                                            "torch_threads": torch.get_num_threads(), "batch_size": batch_size, "dtype": "float32",
                                            "plain_subset": {"texts": plain_texts, "layers": list(plain_layers)},
                                            "median_rel_err": float(torch.tensor(result.anchors["rel_err"]).median())})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--texts", type=int, nargs=2, metavar=("N_TRAIN", "N_TEST"), default=(256, 64))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    run(Path(args.out), n_train=args.texts[0], n_test=args.texts[1], quick=args.quick)
