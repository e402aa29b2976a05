"""``python -m toolkit models``: known models, the backend serving each, and whether weights are here."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list known models and where their weights are",
                              description=__doc__)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from toolkit.models.registry import DEFAULT_MODEL, REGISTRY
    rows = [(e.name + (" (default)" if e.name == DEFAULT_MODEL else ""), e.hub_id, e.family, e.backend,
             "yes" if e.weights_available() else "no", e.note) for e in REGISTRY]
    header = ("name", "hub id", "family", "backend", "weights here", "note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    from toolkit.families import family_status, format_family_table
    print("\nfamilies:\n" + format_family_table(family_status()))
    return 0
