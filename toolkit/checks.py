"""Argument checks shared by the library's entry points.

The Python API and the command line refuse a bad value with the same message, naming the
argument (and its ``--flag``), the value and the fix, before any model is loaded or any
state collected.

Example:
    >>> positive_int("batch_size", 8, "texts per forward pass")
    8
    >>> positive_int("batch_size", 0, "texts per forward pass")
    Traceback (most recent call last):
    ...
    ValueError: batch_size (--batch-size) must be a positive integer (texts per forward pass), got 0; use 1 or more.
"""
from __future__ import annotations

import numbers


def flag(name: str) -> str:
    """The command-line flag of a Python argument name: ``n_test`` -> ``--n-test``.

    Example:
        >>> flag("top_k")
        '--top-k'
    """
    return "--" + name.replace("_", "-")


def positive_int(name: str, value, meaning: str = "") -> int:
    """``value`` as an ``int >= 1``, or a ``ValueError`` naming ``name`` (and its flag), the value and the fix.

    Example:
        >>> positive_int("top_k", 5)
        5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} ({flag(name)}) must be a positive integer{what}, got {value!r}; use 1 or more.")
    return int(value)


def block_indices(layers, name: str = "layers") -> list[int] | None:
    """Block indices as a list of ints ``>= 0`` (``None`` stays ``None``: all blocks).

    Ranges against a model's depth are checked where the model is known.

    Example:
        >>> block_indices([0, 5]), block_indices(None)
        ([0, 5], None)
    """
    if layers is None:
        return None
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
            raise ValueError(f"{name} ({flag(name)}): {layer!r} is not a block index; blocks are numbered "
                             f"0..n_layers-1 (the last block of a 30-block model is 29), e.g. '0,5,10' or '3-8'.")
        out.append(int(layer))
    return out
