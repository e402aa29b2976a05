"""The Marin prompt's detached Jacobian on the real checkpoints, one script so the rows are comparable.

Per model (registry name) and dtype, on this CPU through the nnsight backend, for the output
Jacobian (final-norm state at the last position) of ``"The bridge out of Marin is the"``:

* ``rec err``: the detached reconstruction error ``||sum_i J_i x_i + c - y|| / ||y||``;
* ``rec err w/o c``: the same sum without the constant term (large where the map is affine:
  biases, e.g. Qwen 2's q/k/v biases);
* ``|c|/|y|``: the constant term's share of the target;
* ``u1 tokens``: the top singular vector of ``J_T`` (the last position) decoded through the
  unembedding, top 5; ``stable rank``: ``||J_T||_F^2 / ||J_T||_2^2``;
* ``Paris top-5``: whether " Paris" is among the top-5 next tokens after "The capital of France is".

``python -m benchmarks.marin [--models NAME ...] [--dtype float32 bfloat16 float16] [--out DIR]``
(or ``python -m benchmarks.run --only marin``). Models whose weights are not installed get a
"not installed" row. The 1.5B Qwen (``make qwen-1.5b``; about 15 minutes here) is opt-in as in
:mod:`benchmarks.scaling`: named in ``--models``, or ``--with-1.5b`` / ``TOOLKIT_BENCH_1_5B=1``.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

from benchmarks.common import print_table, write_json

PROMPT = "The bridge out of Marin is the"
FRANCE = "The capital of France is"
MODELS = ("smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def measure(model, name: str, prompt: str = PROMPT, chunk_size: int = 64) -> dict:
    """One row for a loaded backend (any dtype)."""
    from toolkit.jacobian.analysis import analyze_with_model
    from toolkit.jacobian.compute import detached_jacobian
    from toolkit.metrics import relative_error

    ids = model.to_tokens(prompt)[0]
    t0 = time.perf_counter()
    det = detached_jacobian(model.hf_model, ids, target="output", chunk_size=chunk_size)
    seconds = time.perf_counter() - t0
    analysis = analyze_with_model(det, model, top_k=5, n_vectors=1)
    y = det.y.double()
    top = model.logits(model.to_tokens(FRANCE))[0, -1].topk(5).indices
    top5 = model.to_str_tokens(top)
    return {"model": name, "dtype": str(det.jacobian.dtype).replace("torch.", ""), "tokens": len(ids),
            "d_model": det.jacobian.shape[-1], "rec err": float(det.reconstruction_error),
            "rec err w/o c": float(relative_error(det.reconstruction() - det.c.double(), det.y)),
            "|c|/|y|": float(det.c.double().norm() / y.norm()),
            "u1 tokens": analysis.top_tokens(-1, 5),
            "stable rank": float(analysis.stable_rank[-1]),
            "Paris top-5": " Paris" in top5, "France top-5": top5, "jacobian_s": round(seconds, 2)}


def _shown(rows: list[dict]) -> list[dict]:
    def fmt(k, v):
        if isinstance(v, float):
            return f"{v:.3g}" if k in ("|c|/|y|", "stable rank", "jacobian_s") else f"{v:.2e}"
        if k == "u1 tokens" and not isinstance(v, str):
            return "/".join(t.strip() or repr(t) for t in v)
        return v
    return [{k: fmt(k, v) for k, v in r.items() if k != "France top-5"} for r in rows]


def run(out: Path, models: tuple[str, ...] | None = None, dtypes: tuple[str, ...] = ("float32",),
        quick: bool = False, with_15b: bool | None = None) -> list[dict]:
    import toolkit
    from benchmarks.scaling import OPT_IN
    from toolkit.models.registry import find_entry

    if with_15b is None:
        with_15b = os.environ.get("TOOLKIT_BENCH_1_5B", "0").lower() in ("1", "true", "yes")
    if models is None:
        models = MODELS[:1] if quick else tuple(m for m in MODELS if m != OPT_IN or with_15b)
    rows = []
    for name in models:
        entry = find_entry(name)
        if entry is None or not entry.weights_available():
            rows.append({"model": name, "status": "not installed"})
            continue
        for dtype in dtypes:
            print(f"-- {name} {dtype}", flush=True)
            model = toolkit.load_model(name, backend="nnsight", dtype=dtype, device="cpu")
            rows.append(measure(model, name))
            del model
            gc.collect()
            print_table(_shown(rows[-1:]))
            write_json(out, "marin", rows, {"prompt": PROMPT, "target": "output", "device": "cpu",
                                            "backend": "nnsight", "stable rank / u1": "last position"})
    print_table(_shown(rows))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--with-1.5b", dest="with_15b", action="store_true", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    run(Path(args.out), tuple(args.models) if args.models else None, tuple(args.dtype), with_15b=args.with_15b)
