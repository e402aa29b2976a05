"""``python -m toolkit check-freeze MODEL``: the freeze audit of :func:`toolkit.jacobian.audit.check_freeze`.

Prints every module class with the rule that freezes it (``--all-modules``: every module by path)
and the pass/fail table of the checks on a probe prompt; exit status 0 when all pass, 1 when a
check fails, 2 when module kinds have no rule (all named in one message).

Example:
    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> args = add_parser(sub).parse_args(["smollm2-135m", "--prompt", "Hello there"])
    >>> args.model, args.prompt, args.all_modules
    ('smollm2-135m', 'Hello there', False)
"""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``check-freeze`` on ``subparsers``; its ``func`` is :func:`run`."""
    p = subparsers.add_parser("check-freeze", help="audit the detached-Jacobian freeze on a model (run this first)")
    p.add_argument("model", help="registry name, hub id or local folder")
    p.add_argument("--prompt", default=None, help="probe prompt (default: 'The bridge out of Marin is the')")
    p.add_argument("--backend", default=None, help="transformer_lens (tl) or nnsight; default by architecture")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--all-modules", action="store_true", help="list every module by path, not one line per class")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import toolkit
    from toolkit.jacobian.audit import check_freeze
    from toolkit.jacobian.freeze import UnsupportedModuleError
    model = toolkit.load_model(args.model, backend=args.backend, dtype=args.dtype, device=args.device)
    try:
        audit = check_freeze(model, prompt=args.prompt)
    except UnsupportedModuleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(audit)
    if args.all_modules:
        for m in audit.modules:
            print(f"  {m.path or '<root>'}  {m.cls}  {m.kind}  {m.rule}")
    return 0 if audit.passed else 1
