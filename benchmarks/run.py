"""Run the benchmarks: ``python -m benchmarks.run [--only NAME] [--out DIR]`` (``make bench``)."""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

BENCHMARKS = ("collect", "decompose")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=BENCHMARKS, action="append")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    for name in args.only or BENCHMARKS:
        print(f"\n== {name} ==")
        importlib.import_module(f"benchmarks.{name}").run(Path(args.out))


if __name__ == "__main__":
    main()
