"""``python -m toolkit collect``: hidden states at layer boundaries for a corpus (cached on disk)."""
from __future__ import annotations

import argparse
import time

from toolkit.cli._args import add_corpus_args, add_model_args, load_model, parse_layers


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("collect", help="collect hidden states at layer boundaries (cached)",
                              description=__doc__)
    add_model_args(p)
    add_corpus_args(p, n_train=100, n_test=20)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from toolkit.collection.from_corpus import check_collection_settings, collect_from_corpus
    from toolkit.data import load_corpus
    layers = parse_layers(args.layers)
    check_collection_settings(n_train=args.n_train, n_test=args.n_test, seq_len=args.seq_len,
                              per_text=args.per_text, batch_size=args.batch_size, layers=layers)
    corpus = load_corpus(args.corpus, encoding=args.encoding)
    model = load_model(args)
    t0 = time.perf_counter()
    train, test = collect_from_corpus(model, corpus, n_train=args.n_train, n_test=args.n_test,
                                      seq_len=args.seq_len, per_text=args.per_text, layers=layers,
                                      seed=args.seed, batch_size=args.batch_size)
    elapsed = time.perf_counter() - t0
    print(f"{model!r}\ncollected {train.meta['n_texts']} train + {test.meta['n_texts']} test texts, "
          f"{len(train.boundaries)} boundaries, in {elapsed:.1f} s")
    print(f"train store: {train.directory}\ntest store:  {test.directory}")
    return 0
