"""How both analyses scale with the model: SmolLM2-135M, Gemma-3-270m, Qwen2.5-Coder-0.5B and 1.5B.

Per model (float32, this CPU, the nnsight backend):

(a) **decomposition pipeline** at a fixed small size, every layer (lowrank k=64 r=64, update form,
    8 positions per text, random-direction control on, no MLP comparison: its fixed 300 Adam steps
    per layer would dominate a small run), as a ratio to bare HF forward passes over the same texts
    (the mean of one pass before and one after the pipeline; target: at most 2x);
(b) **top-8 SVD of the output Jacobian** ``[J_1..J_T]``: matrix-free (block Krylov from JVPs and
    VJPs, tol 1e-4) against forming ``J`` by VJPs and taking its SVD (target: at least 5x, growing
    with the width: forming costs ``d_model`` VJPs, the Krylov method about 15 blocks of 8);
(c) the same two with the model **offloaded to disk** (accelerate, ``max_memory`` of the non-block
    weights plus half the blocks': the upper blocks live in ``offload_folder`` and are loaded per
    call; :func:`offload_budget`), as a ratio to the in-memory run;
(d) **peak memory** of each step (resident memory above the level before it, sampled every 2 ms).

One table, ``scaling.json`` and ``scaling.html`` (time against parameter count, log-log).
Models whose weights are not installed get a "not installed" row. The 1.5B model is opt-in
(``--with-1.5b`` or ``TOOLKIT_BENCH_1_5B=1``): about 6 GB in float32 and tens of minutes here.

``python -m benchmarks.scaling [--size small|full] [--models NAME ...] [--with-1.5b] [--out DIR]``
(``--size small``, the default of ``make bench``: 32 training / 8 test texts of 64 tokens and a
16-token Jacobian; ``full``: 64 / 16 texts of 128 tokens and the 64-token Jacobian).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_json
from benchmarks.decompose import bare_forward
from benchmarks.jacobian import PeakRSS

MODELS = ("smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
OPT_IN = "qwen2.5-coder-1.5b"
SIZES = {"small": {"n_train": 32, "n_test": 8, "seq_len": 64, "tokens": 16},
         "full": {"n_train": 64, "n_test": 16, "seq_len": 128, "tokens": 64}}


def measured(fn) -> tuple[object, float, float]:
    """``(result, seconds, peak MB above the start)`` of one call."""
    gc.collect()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, round(seconds, 2), mem.peak_mb


def pipeline(model, size: dict, corpus) -> tuple[float, float, float]:
    """(pipeline seconds, bare-forward seconds, peak MB) at ``size``, all layers."""
    from toolkit.data import chunk_corpus
    from toolkit.decompose.pipeline import decompose

    texts = chunk_corpus(corpus, model.tokenizer, seq_len=size["seq_len"],
                         max_texts=size["n_train"] + size["n_test"]).tokens
    before = bare_forward(model, texts, 8, "before")["seconds"]
    _, seconds, peak = measured(lambda: decompose(
        model, corpus, n_train=size["n_train"], n_test=size["n_test"], seq_len=size["seq_len"],
        compare_mlp=False, n_boot=100, progress=False, use_cache=False))
    after = bare_forward(model, texts, 8, "after")["seconds"]
    return seconds, (before + after) / 2, peak


def top_svd(model, n_tokens: int, formed: bool, k: int = 8) -> dict:
    """Matrix-free top-k SVD (and, with ``formed``, forming J and its SVD) of the output Jacobian."""
    from toolkit.jacobian.compute import detached_jacobian
    from toolkit.jacobian.matrix_free import jacobian_svd

    ids = torch.arange(1000, 1000 + n_tokens)
    out: dict = {}
    top, out["free_s"], out["free_mb"] = measured(lambda: jacobian_svd(model.hf_model, ids, k=k, tol=1e-4))
    out["products"] = f"{top.n_jvp} JVP + {top.n_vjp} VJP"
    if formed:
        def form():
            J = detached_jacobian(model.hf_model, ids).jacobian
            return torch.linalg.svdvals(J.permute(1, 0, 2).reshape(J.shape[1], -1).double())[:k]
        exact, out["formed_s"], out["formed_mb"] = measured(form)
        out["top8_rel_err"] = float(f"{float(((top.singular_values - exact).abs() / exact).max()):.1e}")
    return out


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.hf_model.parameters())


def offload_budget(hf_model) -> int:
    """CPU ``max_memory`` (bytes) that keeps everything but the blocks plus half the blocks' weights
    (and one block more: accelerate keeps room for the largest offloaded layer on the CPU).

    Half of *all* weights is not enough where the (tied) embedding is most of the model: Gemma-3-270m's
    262k x 640 embedding is 63% of its float32 weights, so accelerate's "auto" map sent the whole model
    to disk (``{"": "disk"}``), wrote no offload index, and the first forward failed with
    ``KeyError: 'model.embed_tokens.weight'``. This budget puts about half of the blocks on disk on
    every model.
    """
    sizes = {name: p.numel() * p.element_size() for name, p in hf_model.named_parameters()}  # tied ones once
    per_block: dict[str, int] = {}
    for k, v in sizes.items():
        if ".layers." in k:
            block = k.split(".layers.")[0] + ".layers." + k.split(".layers.")[1].split(".")[0]
            per_block[block] = per_block.get(block, 0) + v
    blocks = sum(per_block.values())
    return int(sum(sizes.values()) - blocks / 2 + max(per_block.values(), default=0))


def bench_model(name: str, size: dict, corpus) -> dict:
    import toolkit
    from toolkit.models.registry import find_entry

    entry = find_entry(name)
    if entry is None or not entry.weights_available():
        return {"model": name, "status": "not installed"}
    row: dict = {"model": name, "status": "ok"}
    model = toolkit.load_model(name, backend="nnsight", dtype="float32", device="cpu")
    row["params_M"] = round(n_parameters(model) / 1e6, 1)
    row["d_model"], row["n_layers"] = model.d_model, model.n_layers
    bare_forward(model, model.to_tokens(["warm up"] * 2), 2, "warm-up")
    row["pipeline_s"], row["bare_forward_s"], row["pipeline_mb"] = pipeline(model, size, corpus)
    row["pipeline_ratio"] = round(row["pipeline_s"] / row["bare_forward_s"], 2)
    svd = top_svd(model, size["tokens"], formed=True)
    row.update(svd_free_s=svd["free_s"], svd_formed_s=svd["formed_s"], svd_products=svd["products"],
               svd_speedup=round(svd["formed_s"] / svd["free_s"], 2), svd_top8_rel_err=svd["top8_rel_err"],
               svd_free_mb=svd["free_mb"], svd_formed_mb=svd["formed_mb"])
    budget = offload_budget(model.hf_model)
    del model
    gc.collect()

    folder = tempfile.mkdtemp(prefix="scaling-offload-")
    try:
        model = toolkit.load_model(name, backend="nnsight", dtype="float32", device_map="auto",
                                   max_memory={"cpu": budget}, offload_folder=folder)
        placed = model.hf_model.hf_device_map
        row["offloaded_blocks"] = f"{sum(v == 'disk' for k, v in placed.items() if '.layers.' in k)}/{model.n_layers}"
        row["offload_pipeline_s"], _, row["offload_pipeline_mb"] = pipeline(model, size, corpus)
        row["offload_pipeline_x"] = round(row["offload_pipeline_s"] / row["pipeline_s"], 2)
        try:
            svd = top_svd(model, size["tokens"], formed=False)
            row["offload_svd_free_s"], row["offload_svd_mb"] = svd["free_s"], svd["free_mb"]
            row["offload_svd_x"] = round(svd["free_s"] / row["svd_free_s"], 2)
        except RuntimeError as err:  # keep the row's other numbers; the failure is reported in the table
            row["offload_svd_x"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
        del model
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    gc.collect()
    return row


def figure(rows: list[dict]):
    """Seconds against parameter count, one line per measurement (log-log)."""
    import plotly.graph_objects as go

    done = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: r["params_M"])
    series = {"pipeline_s": "decomposition pipeline", "bare_forward_s": "bare forward (same texts)",
              "svd_formed_s": "form J + SVD", "svd_free_s": "matrix-free top-8 SVD",
              "offload_pipeline_s": "pipeline, offloaded to disk", "offload_svd_free_s": "matrix-free SVD, offloaded"}
    fig = go.Figure()
    for key, label in series.items():
        have = [r for r in done if isinstance(r.get(key), (int, float))]  # a failed step has no time
        fig.add_trace(go.Scatter(x=[r["params_M"] * 1e6 for r in have], y=[r[key] for r in have],
                                 mode="lines+markers", name=label, text=[r["model"] for r in have]))
    fig.update_layout(title="Time against model size (CPU, float32)", xaxis_title="parameters",
                      yaxis_title="seconds", xaxis_type="log", yaxis_type="log", template="plotly_white")
    return fig


def run(out_dir: Path, size: str = "small", models: tuple[str, ...] | None = None, with_15b: bool | None = None,
        quick: bool = False, corpus: str = "wikitext-test") -> list[dict]:
    """Every model in turn; the table, JSON and plot are rewritten after each.

    ``corpus``: a name for :func:`toolkit.data.load_corpus` or a text file's path.
    """
    from toolkit.data import load_corpus
    texts = load_corpus(corpus)
    if with_15b is None:
        with_15b = os.environ.get("TOOLKIT_BENCH_1_5B", "0").lower() in ("1", "true", "yes")
    names = list(models or MODELS)
    if quick:
        size, names = "small", names[:1]
    settings = {"size": size, **SIZES[size], "dtype": "float32", "device": "cpu", "backend": "nnsight",
                "threads": torch.get_num_threads(), "corpus": texts.name, "pipeline": "all layers, lowrank k=64 r=64, update form, "
                "8 positions/text, random control, no MLP comparison", "svd": "top-8, tol 1e-4, output target"}
    rows: list[dict] = []
    for name in names:
        if name == OPT_IN and not with_15b:
            rows.append({"model": name, "status": "skipped (opt-in: --with-1.5b or TOOLKIT_BENCH_1_5B=1)"})
            continue
        print(f"-- {name}", flush=True)
        rows.append(bench_model(name, SIZES[size], texts))
        write_json(out_dir, "scaling", rows, settings)
        figure(rows).write_html(out_dir / "scaling.html", include_plotlyjs="cdn")
    print_table(rows)
    return rows


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--models", nargs="+", default=None, help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--with-1.5b", dest="with_15b", action="store_true", default=None)
    parser.add_argument("--corpus", default="wikitext-test", help="corpus name or text file path")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    run(Path(args.out), size=args.size, models=tuple(args.models) if args.models else None, with_15b=args.with_15b,
        corpus=args.corpus)


if __name__ == "__main__":
    main()
