"""Run the benchmarks: ``python -m benchmarks.run [--only NAME] [--out DIR] [--quick]`` (``make bench``)."""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
from pathlib import Path

BENCHMARKS = ("collect", "decompose", "jacobian", "families", "marin", "scaling")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=BENCHMARKS, action="append")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="fast smoke-test settings, where a benchmark has them")
    args = parser.parse_args()
    for name in args.only or BENCHMARKS:
        print(f"\n== {name} ==")
        run = importlib.import_module(f"benchmarks.{name}").run
        quick = {"quick": True} if args.quick and "quick" in inspect.signature(run).parameters else {}
        run(Path(args.out), **quick)


if __name__ == "__main__":
    main()
