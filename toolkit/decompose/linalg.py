"""Batched eigendecompositions and SVDs run on one thread: the local fits' factorizations.

Why: this torch CPU build runs batched ``torch.linalg.eigh`` / ``svd`` of many small matrices
(the decomposition's ``[256, 64, 64]`` neighbourhood Gram matrices, ``[256, 64, 576]`` blocks)
far slower with several threads than with one: measured on the project's 2-core machine, eigh of
``[256, 64, 64]`` float64 took 1.6-2.7 s on 2 threads against 0.15-0.2 s on 1, and the SVD of
``[256, 64, 576]`` 40-45 s against 1.7-1.8 s (LAPACK's own threads fight the batch loop's, and
a busy machine makes the waiting worse). Single-threaded LAPACK gives the same factorization (up to
rounding) in a fraction of the time; everything else keeps the caller's thread count.

Example:
    >>> import torch
    >>> G = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    >>> n = torch.get_num_threads()
    >>> lam, _ = eigh(G)
    >>> lam.shape, torch.get_num_threads() == n
    (torch.Size([4, 3]), True)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["one_thread", "eigh", "svd"]

@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``; the previous count is restored afterwards.

    Example:
        >>> n = torch.get_num_threads()
        >>> with one_thread():
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == n
        True
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eigh(G: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(G)`` (``G [..., n, n]`` symmetric) on one thread: ``(eigenvalues [..., n]
    ascending, eigenvectors [..., n, n])``."""
    with one_thread():
        return torch.linalg.eigh(G)


def svd(A: Tensor, full_matrices: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(A, full_matrices)`` (``A [..., m, n]``) on one thread: ``(U, S, Vh)``."""
    with one_thread():
        return torch.linalg.svd(A, full_matrices=full_matrices)
