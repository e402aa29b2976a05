"""``python -m toolkit demo``: the main job on the embedded default model and corpus, at a small scale
(:func:`toolkit.demo.run_demo`; ``make demo``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="the main job on the embedded default, small scale", description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--backend", default=None)
    p.add_argument("--n-train", type=int, default=48)
    p.add_argument("--n-test", type=int, default=12)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from toolkit.demo import run_demo
    summary = run_demo(Path(args.out), model_name=args.model, backend=args.backend, n_train=args.n_train,
                       n_test=args.n_test)
    table = summary.pop("table")
    print(json.dumps(summary, indent=1))
    print(table)
    return 0

