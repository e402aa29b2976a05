"""Geometry of the decomposition at each test anchor: how the update splits into tokenwise and residual.

For an anchor with ``x = h_l``, ``y = h_{l+1}`` and the fitted tokenwise prediction ``T(x)``:

* full update        ``u = y - x``
* tokenwise update   ``t = T(x) - x``
* residual           ``r = y - T(x)``   (so ``u = t + r``)

Metrics, one value per anchor (all batched):

* ``rel_err = ||r|| / ||y||``. The denominator is ``||y|| = ||h_{l+1}||``, as in the paper, not
  ``||u||``: RelErr is small whenever the update is small relative to the state.
* ``cos_u_t``, ``cos_r_t``: signed cosines; ``abs_cos_*`` their absolute values; ``angle_*`` in
  degrees from the *signed* cosine, in [0, 180] (the acute angle between the lines is
  ``min(angle, 180 - angle) = arccos(|cos|)``).
* ``frac_{v}_top{k}`` for ``v`` in ``u, t, r``: fraction of ``||v||^2`` in the span of the top-k left
  singular vectors of the anchor's local map (``LocalFit.left_singular``: the map ``A`` for the
  plain form, the update map for the update form). A random direction scores ``k / d`` on
  average: ``baseline[k]``. If fewer than k vectors were kept (e.g. ``rank < k``) all kept are used.

Undefined values are NaN, not 0: a cosine or a fraction involving a zero vector (e.g. the residual
of an exact fit), so that means over anchors use ``nanmean`` deliberately.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0]]); y = torch.tensor([[1.0, 1.0]]); tx = torch.tensor([[1.0, 0.5]])
    >>> g = tokenwise_geometry(x, y, tx)
    >>> round(float(g.cos_u_t[0]), 4), round(float(g.angle_r_t[0]), 1)
    (1.0, 0.0)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from toolkit.metrics import relative_error

from toolkit.decompose.function_classes import LocalFit

__all__ = ["GeometryMetrics", "tokenwise_geometry", "cosine", "angle_degrees", "energy_fraction",
           "random_baseline", "relative_error"]


def _nan_where_zero(value: Tensor, denom: Tensor) -> Tensor:
    return torch.where(denom > 0, value / torch.where(denom > 0, denom, 1), torch.full_like(value, float("nan")))


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Signed cosine per row, clamped to [-1, 1]; NaN where either row is zero.

    Example:
        >>> cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, 0.0]]))
        tensor([-1.])
    """
    return _nan_where_zero((a * b).sum(-1), a.norm(dim=-1) * b.norm(dim=-1)).clamp(-1, 1)


def angle_degrees(cos: Tensor) -> Tensor:
    """Angle in degrees, [0, 180], from a signed cosine.

    Example:
        >>> angle_degrees(torch.tensor([0.0, -1.0]))
        tensor([ 90., 180.])
    """
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def energy_fraction(v: Tensor, left_singular: Tensor, k: int) -> Tensor:
    """Fraction of ``||v||^2`` in the span of the first ``k`` rows of ``left_singular`` ``[M, s, d]``.

    Rows must be orthonormal (singular vectors are). NaN where ``v`` is zero.

    Example:
        >>> basis = torch.eye(3)[None]                    # axes e1, e2, e3
        >>> energy_fraction(torch.tensor([[3.0, 4.0, 0.0]]), basis, k=1)
        tensor([0.3600])
    """
    vecs = left_singular[:, :k].to(v.dtype)
    coeff = (vecs @ v.unsqueeze(-1)).squeeze(-1)                     # [M, min(k, s)]
    return _nan_where_zero((coeff ** 2).sum(-1), (v ** 2).sum(-1)).clamp(max=1)


def random_baseline(k: int, d: int) -> float:
    """Expected energy fraction of a uniformly random direction in a fixed k-dim subspace: ``k / d``.

    Example:
        >>> random_baseline(8, 576)
        0.013888888888888888
    """
    return min(k, d) / d


@dataclass
class GeometryMetrics:
    """Per-anchor metrics, each a ``[M]`` tensor; ``energy`` keys look like ``"frac_u_top4"``."""

    rel_err: Tensor
    cos_u_t: Tensor
    abs_cos_u_t: Tensor
    angle_u_t: Tensor
    cos_r_t: Tensor
    abs_cos_r_t: Tensor
    angle_r_t: Tensor
    energy: dict[str, Tensor] = field(default_factory=dict)
    baseline: dict[int, float] = field(default_factory=dict)   # k -> k / d

    def as_dict(self) -> dict[str, Tensor]:
        """Flat ``name -> [M]`` dict of every per-anchor metric (baselines excluded)."""
        out = {name: getattr(self, name) for name in ("rel_err", "cos_u_t", "abs_cos_u_t", "angle_u_t",
                                                       "cos_r_t", "abs_cos_r_t", "angle_r_t")}
        out.update(self.energy)
        return out


def tokenwise_geometry(x: Tensor, y: Tensor, fit: LocalFit | Tensor, left_singular: Tensor | None = None,
                       top_k: tuple[int, ...] = (1, 4, 8)) -> GeometryMetrics:
    """All metrics of the module docstring for anchors ``x -> y`` and their tokenwise predictions.

    Args:
        x, y: ``[M, d]`` ``h_l`` and ``h_{l+1}`` of the test anchors.
        fit: a :class:`LocalFit` for these anchors, or the predictions ``T(x)`` ``[M, d]``.
        left_singular: ``[M, s, d]`` singular vectors; defaults to ``fit.left_singular``. Without
            any, the energy fractions are skipped.
        top_k: the k of the energy fractions.

    Example:
        >>> X = torch.randn(300, 16, dtype=torch.float64); Y = X + 0.1 * torch.sin(3 * X)
        >>> from toolkit.decompose.function_classes import fit_tokenwise
        >>> fit = fit_tokenwise(X[:250], Y[:250], X[250:], "lowrank", k=64, rank=8, form="update")
        >>> g = tokenwise_geometry(X[250:], Y[250:], fit)
        >>> sorted(g.energy)[:2], g.baseline[4]
        (['frac_r_top1', 'frac_r_top4'], 0.25)
    """
    pred = fit.predictions if isinstance(fit, LocalFit) else fit
    if left_singular is None and isinstance(fit, LocalFit):
        left_singular = fit.left_singular
    if x.ndim != 2 or x.shape != y.shape or x.shape != pred.shape:
        raise ValueError(f"x, y and the predictions must all be [M, d] with the same shape; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)} and {tuple(pred.shape)}.")
    if left_singular is not None and (left_singular.ndim != 3 or left_singular.shape[0] != x.shape[0]
                                      or left_singular.shape[2] != x.shape[1]):
        raise ValueError(f"left_singular must be [M={x.shape[0]}, s, d={x.shape[1]}], got "
                         f"{tuple(left_singular.shape)}.")
    pred = pred.to(y.dtype)
    u, t, r = y - x, pred - x, y - pred
    cos_ut, cos_rt = cosine(u, t), cosine(r, t)
    energy: dict[str, Tensor] = {}
    if left_singular is not None:
        for name, v in (("u", u), ("t", t), ("r", r)):
            for k in top_k:
                energy[f"frac_{name}_top{k}"] = energy_fraction(v, left_singular, k)
    d = x.shape[1]
    return GeometryMetrics(rel_err=relative_error(pred, y, dim=-1), cos_u_t=cos_ut, abs_cos_u_t=cos_ut.abs(),
                           angle_u_t=angle_degrees(cos_ut), cos_r_t=cos_rt, abs_cos_r_t=cos_rt.abs(),
                           angle_r_t=angle_degrees(cos_rt), energy=energy,
                           baseline={k: random_baseline(k, d) for k in top_k})
