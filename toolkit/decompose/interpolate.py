"""Interpolating local maps across anchors: the map at a query is a weighted mix of nearby anchors' maps.

Each anchor ``a`` owns a local map ``T_a`` fitted on its k training neighbours. A query ``h`` is
served by its ``n_anchors`` most cosine-similar anchors with weights ``w_a`` that sum to one:

    T_interp(h) = sum_a w_a T_a(h)

This is implemented on predictions, not on matrices: every (query, anchor) pair refits ``T_a``
from ``a``'s neighbourhood and applies it to ``h`` inside the same chunk, so no d x d map is ever
stored (the price is ``n_anchors`` fits per query). For linear maps this equals applying the
weighted average map, because ``sum_a w_a (A_a h + c_a) = (sum_a w_a A_a) h + sum_a w_a c_a``.

Weights from cosine distance ``dist = 1 - cos`` (in [0, 2]):

* ``"softmax"`` (default): ``w = softmax(-dist / temperature)``; ``temperature=0.05`` halves the
  weight of an anchor about 0.035 further away in cosine than the nearest. ``temperature -> 0`` is
  nearest-anchor only, large temperatures tend to the plain average.
* ``"inverse"``: ``w ∝ 1 / (dist + eps)``; a query that coincides with an anchor takes that anchor's map.

Spectral metrics (top singular vectors) are not defined here -- the mixed map is never formed --
so :class:`InterpolatedFit` carries predictions only; use the per-anchor :class:`LocalFit` for them.

Example:
    >>> import torch
    >>> X = torch.randn(600, 16, dtype=torch.float64); Y = X @ torch.randn(16, 16, dtype=torch.float64)
    >>> fit = interpolate_maps(X[:500], Y[:500], X[500:550], X[550:], "lowrank", k=40, n_anchors=3)
    >>> bool(torch.allclose(fit.predictions, Y[550:]))      # every anchor's map is the true W
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from toolkit.decompose.function_classes import LOCAL_CLASSES, Form, fit_local_maps
from toolkit.decompose.neighbours import check_pairs, knn_cosine

__all__ = ["InterpolatedFit", "distance_weights", "interpolate_maps"]


@dataclass
class InterpolatedFit:
    """``predictions[q] = sum_j weights[q, j] * T_{anchors[q, j]}(query_X[q])``."""

    predictions: Tensor     # [M, d]
    anchors: Tensor         # [M, n_anchors] indices into anchor_X, most similar first
    weights: Tensor         # [M, n_anchors], rows sum to 1
    function_class: str
    form: str
    rank: int | None
    k: int


def distance_weights(similarities: Tensor, weighting: Literal["softmax", "inverse"] = "softmax",
                     temperature: float = 0.05, eps: float = 1e-8) -> Tensor:
    """Normalised weights ``[M, m]`` from cosine similarities ``[M, m]`` (module docstring).

    Example:
        >>> distance_weights(torch.tensor([[1.0, 0.9]]), temperature=0.1)
        tensor([[0.7311, 0.2689]])
    """
    dist = (1 - similarities).clamp_min(0)
    if weighting == "softmax":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        return torch.softmax(-dist / temperature, dim=-1)
    if weighting == "inverse":
        w = 1 / (dist + eps)
        return w / w.sum(-1, keepdim=True)
    raise ValueError(f"weighting must be 'softmax' or 'inverse', got {weighting!r}.")


def interpolate_maps(train_X: Tensor, train_Y: Tensor, anchor_X: Tensor, query_X: Tensor, function_class: str,
                     k: int = 64, n_anchors: int = 4, form: Form = "update", rank: int | None = None,
                     weighting: Literal["softmax", "inverse"] = "softmax", temperature: float = 0.05,
                     exclude_self: bool = False, chunk_size: int = 256, rcond: float | None = None,
                     knn_backend: str = "torch") -> InterpolatedFit:
    """Predict ``T_interp(query_X)`` from the local maps of the nearest anchors.

    Args:
        train_X, train_Y: ``[N, d]`` training pairs the anchors' maps are fitted on.
        anchor_X: ``[A, d]`` anchor states (each gets its ``k`` training neighbours).
        query_X: ``[M, d]`` where the interpolated map is evaluated.
        function_class: a local class (``"diag_local"``, ``"lowrank"``, ``"orthogonal"``).
        n_anchors: anchors mixed per query (``<= A``).
        exclude_self: anchors are the queries themselves (``anchor_X is query_X``) and a query may not
            use its own map (leave-one-out interpolation).
        weighting, temperature: see :func:`distance_weights`.

    Example:
        >>> X = torch.randn(300, 8, dtype=torch.float64)
        >>> fit = interpolate_maps(X[:250], 2 * X[:250], X[250:], X[250:], "diag_local", k=30, n_anchors=2)
        >>> bool(torch.allclose(fit.predictions, 2 * X[250:])), tuple(fit.weights.shape)
        (True, (50, 2))
    """
    check_pairs(train_X, train_Y)
    if function_class not in LOCAL_CLASSES:
        raise ValueError(f"interpolation mixes local maps; function_class must be one of {LOCAL_CLASSES}, got "
                         f"{function_class!r} (global classes have one map already).")
    d = train_X.shape[1]
    for name, t in (("anchor_X", anchor_X), ("query_X", query_X)):
        if t.ndim != 2 or t.shape[1] != d:
            raise ValueError(f"{name} must be [*, d={d}], got {tuple(t.shape)}.")
    anchor_nb, _ = knn_cosine(train_X, anchor_X, k, backend=knn_backend)                 # [A, k]
    which, sims = knn_cosine(anchor_X, query_X, n_anchors, exclude_self=exclude_self)   # [M, m]
    weights = distance_weights(sims, weighting, temperature).to(train_X.dtype)
    m = which.shape[1]
    # One row per (query, anchor) pair: anchor's neighbourhood, query's point.
    pair_points = query_X.to(train_X.dtype).repeat_interleave(m, dim=0)
    fit = fit_local_maps(train_X, train_Y, anchor_nb[which.reshape(-1)], pair_points, function_class, form,
                         rank, keep_singular=0, chunk_size=chunk_size, rcond=rcond)
    preds = (fit.predictions.view(-1, m, d) * weights.unsqueeze(-1)).sum(1)
    return InterpolatedFit(preds, which, weights, function_class, form, rank, k)
