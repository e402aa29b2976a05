"""Command line: ``python -m toolkit <command>``.

Commands:
    models    list known models, the backend serving each, and whether weights are here
    collect   collect hidden states at layer boundaries for a corpus (cached on disk)
    decompose tokenwise decomposition of layer updates: fits, residual geometry, KL, report
    jacobian  detached Jacobian of a prompt: exact reconstruction, SVD decoded to tokens, report
    steer     steer generation with a concept prompt's detached Jacobian (eq. 16), side by side
    demo      the main job on the embedded default model and corpus, at a small scale
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name, hub id or local folder")
    p.add_argument("--backend", default=None, help="transformer_lens (tl) or nnsight; default by architecture")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _add_corpus_args(p: argparse.ArgumentParser, n_train: int, n_test: int) -> None:
    p.add_argument("--corpus", default="embedded",
                   help="embedded, wikitext-test (../shared file), wikitext103-validation (hub) or a text file path")
    p.add_argument("--n-train", type=int, default=n_train, help="training texts")
    p.add_argument("--n-test", type=int, default=n_test, help="test texts")
    p.add_argument("--seq-len", type=int, default=192, help="tokens per text")
    p.add_argument("--per-text", type=int, default=8, help="sampled positions per text")
    p.add_argument("--layers", default=None, help="blocks, e.g. '0,5,10' or '3-8' (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)


def parse_layers(spec: str | None) -> list[int] | None:
    """'0,5,10' or '3-8' or '0,2-4' to a list of ints; None stays None (all layers)."""
    if spec in (None, "", "all"):
        return None
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def cmd_models(args: argparse.Namespace) -> int:
    from toolkit.models.registry import DEFAULT_MODEL, REGISTRY
    rows = [(e.name + (" (default)" if e.name == DEFAULT_MODEL else ""), e.hub_id, e.family, e.backend,
             "yes" if e.weights_available() else "no", e.note) for e in REGISTRY]
    header = ("name", "hub id", "family", "backend", "weights here", "note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    from toolkit.models.families import family_status, format_family_table
    print("\nfamilies:\n" + format_family_table(family_status()))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    import toolkit
    from toolkit.collection.from_corpus import collect_from_corpus
    model = toolkit.load_model(args.model, backend=args.backend, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    train, test = collect_from_corpus(model, args.corpus, n_train=args.n_train, n_test=args.n_test,
                                      seq_len=args.seq_len, per_text=args.per_text, layers=parse_layers(args.layers),
                                      seed=args.seed, batch_size=args.batch_size)
    elapsed = time.perf_counter() - t0
    print(f"{model!r}\ncollected {train.meta['n_texts']} train + {test.meta['n_texts']} test texts, "
          f"{len(train.boundaries)} boundaries, in {elapsed:.1f} s")
    print(f"train store: {train.directory}\ntest store:  {test.directory}")
    return 0


def cmd_decompose(args: argparse.Namespace) -> int:
    import toolkit
    from toolkit.decompose.pipeline import decompose
    from toolkit.decompose.report import format_table, summary_rows, write_decomposition_report
    model = toolkit.load_model(args.model, backend=args.backend, dtype=args.dtype, device=args.device)
    result = decompose(model, args.corpus, layers=parse_layers(args.layers), function_class=args.function_class,
                       form=args.form, k=args.k, rank=args.rank, n_train=args.n_train, n_test=args.n_test,
                       seq_len=args.seq_len, per_text=args.per_text, seed=args.seed, compare_mlp=not args.no_mlp,
                       kl_positions=args.kl_positions, sweep_k=parse_layers(args.sweep_k) or (),
                       sweep_rank=parse_layers(args.sweep_rank) or (), batch_size=args.batch_size)
    out = Path(args.out)
    result.save(out)
    write_decomposition_report(result, out / "report.html")
    print(format_table(summary_rows(result)))
    pooled = result.model_summary["rho_pooled"]
    print(f"pooled rho {pooled['rho']:.3f} [{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}]; timings "
          f"{result.settings['timings']}\nwrote {out}/result.json, anchors.csv, anchors.npz, report.html")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from toolkit.demo import run_demo
    summary = run_demo(Path(args.out), model_name=args.model, backend=args.backend, n_train=args.n_train,
                       n_test=args.n_test)
    table = summary.pop("table")
    print(json.dumps(summary, indent=1))
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m toolkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list known models and where their weights are").set_defaults(func=cmd_models)
    p = sub.add_parser("collect", help="collect hidden states at layer boundaries (cached)")
    _add_model_args(p)
    _add_corpus_args(p, n_train=100, n_test=20)
    p.set_defaults(func=cmd_collect)
    p = sub.add_parser("decompose", help="tokenwise decomposition of layer updates (paper 1)")
    _add_model_args(p)
    _add_corpus_args(p, n_train=2000, n_test=500)
    p.add_argument("--function-class", default="lowrank",
                   help="lowrank, diag_local, diag_global, orthogonal or mlp")
    p.add_argument("--form", default="update", choices=["plain", "update"],
                   help="update: T(h) = h + A(h-mu) + b (default, matches the paper's RelErr range); plain: T(h) = Ah")
    p.add_argument("--k", type=int, default=64, help="nearest neighbours per anchor")
    p.add_argument("--rank", type=int, default=64, help="rank of the local map (lowrank)")
    p.add_argument("--no-mlp", action="store_true", help="skip the global MLP comparison")
    p.add_argument("--kl-positions", default="next", choices=["next", "later"])
    p.add_argument("--sweep-k", default=None, help="k values for Figure 5, e.g. '8,16,32,64'")
    p.add_argument("--sweep-rank", default=None, help="ranks for Figure 5, e.g. '4,8,16,32,64'")
    p.add_argument("--out", default="runs/decompose")
    p.set_defaults(func=cmd_decompose)
    from toolkit.jacobian.cli_command import add_jacobian_parser
    add_jacobian_parser(sub)
    from toolkit.jacobian.steer_command import add_steer_parser
    add_steer_parser(sub)
    p = sub.add_parser("demo", help="the main job on the embedded default, small scale")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--backend", default=None)
    p.add_argument("--n-train", type=int, default=48)
    p.add_argument("--n-test", type=int, default=12)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        # Bad input: one clear line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
