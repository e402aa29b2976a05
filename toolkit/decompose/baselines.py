"""Null models of the decomposition, per test anchor: what a map with no local tokenwise structure gets.

For a block ``h_l -> h_{l+1}`` with ``x = h_l``, ``y = h_{l+1}``, the update ``Δ = y - x`` and the
fitted map's update ``Δ̂ = T(x) - x``, each baseline is another prediction of ``y``:

* identity        ``T(h) = h``: skips the update. Its RelErr is ``||Δ|| / ||y||``, the update's
  relative size, which bounds how small RelErr is *anyway* for any map of the update form.
* mean update     ``T(h) = h + mean Δ`` (training mean): the constant update, the denominator of
  the held-out ``R² = 1 - Σ||Δ - Δ̂||² / Σ||Δ - mean Δ||²``.
* global ridge    ``T(h) = h + W (h - mu) + b``, one affine map of the update fitted on all training
  pairs, ridge penalty chosen on held-out training texts (:func:`fit_global_ridge`): does locality
  add anything?
* random neighbourhoods: the same local class fitted on ``k`` random training rows instead of the
  ``k`` nearest: does the neighbourhood matter?

:func:`baseline_columns` returns the per-anchor columns the result stores; the identity's
replacement ``h_l`` is also patched in (one more variant in the intervention pass) for its KL.

Example:
    >>> import torch
    >>> X = torch.randn(400, 8, dtype=torch.float64); W = 0.3 * torch.randn(8, 8, dtype=torch.float64)
    >>> ridge = fit_global_ridge(X[:300], X[:300] + X[:300] @ W.T)
    >>> bool(torch.allclose(ridge.predict(X[300:]), X[300:] + X[300:] @ W.T, atol=1e-4))
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from toolkit.decompose.function_classes import LOCAL_CLASSES, fit_local_maps
from toolkit.decompose.geometry import cosine
from toolkit.decompose.linalg import eigh
from toolkit.metrics import relative_error

__all__ = ["GlobalRidgeMap", "fit_global_ridge", "random_neighbourhoods", "massive_flags", "baseline_columns",
           "MASSIVE_FACTOR", "RIDGE_GRID"]

#: An anchor is flagged massive when max(||h_l||, ||h_{l+1}||) exceeds this multiple of the layer's median.
MASSIVE_FACTOR = 10.0
#: Ridge penalties tried, as multiples of the mean eigenvalue of the centred training Gram matrix.
RIDGE_GRID = tuple(10.0 ** e for e in range(-6, 3))


@dataclass
class GlobalRidgeMap:
    """``T(h) = h + (h - mu) @ W + b``: one ridge-regularised affine map of the update for all tokens."""

    W: Tensor              # [d, d]
    b: Tensor              # [d], the mean update
    mu: Tensor             # [d], the mean input
    alpha: float           # the chosen penalty
    heldout_err: dict      # penalty -> held-out sum ||Δ - Δ̂||^2 / sum ||Δ - mean Δ||^2

    def predict(self, points: Tensor) -> Tensor:
        """``T(points)`` ``[M, d]``."""
        p = points.double()
        return (p + (p - self.mu) @ self.W + self.b).to(points.dtype)


def _ridge_solutions(X: Tensor, D: Tensor, scales: list[float]):
    """Centred ridge fits of ``D`` on ``X`` for each relative penalty: ``(mu, b, [W], mean eigenvalue)``."""
    mu, b = X.mean(0), D.mean(0)
    Xc, Dc = X - mu, D - b
    lam, V = eigh(Xc.T @ Xc)                                   # one eigendecomposition serves every penalty
    rhs = V.T @ (Xc.T @ Dc)
    unit = float(lam.clamp_min(0).mean())
    Ws = [V @ (rhs / (lam.clamp_min(0) + s * unit)[:, None]) for s in scales]
    return mu, b, Ws


def fit_global_ridge(train_X: Tensor, train_Y: Tensor, groups: Tensor | None = None, holdout: float = 0.2,
                     grid: tuple[float, ...] = RIDGE_GRID, seed: int = 0) -> GlobalRidgeMap:
    """One affine map of the update ``Y - X`` on ``X`` (ridge), the penalty chosen on held-out pairs.

    The held-out pairs are the rows of a seeded ``holdout`` fraction of ``groups`` (the training
    texts, so no text feeds both sides; default: each row its own group). The chosen penalty
    (from ``grid`` times the mean eigenvalue of the centred Gram matrix) is refitted on all pairs.
    Float64 throughout; the penalty's whole sweep costs one ``d x d`` eigendecomposition per fit.

    Example:
        >>> X = torch.randn(300, 6, dtype=torch.float64); Y = X + torch.randn(300, 6, dtype=torch.float64)
        >>> fit_global_ridge(X, Y).alpha >= 1.0            # pure noise: the strongest penalties win
        True
    """
    X, Y = train_X.double(), train_Y.double()
    D = Y - X
    n = X.shape[0]
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
    ids = groups.unique()
    g = torch.Generator().manual_seed(seed)
    held = ids[torch.randperm(ids.numel(), generator=g)[:max(1, int(round(holdout * ids.numel())))]]
    test = torch.isin(groups, held)
    if test.all() or (~test).sum() < 2:
        raise ValueError(f"fit_global_ridge needs training pairs from at least 2 groups; got {ids.numel()}.")
    mu, b, Ws = _ridge_solutions(X[~test], D[~test], list(grid))
    Dt = D[test]
    denom = float(((Dt - b) ** 2).sum()) or 1.0
    errs = {s: float(((Dt - b - (X[test] - mu) @ W) ** 2).sum()) / denom for s, W in zip(grid, Ws)}
    best = min(errs, key=errs.get)
    mu, b, (W,) = _ridge_solutions(X, D, [best])
    return GlobalRidgeMap(W, b, mu, best, errs)


def random_neighbourhoods(n_train: int, n_query: int, k: int, seed: int = 0) -> Tensor:
    """``[n_query, k]`` training rows drawn at random (distinct within a row): the random-neighbourhood control.

    Example:
        >>> random_neighbourhoods(100, 3, 5).shape
        torch.Size([3, 5])
    """
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_query, n_train, generator=g).argsort(dim=1)[:, :k]


def massive_flags(x: Tensor, y: Tensor, factor: float = MASSIVE_FACTOR) -> Tensor:
    """Anchors whose ``max(||h_l||, ||h_{l+1}||)`` exceeds ``factor`` times the median over the anchors.

    Example:
        >>> x = torch.ones(5, 2); x[0] *= 100
        >>> massive_flags(x, x).tolist()
        [True, False, False, False, False]
    """
    size = torch.maximum(x.norm(dim=1), y.norm(dim=1))
    return size > factor * size.median()


def _update_err(x: Tensor, y: Tensor, pred: Tensor) -> Tensor:
    """``||Δ - Δ̂|| / ||Δ||`` = ``||y - T(x)|| / ||y - x||`` per row."""
    return relative_error(pred - x, y - x, dim=-1)


def baseline_columns(train_X: Tensor, train_Y: Tensor, x: Tensor, y: Tensor, prediction: Tensor, *,
                     function_class: str, form: str, k: int, rank: int | None, train_groups: Tensor | None = None,
                     random_neighbours: bool = True, massive_factor: float = MASSIVE_FACTOR,
                     seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Per-anchor baseline columns for one layer, and the global ridge map's record.

    Args:
        train_X, train_Y: ``[N, d]`` training pairs; x, y: ``[M, d]`` test anchors; prediction: the
            fitted map's ``T(x)`` ``[M, d]``.
        train_groups: ``[N]`` the training text of each row (the ridge penalty's held-out split).
        random_neighbours: also fit the local class on random neighbourhoods (local classes only).
    Returns:
        ``(columns, info)``: columns named as in :mod:`toolkit.decompose.result` (``norm_*``,
        ``rel_err_{identity,mean_update,global,random_nb}``, ``update_err*``, alignment of the
        baselines' updates, ``massive``); info holds the ridge penalty and its held-out errors.

    Example:
        >>> X = torch.randn(300, 8, dtype=torch.float64); Y = X + 0.1 * torch.tanh(X)
        >>> cols, info = baseline_columns(X[:250], Y[:250], X[250:], Y[250:], X[250:], function_class="lowrank",
        ...                               form="update", k=32, rank=8)
        >>> bool(np.allclose(cols["update_err"], 1.0))       # T = identity explains none of the update
        True
    """
    xd, yd = x.double(), y.double()
    pred = prediction.double()
    mean_update = (train_Y.double() - train_X.double()).mean(0)
    ridge = fit_global_ridge(train_X, train_Y, train_groups, seed=seed)
    preds = {"mean_update": xd + mean_update, "global": ridge.predict(xd)}
    if random_neighbours and function_class in LOCAL_CLASSES:
        idx = random_neighbourhoods(train_X.shape[0], x.shape[0], k, seed=seed)
        rnd = fit_local_maps(train_X, train_Y, idx, x, function_class, form, rank, keep_singular=0)
        preds["random_nb"] = rnd.predictions.double()
    u = yd - xd
    cols = {"norm_x": xd.norm(dim=1), "norm_y": yd.norm(dim=1), "norm_update": u.norm(dim=1),
            "rel_err_identity": relative_error(xd, yd, dim=-1), "update_err": _update_err(xd, yd, pred)}
    for name, p in preds.items():
        cols[f"rel_err_{name}"] = relative_error(p, yd, dim=-1)
        cols[f"update_err_{name}"] = _update_err(xd, yd, p)
    for name in ("mean_update", "global"):
        t = preds[name] - xd
        cols[f"abs_cos_full_tok_{name}"] = cosine(u, t).abs()
        cols[f"abs_cos_res_tok_{name}"] = cosine(yd - preds[name], t).abs()
    out = {name: v.float().numpy() for name, v in cols.items()}
    out["massive"] = massive_flags(xd, yd, massive_factor).numpy()
    return out, {"ridge_alpha": ridge.alpha, "ridge_heldout_err": {f"{s:g}": e for s, e in ridge.heldout_err.items()}}
