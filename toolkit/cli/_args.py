"""Arguments shared by several commands, and parsers of list-valued flags (``'0,5,10'``, ``'3-8'``).

Only argument handling lives here; every check of a value's meaning is the library's own
(the same message from the Python API and the command line).
"""
from __future__ import annotations

import argparse
import re
from typing import Sequence

_INT_OR_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--backend``, ``--dtype``, ``--device``."""
    p.add_argument("--model", default="smollm2-135m", help="registry name, hub id or local folder")
    p.add_argument("--backend", default=None, help="transformer_lens (tl) or nnsight; default by architecture")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_corpus_args(p: argparse.ArgumentParser, n_train: int, n_test: int) -> None:
    """The corpus and collection settings of ``collect`` and ``decompose``."""
    p.add_argument("--corpus", default="embedded",
                   help="embedded, wikitext-test (../shared file), wikitext103-validation (hub) or a text file path")
    p.add_argument("--encoding", default="utf-8", help="text encoding of a corpus file, e.g. latin-1 (default utf-8)")
    p.add_argument("--n-train", type=int, default=n_train, help="training texts")
    p.add_argument("--n-test", type=int, default=n_test, help="test texts")
    p.add_argument("--seq-len", type=int, default=192, help="tokens per text")
    p.add_argument("--per-text", type=int, default=8, help="sampled positions per text")
    p.add_argument("--layers", default=None, help="blocks, e.g. '0,5,10' or '3-8' (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)


def load_model(args: argparse.Namespace):
    """``toolkit.load_model`` from the model arguments (called after every cheap check)."""
    import toolkit
    return toolkit.load_model(args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                              remote=getattr(args, "remote", False))


def parse_int_list(spec: str | None, flag: str = "--layers", example: str = "'0,5,10' or '3-8'") -> list[int] | None:
    """``'0,5,10'``, ``'3-8'`` or ``'0,2-4'`` to a list of ints; ``None``, ``''`` and ``'all'`` to ``None``.

    Example:
        >>> parse_int_list("0,2-4")
        [0, 2, 3, 4]
        >>> parse_int_list("5-3")
        Traceback (most recent call last):
        ...
        ValueError: --layers '5-3': the range 5-3 is empty; write the lower end first: 3-5.
    """
    if spec is None or str(spec).strip() in ("", "all"):
        return None
    out: list[int] = []
    for part in (p.strip() for p in str(spec).split(",")):
        m = _INT_OR_RANGE.fullmatch(part)
        if m is None:
            negative = " (negative indices are not accepted: count from 0)" if part.startswith("-") else ""
            raise ValueError(f"{flag} {spec!r}: {part!r} is not a non-negative integer or a range lo-hi"
                             f"{negative}; write e.g. {example}.")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ValueError(f"{flag} {spec!r}: the range {part} is empty; write the lower end first: {hi}-{lo}.")
        out.extend(range(lo, hi + 1))
    return out


def parse_layers(spec: str | None) -> list[int] | None:
    """``--layers``: blocks ``0..n_layers-1`` as ``'0,5,10'``, ``'3-8'`` or ``'0,2-4'``; ``None``/``'all'``: all.

    Example:
        >>> parse_layers("0,3-5"), parse_layers("all")
        ([0, 3, 4, 5], None)
    """
    return parse_int_list(spec, "--layers", "'0,5,10' or '3-8' (blocks 0..n_layers-1; the last of 30 is 29)")


def parse_floats(values: Sequence[str] | str, flag: str = "--lam") -> list[float]:
    """``["0.5", "1,2"]`` -> ``[0.5, 1.0, 2.0]``; a clear error for anything that is not a number.

    Example:
        >>> parse_floats(["-1", "0.5,2"])
        [-1.0, 0.5, 2.0]
    """
    values = [values] if isinstance(values, str) else list(values)
    out = []
    for part in (p.strip() for v in values for p in str(v).split(",")):
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"{flag} must be numbers (e.g. {flag} 0.5 1 2), got {part!r}.") from None
    return out
