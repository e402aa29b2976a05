"""``python -m toolkit steer``: steer a continuation with a concept prompt's detached Jacobian (eq. 16).

Outputs in ``--out`` (default ``runs/steer``): ``steering/`` (``toolkit.load``-able: both
continuations per ``(layer, λ)``, token ids, tracked-token log-probabilities per step, settings) and
``report.html`` (the λ × layer comparison figure and a table). Several ``--lam`` values (and several
``--layer`` values, e.g. ``20,25``) make a sweep.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
    >>> _ = add_parser(sub)
    >>> args = parser.parse_args(["steer", "--lam", "0.5", "1,2", "--layer", "20,25"])
    >>> parse_floats(args.lam), parse_ints(args.layer), args.max_new_tokens
    ([0.5, 1.0, 2.0], [20, 25], 20)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from toolkit.cli._args import add_model_args, load_model, parse_floats, parse_int_list

DEFAULT_CONCEPT = "The bridge out of Marin is the Golden"
DEFAULT_PROMPT = "I'm going to Arizona to see the"

__all__ = ["add_parser", "parse_floats", "parse_ints", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``steer`` on ``subparsers``; ``args.func(args)`` runs it.

    Example:
        >>> import argparse
        >>> add_parser(argparse.ArgumentParser().add_subparsers()).prog.endswith("steer")
        True
    """
    p = subparsers.add_parser("steer", help="steer generation with a concept prompt's detached Jacobian (eq. 16)",
                              description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--concept", default=DEFAULT_CONCEPT,
                   help="concept prompt whose detached Jacobian steers (best: one whose next token is the concept)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue, with and without steering")
    p.add_argument("--layer", default=None,
                   help="boundary 1..n_layers where the edit is added, or a list '20,25' (default: 2/3 of depth)")
    p.add_argument("--lam", nargs="+", default=["1.0"], help="weight λ, or several for a sweep: --lam 0.5 1 2")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated per continuation")
    p.add_argument("--operator", default="sum", choices=["sum", "last", "window"],
                   help="which concept Jacobian blocks act on the new embeddings (see toolkit.jacobian.steering)")
    p.add_argument("--track", nargs="*", default=None,
                   help="tokens whose probability is tracked (default: the concept's content tokens and next token)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step (reference)")
    p.add_argument("--out", default="runs/steer", help="output folder")
    p.set_defaults(func=run)
    return p


def parse_ints(value: str | int | None) -> list[int] | None:
    """``--layer``: ``"20,25"`` -> ``[20, 25]``; ``None`` stays ``None`` (the library's default layer).

    Example:
        >>> parse_ints("12"), parse_ints(None)
        ([12], None)
    """
    if value is None:
        return None
    try:
        return parse_int_list(str(value), "--layer", "'20' or '20,25'")
    except ValueError as err:
        raise ValueError(f"--layer must be an integer boundary or a list like '20,25' ({err})") from None


def run(args: argparse.Namespace) -> int:
    from toolkit.jacobian.steering import steering_sweep
    from toolkit.jacobian.steering_report import format_summary
    lams = parse_floats(args.lam)
    layers = parse_ints(args.layer)
    model = load_model(args)
    result = steering_sweep(model, args.concept, args.prompt, at=layers, lams=lams, max_new_tokens=args.max_new_tokens,
                            operator=args.operator, concept_tokens=args.track or None, use_cache=not args.no_cache)
    out = Path(args.out)
    result.save(out / "steering")
    result.report(out / "report.html")
    print(format_summary(result))
    print(f"wrote {out / 'steering'}, {out / 'report.html'}")
    return 0
