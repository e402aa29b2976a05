"""``python -m toolkit decompose``: tokenwise decomposition of layer updates (fits, residual geometry, KL),
saved with a self-contained report."""
from __future__ import annotations

import argparse
from pathlib import Path

from toolkit.cli._args import add_corpus_args, add_model_args, load_model, parse_int_list, parse_layers


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("decompose", help="tokenwise decomposition of layer updates (paper 1)",
                              description=__doc__)
    add_model_args(p)
    add_corpus_args(p, n_train=2000, n_test=500)
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
    p.add_argument("--remote", nargs="?", const=True, default=False,
                   help="collect and intervene on NDIF (needs NDIF_API_KEY; fits stay local); "
                        "'--remote local' runs nnsight's simulation of a remote run here")
    p.add_argument("--out", default="runs/decompose")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from toolkit.data import load_corpus
    from toolkit.decompose.pipeline import check_decompose_settings, decompose
    from toolkit.decompose.report import format_summary, write_decomposition_report
    settings = dict(layers=parse_layers(args.layers), function_class=args.function_class, form=args.form, k=args.k,
                    rank=args.rank, n_train=args.n_train, n_test=args.n_test, seq_len=args.seq_len,
                    per_text=args.per_text, batch_size=args.batch_size,
                    sweep_k=parse_int_list(args.sweep_k, "--sweep-k", "'8,16,32,64'") or (),
                    sweep_rank=parse_int_list(args.sweep_rank, "--sweep-rank", "'4,8,16,32,64'") or ())
    check_decompose_settings(**settings)
    corpus = load_corpus(args.corpus, encoding=args.encoding)
    model = load_model(args)
    result = decompose(model, corpus, seed=args.seed, compare_mlp=not args.no_mlp, kl_positions=args.kl_positions,
                       **settings)
    out = Path(args.out)
    result.save(out)
    write_decomposition_report(result, out / "report.html")
    print(format_summary(result))
    print(f"wrote {out}/result.json, anchors.csv, anchors.npz, report.html")
    return 0
