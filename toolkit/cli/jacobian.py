"""``python -m toolkit jacobian``: detached Jacobian of one prompt, its SVD, decoded tokens, a report.

Outputs in ``--out`` (default ``runs/jacobian``): ``jacobian.json``, ``detached_jacobian/`` and
``report.html`` (see :func:`toolkit.jacobian.run.run_jacobian`).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
    >>> _ = add_parser(sub)
    >>> args = parser.parse_args(["jacobian", "--layer", "3"])
    >>> args.layer, args.top_k, args.prompt
    ('3', 5, 'The bridge out of Marin is the')
"""
from __future__ import annotations

import argparse
from pathlib import Path

from toolkit.cli._args import add_model_args, load_model
from toolkit.jacobian.run import DEFAULT_PROMPT

_COMPONENTS = ("attn", "mlp", "layer", "block", "resid")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``jacobian`` on ``subparsers``; ``args.func(args)`` runs it.

    Example:
        >>> import argparse
        >>> add_parser(argparse.ArgumentParser().add_subparsers()).prog.endswith("jacobian")
        True
    """
    p = subparsers.add_parser("jacobian", help="detached Jacobian of a prompt: reconstruction, SVD, decoded tokens",
                              description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text whose last position is explained")
    p.add_argument("--layer", default="output",
                   help="target: 'output' (final-norm state), a boundary 'resid.l' (or the int l, 0..n_layers), or a "
                        "component: 'attn.l' / 'mlp.l' (block l's sublayer output), 'block.l' (block l's own "
                        "h_l -> h_{l+1}); TransformerLens hook names work too")
    p.add_argument("--top-k", type=int, default=5, help="decoded tokens per singular vector")
    p.add_argument("--n-vectors", type=int, default=3, help="singular vectors decoded per position")
    p.add_argument("--chunk-size", type=int, default=64, help="Jacobian rows per backward pass")
    p.add_argument("--out", default="runs/jacobian", help="output folder")
    route = p.add_mutually_exclusive_group()
    route.add_argument("--full", dest="route", action="store_const", const="full",
                       help="always form the dense Jacobian (refused if it would not fit in memory)")
    route.add_argument("--matrix-free", dest="route", action="store_const", const="matrix-free",
                       help="top-k SVD of the whole-prompt map without forming it (default for long prompts)")
    p.set_defaults(func=run, route="auto")
    return p


def parse_target(layer: str | int) -> str | int:
    """``'output'``, an int boundary or a component (``'attn.l'``, ``'mlp.l'``, ``'layer.l'``) from ``--layer``.

    Range checks happen later, against the model (:func:`toolkit.jacobian.targets.resolve_target`).

    Example:
        >>> parse_target("output"), parse_target("12"), parse_target("MLP.3")
        ('output', 12, 'mlp.3')
    """
    if isinstance(layer, int) or str(layer).lstrip("-").isdigit():
        return int(layer)
    text = str(layer).strip().lower()
    if text in ("output", "out", "final"):
        return "output"
    if text.startswith("blocks.") or text.startswith("ln_final."):  # a TransformerLens hook name
        return str(layer).strip()
    kind, _, index = text.partition(".")
    if kind in _COMPONENTS and index.isdigit():
        return f"{kind}.{int(index)}"
    raise ValueError(f"--layer must be 'output', a layer boundary (an integer) or a component "
                     f"('attn.l', 'mlp.l', 'layer.l' with a block index l), got {layer!r}.")


def run(args: argparse.Namespace) -> int:
    from toolkit.jacobian.report import format_summary
    from toolkit.jacobian.run import check_jacobian_settings, run_jacobian
    target = parse_target(args.layer)
    check_jacobian_settings(top_k=args.top_k, n_vectors=args.n_vectors, chunk_size=args.chunk_size)
    model = load_model(args)
    summary = run_jacobian(model, prompt=args.prompt, target=target, top_k=args.top_k, n_vectors=args.n_vectors,
                           chunk_size=args.chunk_size, out=args.out, route=args.route)
    print(format_summary(summary))
    written = ["jacobian.json"] + ([] if summary.get("route") == "matrix-free" else ["report.html"])
    print("wrote " + ", ".join(str(Path(args.out) / name) for name in written))
    return 0
