"""Static PNGs of the key figures for the README gallery (Plotly static export through kaleido).

Runs both analyses on the embedded default model (SmolLM2-135M, offline) at a small scale and
writes, into ``--out`` (default: this folder):

* ``rel_err_kl_scatter.png``      RelErr vs KL per token, colour = block (decomposition, Figure 2b)
* ``layerwise_rho.png``           Spearman rho(RelErr, KL) per block with bootstrap 95% intervals (Figure 2c)
* ``projection_fractions.png``    energy in the local map's top-k singular directions vs k/d (Figure 4)
* ``jacobian_reconstruction.png`` y vs sum_i J_i x_i + c, detached and ordinary Jacobian
* ``jacobian_singular_spectra.png`` singular values of J_i per input token
* ``jacobian_decoded_tokens.png`` singular vectors decoded to tokens
* ``manifest.json``               settings, headline numbers and timings of the run that made them

Needs ``kaleido`` (``pip install kaleido``, the ``assets`` extra) and a Chromium it can drive
(Debian: ``apt-get install -y chromium``; kaleido finds ``/usr/bin/chromium``).

Usage::

    .venv/bin/python assets/make_assets.py                # about 5-10 minutes on a 2-core CPU
    .venv/bin/python assets/make_assets.py --quick        # fewer blocks and texts, for a check
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WIDTH, HEIGHT, SCALE = 1000, 560, 2


def _export(fig, path: Path, width: int = WIDTH, height: int = HEIGHT) -> Path:
    fig.update_layout(width=width, height=height, margin=dict(l=70, r=40, t=70, b=90))
    fig.write_image(str(path), width=width, height=height, scale=SCALE)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="output folder (default: assets/)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="The bridge out of Marin is the")
    parser.add_argument("--quick", action="store_true", help="a few blocks and texts: a fast check of the pipeline")
    args = parser.parse_args(argv)

    try:
        import kaleido  # noqa: F401
    except ImportError:
        parser.error("plotly's static export needs kaleido: pip install kaleido (and a Chromium, e.g. "
                     "apt-get install -y chromium)")
    import toolkit
    from toolkit.decompose.pipeline import decompose
    from toolkit.jacobian.analysis import analyze_with_model
    from toolkit.jacobian.through_backend import backend_jacobian
    from toolkit.plots import decomposition as dfigs
    from toolkit.plots import jacobian as jfigs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = toolkit.load_model(args.model, backend="nnsight")

    # ----- decomposition -------------------------------------------------------------------------
    if args.quick:
        settings = dict(layers=[3, 15, 27], n_train=24, n_test=6, seq_len=48, per_text=4, k=32, rank=16)
    else:
        settings = dict(layers=list(range(0, model.n_layers, 3)), n_train=64, n_test=16, seq_len=96, per_text=6,
                        k=64, rank=32)
    result = decompose(model, "embedded", function_class="lowrank", form="plain", compare_mlp=False,
                       random_control=True, n_boot=500, progress=True, **settings)
    t_dec = time.perf_counter() - t0
    _export(dfigs.rel_err_kl_scatter(result), out / "rel_err_kl_scatter.png")
    _export(dfigs.layerwise_rho(result), out / "layerwise_rho.png")
    _export(dfigs.projection_fractions(result), out / "projection_fractions.png")

    # ----- detached Jacobian ---------------------------------------------------------------------
    t1 = time.perf_counter()
    ids = model.to_tokens(args.prompt)[0]
    det = backend_jacobian(model, ids, chunk_size=96)
    ordinary = backend_jacobian(model, ids, detached=False, chunk_size=96)
    analysis = analyze_with_model(det, model, top_k=5, n_vectors=3)
    t_jac = time.perf_counter() - t1
    _export(jfigs.reconstruction_scatter(det, ordinary), out / "jacobian_reconstruction.png")
    _export(jfigs.singular_spectra(analysis, max_rank=100), out / "jacobian_singular_spectra.png")
    table = jfigs.decoded_tokens_table(analysis)
    # the table scrolls in a browser; a PNG needs room for every row
    _export(table, out / "jacobian_decoded_tokens.png", width=1400, height=300 + 120 * len(analysis.str_tokens))

    pooled = result.model_summary["rho_pooled"]
    manifest = {"model": model.info.model_id, "backend": model.name, "corpus": "embedded",
                "decomposition": {**{k: v for k, v in settings.items()}, "function_class": "lowrank", "form": "plain",
                                  "rho_pooled": round(pooled["rho"], 3),
                                  "rho_95ci": [round(pooled["ci_low"], 3), round(pooled["ci_high"], 3)],
                                  "kl_ratio_residual_vs_random":
                                      round(result.model_summary["kl_ratio_residual_vs_random"], 2)},
                "jacobian": {"prompt": args.prompt, "tokens": analysis.str_tokens,
                             "reconstruction_error_detached": det.reconstruction_error,
                             "reconstruction_error_ordinary": ordinary.reconstruction_error,
                             "last_token_left_top": [e["tokens"][0] for e in analysis.left[-1]]},
                "timings_s": {"decomposition": round(t_dec, 1), "jacobian": round(t_jac, 1),
                              "total": round(time.perf_counter() - t0, 1)}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
