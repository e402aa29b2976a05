"""Controls of the decomposition's summaries: size confounding, robust summaries, chance levels.

* :func:`partial_spearman`: Spearman's rho of RelErr and KL after removing (by least squares on
  ranks) what the update's relative size ``||Δ|| / ||h_{l+1}||`` and the identity's KL explain,
  within each layer; a bootstrap interval (anchors resampled within layers) and a permutation
  p-value (residual ranks of KL shuffled within layers).
* :func:`mean_with_ci`: the mean with a percentile bootstrap interval (paired differences too).
* :func:`robust`: median and 10% trimmed mean beside the mean.
* :func:`chance_abs_cos`: ``E|cos|`` of two independent random directions in ``d`` dimensions.
* :func:`layer_controls` / :func:`pooled_controls`: the per-layer and pooled numbers a result stores.

Example:
    >>> rng = np.random.default_rng(0); size = rng.random(300)
    >>> rel_err = size + 0.05 * rng.random(300); kl = size ** 2 + 0.05 * rng.random(300)
    >>> round(partial_spearman(rel_err, kl, [size], n_boot=100, n_perm=100)["plain_rho"], 1)
    1.0
    >>> abs(partial_spearman(rel_err, kl, [size], n_boot=100, n_perm=100)["rho"]) < 0.2
    True
"""
from __future__ import annotations

import numpy as np
from scipy import special, stats

from toolkit.decompose.statistics import resampled_ranks

__all__ = ["partial_spearman", "mean_with_ci", "robust", "chance_abs_cos", "r_squared", "layer_controls",
           "pooled_controls", "TRIM"]

#: Fraction cut from each end for the trimmed means.
TRIM = 0.1


def chance_abs_cos(d: int) -> float:
    """``E|cos|`` of two independent uniformly random directions in ``R^d``: ``Γ(d/2) / (√π Γ((d+1)/2))``.

    Example:
        >>> round(chance_abs_cos(2), 4), round(chance_abs_cos(576), 4)     # 2/π in the plane
        (0.6366, 0.0333)
    """
    return float(np.exp(special.gammaln(d / 2) - special.gammaln((d + 1) / 2)) / np.sqrt(np.pi))


def mean_with_ci(x, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of the finite values of ``x`` with a percentile bootstrap interval.

    Example:
        >>> r = mean_with_ci(np.arange(100.0), n_boot=200)
        >>> r["ci_low"] < r["mean"] == 49.5 < r["ci_high"]
        True
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return {"mean": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(x.size)}


def robust(x) -> dict:
    """Mean, median and ``TRIM`` trimmed mean of the finite values of ``x``.

    Example:
        >>> robust([1.0, 2.0, 3.0, 1000.0])["median"]
        2.5
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "trimmed_mean": float("nan")}
    return {"mean": float(x.mean()), "median": float(np.median(x)), "trimmed_mean": float(stats.trim_mean(x, TRIM))}


def r_squared(err_fit, err_mean, norm_y) -> float:
    """Held-out ``R² = 1 - Σ||Δ - Δ̂||² / Σ||Δ - mean Δ||²`` from per-anchor RelErrs and ``||h_{l+1}||``
    (``||Δ - Δ̂|| = RelErr · ||h_{l+1}||``); ``mean Δ`` is the training mean update.

    Example:
        >>> r_squared([0.1, 0.1], [0.2, 0.2], [1.0, 1.0])
        0.75
    """
    fit = np.asarray(err_fit, np.float64) * np.asarray(norm_y, np.float64)
    base = np.asarray(err_mean, np.float64) * np.asarray(norm_y, np.float64)
    return float(1 - (fit ** 2).sum() / max((base ** 2).sum(), 1e-300))


def _residualise(r: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Residuals of ``r [..., n]`` after least squares on ``[1, z] [..., n, p]`` (batched)."""
    Z = np.concatenate([np.ones(z.shape[:-1] + (1,)), z], axis=-1)
    coef = np.linalg.lstsq(Z, r[..., None], rcond=None)[0] if Z.ndim == 2 else \
        np.linalg.solve(Z.swapaxes(-1, -2) @ Z + 1e-9 * np.eye(Z.shape[-1]), Z.swapaxes(-1, -2) @ r[..., None])
    return r - (Z @ coef)[..., 0]


def _rank_residuals(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank residuals of x and y given the covariate ranks, along the last axis (batched over leading axes)."""
    rz = np.stack([stats.rankdata(c, axis=-1) for c in np.moveaxis(z, -1, 0)], axis=-1) if z.shape[-1] else z
    return _residualise(stats.rankdata(x, axis=-1), rz), _residualise(stats.rankdata(y, axis=-1), rz)


def _resampled_rank_residuals(x: np.ndarray, y: np.ndarray, z: np.ndarray,
                              idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_rank_residuals(x[idx], y[idx], z[idx])`` for resamples ``idx [B, m]`` of ``x, y [n]``, ``z [n, p]``,
    with the ranks counted rather than sorted (:func:`toolkit.decompose.statistics.resampled_ranks`)."""
    rz = np.stack([resampled_ranks(c, idx) for c in z.T], axis=-1) if z.shape[-1] else z[idx]
    return _residualise(resampled_ranks(x, idx), rz), _residualise(resampled_ranks(y, idx), rz)


def _corr(ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    ex = ex - ex.mean(-1, keepdims=True)
    ey = ey - ey.mean(-1, keepdims=True)
    den = np.sqrt((ex ** 2).sum(-1) * (ey ** 2).sum(-1))
    return np.where(den > 0, (ex * ey).sum(-1) / np.where(den > 0, den, 1), np.nan)


def partial_spearman(x, y, covariates, strata=None, n_boot: int = 1000, n_perm: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Partial Spearman rho of ``x`` and ``y`` given ``covariates`` (list of arrays), within ``strata``.

    Within each stratum (layer) the ranks of ``x`` and ``y`` are regressed on the covariates'
    ranks; the rho is the correlation of the pooled residuals. Interval: percentile bootstrap,
    anchors resampled within strata. p-value: the residual ranks of ``y`` permuted within strata
    (two-sided, ``(1 + #|perm| >= |obs|) / (1 + n_perm)``). Also returns the plain Spearman rho
    pooled the same way (no covariates), for comparison.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    z = np.stack([np.asarray(c, np.float64).reshape(-1) for c in covariates], axis=-1) if len(covariates) \
        else np.zeros((x.size, 0))
    strata = np.zeros(x.size, int) if strata is None else np.asarray(strata).reshape(-1)
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(z).all(1)
    x, y, z, strata = x[keep], y[keep], z[keep], strata[keep]
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    groups = [g for g in groups if g.size > z.shape[1] + 2]
    if not groups:
        nan = float("nan")
        return {"rho": nan, "ci_low": nan, "ci_high": nan, "p_perm": nan, "plain_rho": nan, "n": 0}
    rng = np.random.default_rng(seed)
    ex, ey, px, py, bx, by, bpx, bpy, perm_y = [], [], [], [], [], [], [], [], []
    for g in groups:
        a, b = _rank_residuals(x[g], y[g], z[g])
        ex.append(a); ey.append(b)
        pa, pb = _rank_residuals(x[g], y[g], z[g][:, :0])
        px.append(pa); py.append(pb)
        idx = rng.integers(0, g.size, size=(n_boot, g.size))
        a, b = _resampled_rank_residuals(x[g], y[g], z[g], idx)
        bx.append(a); by.append(b)
        perm_y.append(ey[-1][rng.random((n_perm, g.size)).argsort(axis=1)])
    ex, ey = np.concatenate(ex), np.concatenate(ey)
    rho = float(_corr(ex, ey))
    boots = _corr(np.concatenate(bx, axis=1), np.concatenate(by, axis=1))
    perms = _corr(ex[None], np.concatenate(perm_y, axis=1))
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(boots, [alpha, 1 - alpha])
    p = (1 + int((np.abs(perms) >= abs(rho) - 1e-12).sum())) / (1 + n_perm)
    return {"rho": rho, "ci_low": float(lo), "ci_high": float(hi), "p_perm": float(p),
            "plain_rho": float(_corr(np.concatenate(px), np.concatenate(py))), "n": int(ex.size)}


def _covariates(a: dict, sel: np.ndarray) -> list[np.ndarray]:
    """The size covariates: the update's relative size, and the identity's KL when measured."""
    out = [a["rel_err_identity"][sel]]
    if "kl_identity" in a and np.isfinite(a["kl_identity"][sel]).any():
        out.append(a["kl_identity"][sel])
    return out


def layer_controls(a: dict, sel: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """The controls of one layer's anchors ``sel``: baselines beside the fitted map, robust summaries,
    R², massive anchors, and the partial Spearman of RelErr and KL given the update's size.

    Example:
        >>> rng = np.random.default_rng(0); n = 60
        >>> a = {"rel_err": rng.random(n), "kl": rng.random(n), "rel_err_identity": rng.random(n),
        ...      "rel_err_mean_update": np.ones(n), "norm_y": np.ones(n), "massive": np.zeros(n, bool)}
        >>> row = layer_controls(a, np.ones(n, bool), n_boot=50)
        >>> row["r2"] < 1 and row["n_massive"] == 0 and -1 <= row["partial_rho"] <= 1
        True
    """
    row: dict = {}
    normal = sel & ~a["massive"].astype(bool)
    for name in ("rel_err", "kl", "update_err", "rel_err_identity", "kl_identity"):
        if name in a:
            for stat, v in robust(a[name][sel]).items():
                row[f"{name}_{stat}"] = v
            row[f"{name}_mean_no_massive"] = float(np.nanmean(a[name][normal])) if normal.any() else float("nan")
    for name in ("rel_err_mean_update", "rel_err_global", "rel_err_random_nb", "update_err_global",
                 "update_err_random_nb", "update_err_mean_update", "abs_cos_full_tok_global",
                 "abs_cos_res_tok_global", "abs_cos_full_tok_mean_update", "abs_cos_res_tok_mean_update"):
        if name in a:
            row[f"{name}_mean"] = float(np.nanmean(a[name][sel]))
    for tag, s in (("", sel), ("_no_massive", normal)):
        row[f"r2{tag}"] = r_squared(a["rel_err"][s], a["rel_err_mean_update"][s], a["norm_y"][s]) if s.any() \
            else float("nan")
        if "rel_err_global" in a and s.any():
            row[f"r2_global{tag}"] = r_squared(a["rel_err_global"][s], a["rel_err_mean_update"][s], a["norm_y"][s])
    row["n_massive"] = int((sel & a["massive"].astype(bool)).sum())
    part = partial_spearman(a["rel_err"][sel], a["kl"][sel], _covariates(a, sel), n_boot=n_boot,
                            n_perm=n_boot, seed=seed)
    row.update({"partial_rho": part["rho"], "partial_rho_ci_low": part["ci_low"],
                "partial_rho_ci_high": part["ci_high"], "partial_rho_p_perm": part["p_perm"]})
    return row


def pooled_controls(a: dict, d: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """Pooled controls over all layers: partial Spearman within layers, chance levels, robust
    summaries with and without massive anchors, and the baselines' means.

    Example:
        >>> rng = np.random.default_rng(0); n = 60
        >>> a = {"layer": np.arange(n) % 2, "rel_err": rng.random(n), "kl": rng.random(n),
        ...      "rel_err_identity": rng.random(n), "massive": np.zeros(n, bool)}
        >>> c = pooled_controls(a, d=576, n_boot=50)
        >>> c["n_anchors"], round(c["chance_abs_cos"], 4)
        (60, 0.0333)
    """
    every = np.ones(a["layer"].size, bool)
    part = partial_spearman(a["rel_err"], a["kl"], _covariates(a, every), strata=a["layer"], n_boot=n_boot,
                            n_perm=n_boot, seed=seed)
    out = {"partial_rho_within_layers": part, "chance_abs_cos": chance_abs_cos(d),
           "n_massive": int(a["massive"].astype(bool).sum()), "n_anchors": int(a["layer"].size)}
    normal = ~a["massive"].astype(bool)
    for name in ("rel_err", "kl", "update_err", "rel_err_identity", "kl_identity", "rel_err_global",
                 "rel_err_random_nb", "rel_err_mean_update"):
        if name in a:
            out[name] = robust(a[name]) | {"mean_no_massive": float(np.nanmean(a[name][normal]))}
    return out
