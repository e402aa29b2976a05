"""Collecting hidden-state pairs on SmolLM2 through each backend, against a bare forward pass.

Baseline: plain HF forward passes over the same texts in the same batches (no hooks, no
saving). Each backend collects every boundary at 8 positions per text, cache off.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import peak_rss_mb, print_table, timed, write_json


def run(out_dir: Path, n_texts: int = 100, seq_len: int = 192, batch_size: int = 8) -> list[dict]:
    import toolkit
    from toolkit.collection import collect_hidden_states
    from toolkit.data import chunk_corpus, load_corpus, sample_positions

    nn_model = toolkit.load_model(backend="nnsight")
    tl_model = toolkit.make_backend(nn_model.hf_model, nn_model.tokenizer, backend="tl", model_id="smollm2-135m")
    texts = chunk_corpus(load_corpus("wikitext-test"), nn_model.tokenizer, seq_len=seq_len, max_texts=n_texts)
    tokens = texts.tokens
    positions = sample_positions(len(tokens), seq_len, per_text=8, seed=0)

    base: dict = {"route": "bare HF forward (baseline)"}
    with timed(base), torch.no_grad():
        for s in range(0, len(tokens), batch_size):
            nn_model.hf_model(tokens[s:s + batch_size])
    rows = [base]
    for model in (nn_model, tl_model):
        row: dict = {"route": f"collect all boundaries via {model.name}"}
        with tempfile.TemporaryDirectory() as tmp, timed(row):
            collect_hidden_states(model, tokens, positions, batch_size=batch_size, cache_dir=tmp, use_cache=False,
                                  progress=False)
        rows.append(row)
    for row in rows:
        row["ratio_to_baseline"] = round(row["seconds"] / base["seconds"], 2)
    rows[-1]["peak_rss_mb"] = peak_rss_mb()
    print_table(rows)
    write_json(out_dir, "collect", rows, {"model": "smollm2-135m", "n_texts": len(tokens), "seq_len": seq_len,
                                          "per_text": 8, "batch_size": batch_size, "dtype": "float32"})
    return rows
