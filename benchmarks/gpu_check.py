"""Both analyses on CUDA, in float32 and bfloat16: ``make gpu-check`` (``python -m benchmarks.gpu_check``).

For SmolLM2-135M and Qwen2.5-Coder-1.5B (when its weights are installed), for each dtype, on one
GPU (``device="cuda"``) and placed by accelerate (``device_map="auto"``):

* the decomposition pipeline (all layers, 64 training / 16 test texts of 128 tokens, lowrank k=64 r=64,
  random control, no MLP comparison) -- its timings per stage and the median per-layer rho;
* the detached Jacobian of the output at 64 tokens (chunked VJPs) with its reconstruction error;
* the matrix-free top-8 SVD of the same map (block Krylov from JVPs and VJPs);
* steering at two thirds of the depth, 8 new tokens;

printing seconds and peak CUDA memory (``torch.cuda.max_memory_allocated``) for each, and writing
``gpu_check.json``. Without a CUDA device it stops at once with a message saying so (exit code 2).
``--cpu-smoke`` runs the same code on the CPU at a tiny size, to check the script itself where no
GPU is at hand.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

MODELS = ("smollm2-135m", "qwen2.5-coder-1.5b")
DTYPES = ("float32", "bfloat16")
PLACEMENTS = ("device", "device_map")
SIZE = {"n_train": 64, "n_test": 16, "seq_len": 128, "tokens": 64, "new_tokens": 8}
SMOKE = {"n_train": 8, "n_test": 2, "seq_len": 32, "tokens": 4, "new_tokens": 2}
NO_CUDA = ("gpu-check: no CUDA device is visible (torch.cuda.is_available() is False). Run it on a machine "
           "with an NVIDIA GPU and a CUDA build of torch; `--cpu-smoke` checks the script on the CPU.")


def step(record: dict, key: str, fn, device: str):
    """Run ``fn`` and store ``{key}_s`` and, on CUDA, ``{key}_peak_mb`` (peak allocated during the call)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
        record[f"{key}_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record[f"{key}_s"] = round(time.perf_counter() - t0, 2)
    return out


def check_model(name: str, dtype: str, placement: str, size: dict, device: str) -> dict:
    import toolkit
    from toolkit.decompose.pipeline import decompose
    from toolkit.jacobian.compute import detached_jacobian
    from toolkit.jacobian.matrix_free import jacobian_svd
    from toolkit.jacobian.steering import steer

    row: dict = {"model": name, "dtype": dtype, "placement": placement}
    kwargs = {"device": device} if placement == "device" else {"device_map": "auto" if device == "cuda" else "cpu"}
    model = step(row, "load", lambda: toolkit.load_model(name, dtype=dtype, **kwargs), device)
    row["devices"] = sorted({str(v) for v in (getattr(model.hf_model, "hf_device_map", None) or
                                              {"": str(model.device)}).values()})
    result = step(row, "decompose", lambda: decompose(
        model, "wikitext-test", n_train=size["n_train"], n_test=size["n_test"], seq_len=size["seq_len"],
        compare_mlp=False, n_boot=100, progress=False, use_cache=False), device)
    rhos = [r["rho"] for r in result.layer_summary]
    row["rho_median"] = round(float(torch.tensor(rhos).median()), 3)
    ids = torch.arange(1000, 1000 + size["tokens"])
    jac = step(row, "jacobian", lambda: detached_jacobian(model.hf_model, ids), device)
    row["reconstruction_error"] = float(f"{jac.reconstruction_error:.1e}")
    del jac
    top = step(row, "svd", lambda: jacobian_svd(model.hf_model, ids, k=8, tol=1e-4), device)
    row["svd_products"] = f"{top.n_jvp} JVP + {top.n_vjp} VJP"
    layer = max(1, 2 * model.n_layers // 3)
    steered = step(row, "steer", lambda: steer(model, "The bridge out of Marin is the Golden",
                                               "I am going to see the", layer=layer, lam=2.0,
                                               max_new_tokens=size["new_tokens"]), device)
    row["steered"] = steered.steered.text
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run the same steps on the CPU, tiny sizes")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from benchmarks.common import print_table, write_json
    from toolkit.models.registry import find_entry

    device, size = ("cpu", SMOKE) if args.cpu_smoke else ("cuda", SIZE)
    rows: list[dict] = []
    for name in args.models:
        entry = find_entry(name)
        if entry is None or not entry.weights_available():
            rows.append({"model": name, "status": "not installed"})
            continue
        for dtype in DTYPES:
            for placement in PLACEMENTS:
                print(f"-- {name} {dtype} {placement}", flush=True)
                rows.append(check_model(name, dtype, placement, size, device))
                write_json(Path(args.out), "gpu_check" + ("_cpu_smoke" if args.cpu_smoke else ""), rows,
                           {"device": device, **size,
                            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None})
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
