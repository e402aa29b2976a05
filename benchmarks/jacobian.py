"""Detached Jacobian on SmolLM2 (float32, CPU): rows, all layers, top-k SVD.

(a) **output Jacobian** ``[J_1..J_T]`` at ``T`` tokens: our chunked batched VJPs
    (``detached_jacobian``) against ``torch.autograd.functional.jacobian(vectorize=True)`` on the
    same frozen forward (and, for reference, on the frozen forward with SDPA attention, as the
    freeze ran before it switched to the eager kernel); time, peak RSS above the start, ratio.
(b) **all layers**: every boundary's Jacobian (and, with ``--components``, every attention /
    MLP output) from one forward-mode sweep against one reverse pass per layer.
(c) **top-8 SVD** of the whole-prompt output map: matrix-free (block Krylov from JVPs and
    VJPs) against forming ``J`` and taking its SVD; the relative error of the top-8 values.
(d) **top-8 SVD of one block's full transform** ``h_l -> h_{l+1}`` (``T*d x T*d``, 36 864 square at
    64 tokens): matrix-free against forming it from ``T*d`` JVP columns (5.4 GB) and taking its top-8
    SVD by the same block Krylov on the dense matrix (a full dense SVD of that size takes hours).
    Block 1: a layer target's products still run the blocks below it (their output is replaced
    at the block's input), so a deep block would mostly time that prefix, in both routes.

``python -m benchmarks.jacobian [--quick] [--threads N] [--out DIR]`` (or through
``python -m benchmarks.run --only jacobian``). ``--quick`` runs every case on the first 4
layers of SmolLM2 with 4-token prompts: a smoke test of the code paths in about a minute.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_json

FULL = {"a_tokens": (8, 64), "b_tokens": 8, "c_tokens": 64, "d_tokens": 16, "d_layer": 1, "n_layers": None,
        "components": ("resid",)}
QUICK = {"a_tokens": (4,), "b_tokens": 4, "c_tokens": 8, "d_tokens": 8, "d_layer": 1, "n_layers": 4,
         "components": ("resid", "attn", "mlp")}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms from ``/proc/self/statm`` (MB)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak_mb = 0.0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> "PeakRSS":
        self._start = self._peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mb = round((self._peak - self._start) / 2**20, 1)


def measure(row: dict, fn):
    """Run ``fn()`` once; store seconds and peak RSS (MB above start) in ``row``; return its result."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        row["seconds"] = round(time.perf_counter() - t0, 2)
    row["peak_mb"] = mem.peak_mb
    print(f"  {row['case']}: {row['method']}: {row['seconds']} s, peak +{row['peak_mb']} MB", flush=True)
    return out


def load_smollm2(n_layers: int | None):
    from transformers import AutoModelForCausalLM

    from toolkit.models.weights import SMOLLM2, converted_folder
    model = AutoModelForCausalLM.from_pretrained(str(converted_folder(SMOLLM2)), dtype=torch.float32).eval()
    if n_layers is not None:  # smoke-test setting: the first n blocks, then the final norm
        model.model.layers = model.model.layers[:n_layers]
        model.config.num_hidden_layers = n_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:n_layers]
    return model


def warm_up(model) -> None:
    """One small VJP and one small JVP pass, so that no case pays for first-call allocations."""
    from toolkit.jacobian.compute import detached_jacobian
    from toolkit.jacobian.matrix_free import jacobian_svd
    detached_jacobian(model, prompt(2))
    jacobian_svd(model, prompt(2), k=2, max_blocks=1)


def prompt(n_tokens: int) -> torch.Tensor:
    """A fixed prompt of ``n_tokens`` ids (WikiText-like ids are not needed for timing)."""
    return torch.arange(1000, 1000 + n_tokens)


def case_output_jacobian(model, n_tokens: int, chunk_size: int = 64) -> list[dict]:
    from toolkit.jacobian.compute import detached_jacobian, input_embeddings, target_function
    from toolkit.jacobian.freeze import detached

    ids = prompt(n_tokens)
    x, f = input_embeddings(model, ids), target_function(model)
    ours: dict = {"case": f"(a) output J, T={n_tokens}", "method": f"chunked VJP (detached_jacobian, chunk {chunk_size})"}
    r = measure(ours, lambda: detached_jacobian(model, ids, chunk_size=chunk_size))

    def afj(sdpa: bool):
        with detached(model):
            if sdpa:
                model.config._attn_implementation = "sdpa"  # restored by the freeze on exit
            return torch.autograd.functional.jacobian(f, x, vectorize=True)

    rows = [ours]
    for sdpa in (False, True):
        row = {"case": ours["case"], "method": "autograd.functional.jacobian(vectorize=True)"
               + (", frozen SDPA forward" if sdpa else ", same frozen forward")}
        ref = measure(row, lambda: afj(sdpa))
        row["max_abs_diff"] = float((ref.movedim(0, 1) - r.jacobian).abs().max())
        row["speedup_ours"] = round(row["seconds"] / ours["seconds"], 2)
        rows.append(row)
        del ref
    ours["reconstruction_error"] = float(f"{r.reconstruction_error:.2e}")
    return rows


def case_all_layers(model, n_tokens: int, components, chunk_size: int = 64) -> list[dict]:
    from toolkit.jacobian.all_layers import all_layer_jacobians

    ids = prompt(n_tokens)
    rows, results = [], {}
    for mode in ("forward", "reverse"):
        row = {"case": f"(b) all layers {'+'.join(components)}, T={n_tokens}", "method": f"{mode} mode"}
        results[mode] = measure(row, lambda: all_layer_jacobians(model, ids, components=components, mode=mode,
                                                                 chunk_size=chunk_size))
        s = results[mode].settings
        row["products"] = s["n_tangents"] if mode == "forward" else s["n_rows"]
        row["n_targets"] = len(results[mode].names)
        rows.append(row)
    fwd, rev = results["forward"], results["reverse"]
    rows[1]["max_rel_diff"] = max(float((fwd[n].jacobian - rev[n].jacobian).abs().max() / rev[n].jacobian.abs().max())
                                  for n in fwd.names)
    rows[1]["speedup_forward"] = round(rows[1]["seconds"] / rows[0]["seconds"], 2)
    rows[0]["auto_choice"] = fwd.settings["auto_choice"]
    rows[0]["max_reconstruction_error"] = max(r.reconstruction_error for r in fwd.results.values())
    return rows


def case_top_svd(model, n_tokens: int, k: int = 8, chunk_size: int = 64) -> list[dict]:
    from toolkit.jacobian.compute import detached_jacobian
    from toolkit.jacobian.matrix_free import jacobian_svd

    ids = prompt(n_tokens)
    formed: dict = {"case": f"(c) top-{k} SVD of [J_1..J_T], T={n_tokens}", "method": "form J (VJPs), then SVD"}

    def form():
        J = detached_jacobian(model, ids, chunk_size=chunk_size).jacobian
        M = J.permute(1, 0, 2).reshape(J.shape[1], -1)  # [d_out, T * d]
        return M, torch.linalg.svdvals(M)[:k]

    M, _ = measure(formed, form)
    reference = torch.linalg.svdvals(M.double())[:k]  # float64, outside the timing
    formed["products"] = f"{M.shape[0]} VJP"
    rows = [formed]
    for tol in (1e-5, 1e-4):  # the default, and the accuracy the target asks for
        free: dict = {"case": formed["case"], "method": f"matrix-free block Krylov (JVP + VJP), tol {tol:g}"}
        top = measure(free, lambda: jacobian_svd(model, ids, k=k, chunk_size=chunk_size, tol=tol))
        free["products"] = f"{top.n_jvp} JVP + {top.n_vjp} VJP"
        free["top8_max_rel_err"] = float(f"{float(((top.singular_values - reference).abs() / reference).max()):.1e}")
        free["speedup_vs_formed"] = round(formed["seconds"] / free["seconds"], 2)
        rows.append(free)
    return rows


def case_layer_svd(model, n_tokens: int, layer: int, k: int = 8, chunk_size: int = 64) -> list[dict]:
    """(d) top-k SVD of block ``layer``'s full transform (``T*d x T*d``, cross-token blocks included)."""
    from toolkit.jacobian.matrix_free import jacobian_svd, randomized_svd
    from toolkit.jacobian.operator import basis, frozen_operator
    from toolkit.jacobian.targets import resolve_target, state_function, target_input

    ids = prompt(n_tokens)
    target = f"layer.{layer}"
    case = f"(d) top-{k} SVD of block {layer}'s full transform, T={n_tokens}"
    formed: dict = {"case": case, "method": "form J (JVP columns), then its top-k SVD (block Krylov, tol 1e-6)"}

    def form():
        spec = resolve_target(model, target)
        x = target_input(model, ids, spec)
        with frozen_operator(model, state_function(model, spec, input_ids=ids, position=None), x,
                             chunk_size=chunk_size) as op:
            m, n = op.shape
            Jt = torch.empty(n, m)                      # J^T, filled column block by column block
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                Jt[s:e] = op.jvp(basis(n, s, e).reshape(-1, *op.in_shape)).reshape(e - s, -1)
        S, _, _, info = randomized_svd(lambda V: Jt.T @ V, lambda U: Jt @ U, (m, n), k, tol=1e-6, max_blocks=40)
        return S, m, info

    S_formed, m, info = measure(formed, form)
    formed["products"] = f"{m} JVP, then {info['n_matvec']} + {info['n_rmatvec']} dense products"
    rows = [formed]
    free: dict = {"case": case, "method": "matrix-free block Krylov (JVP + VJP), tol 0.0001"}
    top = measure(free, lambda: jacobian_svd(model, ids, target=target, position=None, k=k, chunk_size=chunk_size,
                                             tol=1e-4))
    free["products"] = f"{top.n_jvp} JVP + {top.n_vjp} VJP"
    free["top8_max_rel_err"] = float(f"{float(((top.singular_values - S_formed).abs() / S_formed).max()):.1e}")
    free["speedup_vs_formed"] = round(formed["seconds"] / free["seconds"], 2)
    rows.append(free)
    return rows


def run(out_dir: Path, quick: bool = False, threads: int | None = None) -> list[dict]:
    """All three cases; prints a table and writes ``jacobian.json`` in ``out_dir``."""
    setting = QUICK if quick else FULL
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = load_smollm2(setting["n_layers"])
        warm_up(model)
        rows: list[dict] = []
        settings = {"model": "smollm2-135m" + (f" (first {setting['n_layers']} layers)" if setting["n_layers"] else ""),
                    "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(), "quick": quick,
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()}}
        cases = [lambda n=n: case_output_jacobian(model, n) for n in setting["a_tokens"]]
        cases += [lambda: case_all_layers(model, setting["b_tokens"], setting["components"]),
                  lambda: case_top_svd(model, setting["c_tokens"]),
                  lambda: case_layer_svd(model, setting["d_tokens"], setting["d_layer"])]
        for case in cases:  # the JSON is rewritten after each case: a stopped run keeps what it measured
            rows += case()
            write_json(out_dir, "jacobian" + ("_quick" if quick else ""), rows, settings)
        print_table(rows)
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="first 4 layers, short prompts (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    run(Path(args.out), quick=args.quick, threads=args.threads)


if __name__ == "__main__":
    main()
