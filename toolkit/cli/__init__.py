"""Command line: ``python -m toolkit <command>`` (also installed as ``toolkit``).

Commands:
    models    list known models, the backend serving each, and whether weights are here
    collect   collect hidden states at layer boundaries for a corpus (cached on disk)
    decompose tokenwise decomposition of layer updates: fits, residual geometry, KL, report
    jacobian  detached Jacobian of a prompt: exact reconstruction, SVD decoded to tokens, report
    steer     steer generation with a concept prompt's detached Jacobian (eq. 16), side by side
    demo      the main job on the embedded default model and corpus, at a small scale
    check-freeze  audit the freeze on a model: every module's rule, exactness checks on a probe prompt

Bad input (an unknown model, a bad setting, a corpus that does not decode, ...) is reported as one
line, ``error: ...``, with exit status 2, before any model is loaded.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from toolkit.cli._args import parse_layers

# One module per command, ``toolkit/cli/<name>.py``, each with ``add_parser(subparsers)`` (which sets
# ``func``); a new command is one module and one name here.
COMMANDS = ("models", "collect", "decompose", "jacobian", "steer", "demo", "check-freeze")

__all__ = ["COMMANDS", "build_parser", "main", "parse_layers"]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m toolkit`` parser with every command of :data:`COMMANDS`.

    Example:
        >>> build_parser().parse_args(["jacobian", "--layer", "3"]).layer
        '3'
    """
    parser = argparse.ArgumentParser(prog="python -m toolkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"toolkit.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 with one ``error: ...`` line for bad input).

    Example:
        >>> main(["decompose", "--batch-size", "0"])       # refused before any model is loaded
        2
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError) as err:
        # Bad input: one clear line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
