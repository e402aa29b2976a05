"""Exact k nearest neighbours by cosine similarity, the neighbourhoods the local maps are fitted on.

The paper picks, for each test anchor ``h_l``, the k training states most similar in cosine.
Brute force is exact and cheap at the sizes involved (a few thousand training states, d <= 2048):
queries are processed in chunks so the ``[chunk, N]`` similarity block bounds memory.
Optional FAISS backends for much larger training sets (imported lazily; ``pip install faiss-cpu``
or the ``faiss`` extra): ``backend="faiss"`` is exact (``IndexFlatIP`` on normalised vectors),
``backend="faiss-ivf"`` is approximate (``IndexIVFFlat``: the training states are clustered into
about sqrt(N) cells and each query searches only the ``nprobe`` nearest cells, so a query costs
about ``nprobe * sqrt(N)`` similarities instead of ``N``; with ``nprobe`` equal to the number
of cells it is exact again).

Example:
    >>> import torch
    >>> X = torch.randn(100, 16)
    >>> idx, sim = knn_cosine(X, X[:5], k=3)
    >>> idx[:, 0].tolist()        # each query is its own nearest neighbour
    [0, 1, 2, 3, 4]
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["knn_cosine", "check_pairs"]


def check_pairs(X: Tensor, Y: Tensor, name: str = "train") -> None:
    """Refuse pairs that are not two float matrices of the same shape ``[N, d]``.

    Example:
        >>> check_pairs(torch.zeros(4, 3), torch.zeros(4, 3))
    """
    if X.ndim != 2 or Y.ndim != 2 or X.shape != Y.shape:
        raise ValueError(f"{name}_X and {name}_Y must both be [N, d] with the same shape (h_l and h_{{l+1}} of "
                         f"the same tokens); got {tuple(X.shape)} and {tuple(Y.shape)}.")
    if not (X.is_floating_point() and Y.is_floating_point()):
        raise ValueError(f"{name}_X and {name}_Y must be floating point tensors, got {X.dtype} and {Y.dtype}.")


def _normalise(X: Tensor) -> Tensor:
    # eps keeps zero vectors at similarity 0 instead of NaN.
    return X / X.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny ** 0.5)


def _check_knn(train_X: Tensor, query_X: Tensor, k: int, exclude_self: bool) -> None:
    if train_X.ndim != 2 or query_X.ndim != 2:
        raise ValueError(f"train_X and query_X must be 2-D [N, d] and [M, d]; got {tuple(train_X.shape)} and "
                         f"{tuple(query_X.shape)}.")
    if train_X.shape[1] != query_X.shape[1]:
        raise ValueError(f"train_X and query_X must have the same width d; got {train_X.shape[1]} and "
                         f"{query_X.shape[1]}.")
    n = train_X.shape[0]
    if exclude_self and query_X.shape[0] != n:
        raise ValueError(f"exclude_self=True means query row i is training row i, so query_X needs N={n} rows; "
                         f"got {query_X.shape[0]}.")
    available = n - 1 if exclude_self else n
    if not 1 <= k <= available:
        raise ValueError(f"k={k} neighbours requested but only N={available} training points are available"
                         f"{' (self excluded)' if exclude_self else ''}; use 1 <= k <= {available} or collect "
                         f"more training states.")


def knn_cosine(train_X: Tensor, query_X: Tensor, k: int, exclude_self: bool = False,
               backend: Literal["torch", "faiss", "faiss-ivf"] = "torch", chunk_size: int = 1024,
               nprobe: int = 8) -> tuple[Tensor, Tensor]:
    """The ``k`` training rows most cosine-similar to each query row, most similar first.

    Args:
        train_X: ``[N, d]`` training states.
        query_X: ``[M, d]`` query states.
        k: neighbours per query, ``1 <= k <= N`` (``N - 1`` with ``exclude_self``).
        exclude_self: query row i is training row i and must not be its own neighbour
            (leave-one-out neighbourhoods on the training set).
        backend: ``"torch"`` (exact, chunked matmul + topk), ``"faiss"`` (exact ``IndexFlatIP``) or
            ``"faiss-ivf"`` (approximate inverted-file index, for large ``N``).
        chunk_size: queries per similarity block; memory is ``chunk_size * N`` floats.
        nprobe: cells searched per query with ``"faiss-ivf"`` (more is slower and closer to exact).

    Returns:
        ``(indices [M, k] int64, similarities [M, k])`` in descending similarity.

    Example:
        >>> X = torch.randn(50, 8)
        >>> idx, sim = knn_cosine(X, X, k=2, exclude_self=True)
        >>> bool((idx != torch.arange(50)[:, None]).all())
        True
    """
    _check_knn(train_X, query_X, k, exclude_self)
    if backend in ("faiss", "faiss-ivf"):
        return _knn_faiss(train_X, query_X, k, exclude_self, approximate=backend == "faiss-ivf", nprobe=nprobe)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch', 'faiss' or 'faiss-ivf', got {backend!r}.")
    dtype = torch.promote_types(train_X.dtype, query_X.dtype)
    train_n = _normalise(train_X.to(dtype))
    query_n = _normalise(query_X.to(dtype))
    out_idx, out_sim = [], []
    for start in range(0, query_n.shape[0], chunk_size):
        sim = query_n[start:start + chunk_size] @ train_n.T            # [c, N]
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -float("inf")
        s, i = sim.topk(k, dim=1)                                     # sorted, descending
        out_idx.append(i)
        out_sim.append(s)
    return torch.cat(out_idx), torch.cat(out_sim)


def _faiss_index(faiss, train_n, approximate: bool, nprobe: int):
    d, n = train_n.shape[1], train_n.shape[0]
    if not approximate:
        return faiss.IndexFlatIP(d)
    if nprobe < 1:
        raise ValueError(f"nprobe must be at least 1, got {nprobe}.")
    n_cells = max(1, min(int(round(n ** 0.5)), n // 39))  # faiss wants >= 39 training points per cell
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, n_cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 0  # reproducible clustering
    index.train(train_n)
    index.nprobe = min(nprobe, n_cells)
    return index


def _knn_faiss(train_X: Tensor, query_X: Tensor, k: int, exclude_self: bool, approximate: bool = False,
               nprobe: int = 8) -> tuple[Tensor, Tensor]:
    try:
        import faiss  # noqa: PLC0415 -- optional dependency, imported only when asked for
    except ImportError as err:
        raise ImportError("backend='faiss' needs the faiss package: pip install faiss-cpu (or the extra "
                          "'layerlens-toolkit[faiss]'), or use backend='torch', which is exact too.") from err
    train_n = _normalise(train_X.float()).cpu().contiguous().numpy()
    query_n = _normalise(query_X.float()).cpu().contiguous().numpy()
    index = _faiss_index(faiss, train_n, approximate, nprobe)
    index.add(train_n)
    sims, idx = index.search(query_n, k + int(exclude_self))
    idx_t, sim_t = torch.from_numpy(idx).long(), torch.from_numpy(sims)
    if exclude_self:
        # Drop the row's own index wherever it landed (ties can move it off position 0).
        keep = idx_t != torch.arange(idx_t.shape[0])[:, None]
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
        idx_t, sim_t = idx_t.gather(1, order), sim_t.gather(1, order)
    return idx_t.to(train_X.device), sim_t.to(device=train_X.device, dtype=train_X.dtype)
