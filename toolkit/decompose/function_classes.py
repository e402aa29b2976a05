"""Tokenwise maps fitted around each anchor: the restricted function classes of the decomposition.

A layer transition sends ``x = h_l`` to ``y = h_{l+1}``. A *tokenwise* map ``T`` sees one token's
state only; whatever of ``y`` it cannot produce, ``r = y - T(x)``, is attributed to mixing across
tokens (and to what the class cannot express). Around each test anchor ``x_a`` the map is fitted on
its k nearest training pairs (:func:`toolkit.decompose.neighbours.knn_cosine`) and applied to
``x_a`` itself, which is not among the training pairs.

Classes (``function_class``):

* ``"diag_local"``  per-anchor nonnegative diagonal map (per-dimension NNLS, closed form).
* ``"diag_global"`` one nonnegative diagonal map fitted on all training pairs.
* ``"lowrank"``     min-norm least squares on the neighbourhood, then truncated SVD to ``rank``
  (``rank=None``: no truncation, the plain min-norm least-squares map).
* ``"orthogonal"``  orthogonal Procrustes on the neighbourhood.
* ``"mlp"``         one global shallow MLP (the nonlinear tokenwise comparison), see :func:`fit_mlp`.

Two forms (``form``) of every class:

* ``"plain"``:  ``T(h) = A h``, as the paper's appendix A.4 writes it (``A`` fitted from Y on X).
* ``"update"``: ``T(h) = h + A (h - mu) + b``, the update ``Y - X`` fitted as an affine function of
  the centred neighbours (``mu`` = neighbourhood mean of X, ``b`` = mean update). Equivalently
  ``T(h) = mu_y + (I + A)(h - mu)``; ``A`` is the *update map*.

Which form matches the paper's RelErr (about 0.05-0.2 on Pythia-70m, its Figure 5)? The update
form, which is therefore the default. Measured on SmolLM2-135M (WikiText-2 test, 200 training /
50 test texts of 192 tokens, 8 positions each, lowrank k=64 r=64), median RelErr per layer:
update 0.105-0.318 (median over the 30 layers 0.21), plain 0.105-0.448 (median 0.38). The plain
form's floor comes from the span: with k=64 neighbours in d=576 dimensions, the min-norm
``A = Y^T pinv(X)^T`` is zero on everything orthogonal to the (at most) 64-dim span of the
neighbours, so the token-specific part of ``x_a`` outside that span is dropped from ``T(x_a)``
and the residual points against the tokenwise update. The update form carries ``x_a`` through
the identity and only has to explain the update ``y - x`` (whose norm is about 0.2-0.3 of
``||y||`` here), which is the question the paper asks: how much of the *layer update* is
tokenwise. The plain form stays available (``form="plain"``), as the appendix writes it.

Memory: a d x d map per anchor is never stored (4000 anchors x 576^2 floats is 5 GB). Each map
is applied to its point inside the chunk that fits it, and only its top ``keep_singular`` (<= 64)
left singular vectors are kept for the geometry metrics (:mod:`toolkit.decompose.geometry`).
Anchors are fitted in chunks (``chunk_size``, default 256) with batched ``torch.linalg`` calls.
Precision follows the input dtype; pass float64 for reference-precision fits.

Example:
    >>> import torch
    >>> X = torch.randn(500, 32, dtype=torch.float64); W = torch.randn(32, 32, dtype=torch.float64)
    >>> fit = fit_tokenwise(X, X @ W.T, X[:10] + 0.01, "lowrank", k=48, form="plain")
    >>> bool(torch.allclose(fit.predictions, (X[:10] + 0.01) @ W.T))
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from toolkit.decompose.linalg import eigh as _eigh1, svd as _svd1
from toolkit.decompose.neighbours import check_pairs, knn_cosine

__all__ = ["FUNCTION_CLASSES", "LOCAL_CLASSES", "FORMS", "MAX_KEEP_SINGULAR", "LocalFit", "GlobalDiagMap",
           "MLPMap", "fit_local_maps", "fit_global_diag", "fit_mlp", "fit_mlps", "fit_tokenwise"]

FunctionClass = Literal["diag_local", "diag_global", "lowrank", "orthogonal", "mlp"]
Form = Literal["plain", "update"]
FUNCTION_CLASSES: tuple[str, ...] = ("diag_local", "diag_global", "lowrank", "orthogonal", "mlp")
LOCAL_CLASSES: tuple[str, ...] = ("diag_local", "lowrank", "orthogonal")
FORMS: tuple[str, ...] = ("plain", "update")
MAX_KEEP_SINGULAR = 64


@dataclass
class LocalFit:
    """Predictions of the tokenwise maps and the spectra the geometry metrics need.

    ``predictions[a] = T_a(points[a])``. ``left_singular[a]`` holds (as rows) the top singular
    vectors of anchor a's *metric map*: ``A`` for the plain form, the update map ``A`` for the
    update form (``Q - I`` for orthogonal maps in both forms, since an orthogonal ``Q`` has all
    singular values 1 and no preferred directions). ``None`` when ``keep_singular=0``.
    """

    predictions: Tensor                    # [M, d]
    left_singular: Tensor | None           # [M, s, d], s <= keep_singular, rows orthonormal
    singular_values: Tensor | None         # [M, s], descending
    function_class: str
    form: str
    rank: int | None = None
    k: int | None = None
    neighbours: Tensor | None = field(default=None, repr=False)   # [M, k] training rows, local classes

    def tokenwise_update(self, points: Tensor) -> Tensor:
        """``T(x) - x`` for the points the maps were applied to."""
        return self.predictions - points


def _check_choice(function_class: str, form: str, rank: int | None, d: int, keep_singular: int) -> None:
    if function_class not in FUNCTION_CLASSES:
        raise ValueError(f"function_class must be one of {FUNCTION_CLASSES}, got {function_class!r}.")
    if form not in FORMS:
        raise ValueError(f"form must be 'plain' (T(h) = A h, the paper's) or 'update' (T(h) = h + A(h - mu) + b), "
                         f"got {form!r}.")
    if rank is not None and function_class != "lowrank":
        raise ValueError(f"rank applies to function_class='lowrank' only, got rank={rank} with {function_class!r}.")
    if rank is not None and not 1 <= rank <= d:
        raise ValueError(f"rank={rank} must be between 1 and d={d} (the map is d x d); use rank <= {d}.")
    if not 0 <= keep_singular <= MAX_KEEP_SINGULAR:
        raise ValueError(f"keep_singular={keep_singular} must be between 0 and {MAX_KEEP_SINGULAR} (memory: M x s x d).")


def effective_rank(function_class: str, form: str, rank: int | None, k: int, d: int) -> int | None:
    """The rank a local low-rank map really has: ``min(rank, k)`` (plain) or ``min(rank, k - 1)`` (update:
    centred neighbourhoods of ``k`` points span ``k - 1`` directions), at most ``d``; ``None`` where no
    rank applies (other classes) or none was asked (untruncated).

    Results record this, never a requested rank that did not apply (``--rank 32 --k 8`` fits rank 7).

    Example:
        >>> effective_rank("lowrank", "update", 32, k=8, d=64), effective_rank("lowrank", "plain", 4, k=8, d=64)
        (7, 4)
        >>> effective_rank("diag_local", "update", 32, k=8, d=64) is None
        True
    """
    if function_class != "lowrank" or rank is None:
        return None
    return min(rank, k - 1 if form == "update" else k, d)


def _svd(A: Tensor, full_matrices: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd`` computed in float64 and returned in ``A``'s dtype.

    Why: this torch CPU build's float32 batched SVD is pathologically slow on tall or wide blocks
    (``[96, 576, 64]``: 19 s in float32, 0.4 s in float64), and float64 is the more accurate anyway.
    """
    U, S, Vh = _svd1(A.double(), full_matrices=full_matrices)   # one thread: see toolkit.decompose.linalg
    return U.to(A.dtype), S.to(A.dtype), Vh.to(A.dtype)


def _gram_eigh(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, S)`` of any ``W`` from its Gram matrix ``G = W W^T`` (float64), descending: ``U`` the
    eigenvectors, ``S`` the square roots of the eigenvalues, those under 1e-6 of the largest returned
    as zero (see :func:`_thin_svd`)."""
    lam, U = _eigh1(G)                          # one thread: see toolkit.decompose.linalg
    S = lam.flip(-1).clamp_min(0).sqrt()
    return U.flip(-1), S * (S > 1e-6 * S[..., :1])


def _thin_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``A [b, m, n]``; from the m x m (or n x n) Gram matrix in float64 when ``A`` is float32.

    Why: the neighbourhood blocks are 64 x 576, and an eigendecomposition of the 64 x 64 Gram
    matrix is several times cheaper than an SVD of the block. Float64 Gram matrices resolve
    singular values down to about 1e-7 of the largest, far below float32's ``rcond`` (6.9e-5 at
    k=64, d=576); directions under 1e-6 of the largest are returned as zero (null rows of ``Vh``,
    or columns of ``U``). Float64 input, where ``rcond`` is far smaller, keeps the direct SVD.
    """
    if A.dtype == torch.float64:
        return _svd(A, full_matrices=False)
    tall = A.shape[-2] > A.shape[-1]
    W = (A.mT if tall else A).double()                                     # wide: [b, m, n], m <= n
    U, S = _gram_eigh(W @ W.mT)
    resolved = S > 0
    Vh = (U.mT @ W) * (resolved / torch.where(resolved, S, 1))[..., None]
    U, S, Vh = U.to(A.dtype), S.to(A.dtype), Vh.to(A.dtype)
    return (Vh.mT, S, U.mT) if tall else (U, S, Vh)


def _default_rcond(dtype: torch.dtype, k: int, d: int) -> float:
    # numpy.linalg.lstsq's default cut-off: singular values below eps * max(k, d) * s_max count as zero.
    return torch.finfo(dtype).eps * max(k, d)


def _one_hot_axes(diag: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Left singular vectors of ``diag(diag)`` [B, d]: coordinate axes ordered by |diag|."""
    s = min(s, diag.shape[-1])
    vals, idx = diag.abs().topk(s, dim=-1)
    vecs = torch.zeros(*diag.shape[:-1], s, diag.shape[-1], dtype=diag.dtype, device=diag.device)
    return vecs.scatter_(-1, idx.unsqueeze(-1), 1.0), vals


def _centre(Xn: Tensor, Yn: Tensor, P: Tensor, form: str):
    """Centred inputs/targets and the query point, per form; ``mu_x``/``mu_y`` are [B, 1, d] or None."""
    if form == "plain":
        return Xn, Yn, P, None, None
    mu_x, mu_y = Xn.mean(1, keepdim=True), Yn.mean(1, keepdim=True)
    return Xn - mu_x, Yn - mu_y, P - mu_x[:, 0], mu_x, mu_y


def _fit_diag_chunk(Xn, Yn, P, form, keep, rcond):
    Xc, Yc, inp, _, mu_y = _centre(Xn, Yn, P, form)
    # Separable NNLS: per dimension, the unconstrained slope clipped at 0 is the constrained optimum.
    num, den = (Xc * Yc).sum(1), (Xc * Xc).sum(1)
    D = torch.where(den > 0, (num / torch.where(den > 0, den, 1)).clamp_min(0), torch.zeros_like(num))
    pred = D * inp if form == "plain" else mu_y[:, 0] + D * inp
    metric = D if form == "plain" else D - 1          # update map A = D - I
    vecs, vals = _one_hot_axes(metric, keep) if keep else (None, None)
    return pred, vecs, vals


def _fit_lowrank_chunk(Xn, Tn, P, form, rank, keep, rcond):
    """``Tn``: the neighbours' targets, ``Y`` (plain form) or the updates ``Y - X`` (update form)."""
    if form == "plain":
        Xc, inp, offset = Xn, P, None
    else:
        mu_x = Xn.mean(1, keepdim=True)
        b = Tn.mean(1, keepdim=True)
        # With centred inputs the intercept decouples: b is the mean update, A fits the rest.
        Xc, Tn, inp, offset = Xn - mu_x, Tn - b, P - mu_x[:, 0], P + b[:, 0]
    # Min-norm LS: A = T^T pinv(X)^T = B Vh with X = U S V^T (thin, q = min(k, d)) and B = T^T U S^+.
    # Everything is applied through k-sized factors, never forming Vh or a d x d map:
    # A h = T^T M v with M = U S^+ and v = Vh h = S^+ U^T (X h).
    # Float64 throughout: X h and T T^T carry the residual stream's huge coordinates, and their
    # rounding would be amplified by S^+ (up to 1 / rcond); in float32 that cost ~1% of the residual.
    Xd, Td = Xc.double(), Tn.double()
    if Xc.dtype == torch.float64 or Xc.shape[-2] > Xc.shape[-1]:
        U, S, _ = _thin_svd(Xc)                                       # direct SVD, or the tall case
        U, S = U.double(), S.double()
    else:
        U, S = _gram_eigh(Xd @ Xd.mT)                                 # [b, k, q], [b, q]
    keep_s = S > rcond * S[:, :1]
    S_inv = torch.where(keep_s, 1 / torch.where(keep_s, S, 1), torch.zeros_like(S))
    M = U * S_inv[:, None, :]                                         # [b, k, q]
    v = S_inv * (U.mT @ (Xd @ inp.double().unsqueeze(-1))).squeeze(-1)   # [b, q]
    # B's SVD from its q x q Gram B^T B = M^T (T T^T) M: A = Pm diag(Sig) (E^T Vh), Pm = B E / Sig.
    E, Sig = _gram_eigh(M.mT @ (Td @ Td.mT) @ M)
    q = Sig.shape[1]
    r = q if rank is None else min(rank, q)                           # rank >= k truncates nothing
    if r < q:                                                         # truncated: project v on B's top r
        E_r = E[..., :r]
        v = (E_r @ (E_r.mT @ v.unsqueeze(-1))).squeeze(-1)
    lin = (Td.mT @ (M @ v.unsqueeze(-1))).squeeze(-1).to(Tn.dtype)
    pred = lin if offset is None else offset + lin
    s = min(keep, r)
    if not s:
        return pred, None, None
    Sig_s = Sig[:, :s]
    scale = torch.where(Sig_s > 0, 1 / torch.where(Sig_s > 0, Sig_s, 1), torch.zeros_like(Sig_s))
    Pm_s = Td.mT @ ((M @ E[..., :s]) * scale[:, None, :])             # [b, d, s]
    return pred, Pm_s.mT.to(Tn.dtype), Sig_s.to(Tn.dtype)


def _fit_orthogonal_chunk(Xn, Yn, P, form, keep, rcond):
    Xc, Yc, inp, _, mu_y = _centre(Xn, Yn, P, form)
    # Work in W = span(rows of X and Y) (dim m <= 2k): Q is fixed there and taken as identity outside.
    _, _, Bh = _svd(torch.cat([Xc, Yc], dim=1), full_matrices=False)   # [b, m, d]
    Xw, Yw = Xc @ Bh.mT, Yc @ Bh.mT
    Um, Sm, Vmh = _svd(Xw.mT @ Yw)                        # M = X^T Y, [b, m, m]
    det = Sm > rcond * Sm[:, :1]
    # Procrustes R (X R ~ Y) = U V^T on M's range; on its null space pick the orthogonal block
    # that maximises tr(R), i.e. R closest to the identity. N' has the null block V0^T U0 and 2*I on
    # the determined block (2 > any cosine), so its polar factor is block diagonal.
    null = (~det).to(Sm.dtype)
    U0, V0 = Um * null[:, None, :], Vmh.mT * null[:, None, :]
    N = V0.mT @ U0 + torch.diag_embed(2 * det.to(Sm.dtype))
    Un, _, Vnh = _svd(N)
    Z = Vnh.mT @ Un.mT
    C = torch.diag_embed(det.to(Sm.dtype)) + null[:, :, None] * Z * null[:, None, :]
    R = Um @ C @ Vmh                                                  # [b, m, m], Q_W = R^T
    Qm_minus_I = R.mT - torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    pw = (Bh @ inp.unsqueeze(-1))                                     # [b, m, 1]
    out = inp + (Bh.mT @ (Qm_minus_I @ pw)).squeeze(-1)              # Q h = h + B (Q_W - I) B^T h
    pred = out if form == "plain" else mu_y[:, 0] + out
    if not keep:
        return pred, None, None
    Ul, Sl, _ = _svd(Qm_minus_I)
    s = min(keep, Sl.shape[1])
    return pred, (Ul[..., :s].mT @ Bh), Sl[:, :s]


def fit_local_maps(train_X: Tensor, train_Y: Tensor, neighbours: Tensor, points: Tensor,
                   function_class: FunctionClass, form: Form = "update", rank: int | None = None,
                   keep_singular: int = 8, chunk_size: int = 256, rcond: float | None = None) -> LocalFit:
    """Fit one local map per row of ``neighbours`` and apply it to the matching row of ``points``.

    Args:
        train_X, train_Y: ``[N, d]`` training pairs ``(h_l, h_{l+1})``.
        neighbours: ``[M, k]`` training row indices of each anchor's neighbourhood.
        points: ``[M, d]`` where each map is evaluated (usually the anchors' own ``h_l``).
        function_class: ``"diag_local"``, ``"lowrank"`` or ``"orthogonal"``.
        form: ``"plain"`` or ``"update"`` (module docstring).
        rank: truncation rank for ``"lowrank"`` (``None``: untruncated). ``rank > d`` is refused;
            ``rank >= k`` (``k - 1`` in update form) truncates nothing, the map's rank is at most that.
        keep_singular: top left singular vectors kept per anchor for the metrics (0 to 64).
        chunk_size: anchors per batched solve; memory ~ ``chunk_size * k * d`` floats per buffer.
        rcond: relative cut-off for singular values treated as zero (default ``eps * max(k, d)``,
            as ``numpy.linalg.lstsq``).

    Returns:
        :class:`LocalFit` with ``predictions [M, d]``.

    Details per class (``D``, ``A`` are per anchor):
        diag_local: plain ``T(h) = D h``, ``D_jj = max(0, <x_j, y_j> / <x_j, x_j>)`` over the
            neighbourhood (exact per-dimension NNLS). update ``T(h) = mu_y + D (h - mu_x)`` with the
            same formula on centred ``x, y``: the constraint is ``D >= 0`` on the *whole* map acting on
            centred inputs, i.e. the update map ``A = D - I`` has diagonal ``>= -1`` (updates may shrink
            a coordinate, never flip it). Metric map: ``D`` (plain), ``D - I`` (update).
        lowrank: plain ``A = Y^T pinv(X)^T`` (min-norm argmin ``||X A^T - Y||``), truncated to
            ``rank`` by SVD. update: the same on ``(X - mu_x, (Y - X) - b)`` with ``b`` the mean update.
        orthogonal: plain ``T(h) = Q h``, ``Q`` orthogonal minimising ``||X Q^T - Y||``
            (``scipy.linalg.orthogonal_procrustes(X, Y) = Q^T``). update ``T(h) = mu_y + Q (h - mu_x)``
            with Procrustes on centred data. Where the neighbourhood leaves ``Q`` undetermined
            (rank-deficient ``X^T Y``, always when ``2k < d``) the solution closest to the identity is
            taken, so directions the neighbours never span pass through unchanged.

    Example:
        >>> X = torch.randn(300, 16, dtype=torch.float64); Y = 2 * X
        >>> idx, _ = knn_cosine(X, X[:4], k=32)
        >>> fit = fit_local_maps(X, Y, idx, X[:4], "diag_local")
        >>> bool(torch.allclose(fit.predictions, 2 * X[:4]))
        True
    """
    check_pairs(train_X, train_Y)
    d = train_X.shape[1]
    _check_choice(function_class, form, rank, d, keep_singular)
    if function_class not in LOCAL_CLASSES:
        raise ValueError(f"fit_local_maps fits local classes {LOCAL_CLASSES}; {function_class!r} is global: use "
                         f"fit_tokenwise, fit_global_diag or fit_mlp.")
    if neighbours.ndim != 2 or points.ndim != 2 or neighbours.shape[0] != points.shape[0] or points.shape[1] != d:
        raise ValueError(f"neighbours must be [M, k] and points [M, d={d}] with the same M; got "
                         f"{tuple(neighbours.shape)} and {tuple(points.shape)}.")
    k = neighbours.shape[1]
    if form == "update" and k < 2:
        raise ValueError("form='update' centres each neighbourhood, so it needs k >= 2 neighbours.")
    points = points.to(train_X.dtype)
    rcond = _default_rcond(train_X.dtype, k, d) if rcond is None else rcond
    preds, vecs, vals = [], [], []
    # lowrank's update form fits the updates: take them once, not per neighbourhood
    targets = train_Y - train_X if function_class == "lowrank" and form == "update" else train_Y
    for start in range(0, points.shape[0], chunk_size):
        idx = neighbours[start:start + chunk_size]
        Xn, Yn, P = train_X[idx], targets[idx], points[start:start + chunk_size]     # [b, k, d] x2, [b, d]
        if function_class == "diag_local":
            out = _fit_diag_chunk(Xn, Yn, P, form, keep_singular, rcond)
        elif function_class == "lowrank":
            out = _fit_lowrank_chunk(Xn, Yn, P, form, rank, keep_singular, rcond)
        else:
            out = _fit_orthogonal_chunk(Xn, Yn, P, form, keep_singular, rcond)
        preds.append(out[0]); vecs.append(out[1]); vals.append(out[2])
    has_vecs = vecs[0] is not None
    return LocalFit(predictions=torch.cat(preds),
                    left_singular=torch.cat(vecs) if has_vecs else None,
                    singular_values=torch.cat(vals) if has_vecs else None,
                    function_class=function_class, form=form, rank=effective_rank(function_class, form, rank, k, d),
                    k=k, neighbours=neighbours)


@dataclass
class GlobalDiagMap:
    """One nonnegative diagonal map for all tokens: ``D h`` (plain) or ``mu_y + D (h - mu_x)`` (update)."""

    diag: Tensor                 # [d], >= 0
    form: str
    mu_x: Tensor | None = None   # [d], update form
    mu_y: Tensor | None = None

    def predict(self, points: Tensor) -> Tensor:
        """``T(points)`` for ``[M, d]`` points."""
        points = points.to(self.diag.dtype)
        return self.diag * points if self.form == "plain" else self.mu_y + self.diag * (points - self.mu_x)

    def spectrum(self, n: int, keep: int) -> tuple[Tensor | None, Tensor | None]:
        """Top ``keep`` left singular vectors and values of the metric map, repeated for ``n`` anchors."""
        if not keep:
            return None, None
        metric = self.diag if self.form == "plain" else self.diag - 1
        vecs, vals = _one_hot_axes(metric[None], keep)
        return vecs.expand(n, -1, -1), vals.expand(n, -1)


def fit_global_diag(train_X: Tensor, train_Y: Tensor, form: Form = "plain") -> GlobalDiagMap:
    """Fit ``"diag_global"``: the per-dimension NNLS of :func:`fit_local_maps` on all training pairs.

    Example:
        >>> X = torch.randn(200, 8); m = fit_global_diag(X, 3 * X)
        >>> bool(torch.allclose(m.diag, torch.full((8,), 3.0)))
        True
    """
    check_pairs(train_X, train_Y)
    _check_choice("diag_global", form, None, train_X.shape[1], 0)
    Xc, Yc, _, mu_x, mu_y = _centre(train_X[None], train_Y[None], train_X[:1], form)
    num, den = (Xc * Yc).sum(1)[0], (Xc * Xc).sum(1)[0]
    D = torch.where(den > 0, (num / torch.where(den > 0, den, 1)).clamp_min(0), torch.zeros_like(num))
    if form == "plain":
        return GlobalDiagMap(D, form)
    return GlobalDiagMap(D, form, mu_x[0, 0], mu_y[0, 0])


@dataclass
class MLPMap:
    """A shallow MLP ``f`` on standardised inputs: ``T(h) = h + f(h)`` (update) or ``f(h)`` (plain).

    ``f(h) = out_mean + out_std * (W2 gelu(W1 (h - in_mean) / in_std + b1) + b2)``.
    """

    W1: Tensor        # [H, d]
    b1: Tensor        # [H]
    W2: Tensor        # [d, H]
    b2: Tensor        # [d]
    in_mean: Tensor   # [d]
    in_std: Tensor    # [d]
    out_mean: Tensor  # [d]
    out_std: Tensor   # [d]
    form: str
    final_loss: float = float("nan")

    def _pre(self, points: Tensor) -> Tensor:
        return ((points - self.in_mean) / self.in_std) @ self.W1.T + self.b1

    def predict(self, points: Tensor) -> Tensor:
        """``T(points)`` for ``[M, d]`` points."""
        points = points.to(self.W1.dtype)
        f = self.out_mean + self.out_std * (torch.nn.functional.gelu(self._pre(points)) @ self.W2.T + self.b2)
        return points + f if self.form == "update" else f

    def spectrum(self, points: Tensor, keep: int, chunk_size: int = 256) -> tuple[Tensor | None, Tensor | None]:
        """Top left singular vectors of ``f``'s Jacobian at each point (the metric map of the MLP).

        ``J = diag(out_std) W2 diag(gelu'(z)) W1 diag(1/in_std)``; its rank is at most H, so the SVD
        is taken of the ``d x H`` factor after a QR of the shared right factor.
        """
        if not keep:
            return None, None
        points = points.to(self.W1.dtype)
        right = self.W1 / self.in_std                                     # [H, d]
        Qr, Rr = torch.linalg.qr(right.T)                                 # right = Rr^T Qr^T
        vecs, vals = [], []
        for start in range(0, points.shape[0], chunk_size):
            z = self._pre(points[start:start + chunk_size])
            g = torch.special.ndtr(z) + z * torch.exp(-0.5 * z ** 2) / (2 * torch.pi) ** 0.5   # gelu'(z)
            left = (self.out_std[:, None] * self.W2)[None] * g[:, None, :]                   # [b, d, H]
            Ul, Sl, _ = _svd(left @ Rr.T, full_matrices=False)
            s = min(keep, Sl.shape[1])
            vecs.append(Ul[..., :s].mT); vals.append(Sl[:, :s])
        return torch.cat(vecs), torch.cat(vals)


def fit_mlp(train_X: Tensor, train_Y: Tensor, form: Form = "update", hidden: int = 256, steps: int = 500,
            lr: float = 1e-3, batch_size: int = 256, seed: int = 0) -> MLPMap:
    """Fit ``"mlp"``: one global shallow MLP (GELU, ``hidden`` units) on all training pairs.

    Choice: a single global network rather than one per anchor (k=64 pairs cannot train an MLP in
    d=576), trained with Adam for a fixed number of minibatch steps from a fixed seed, so results
    are reproducible and the cost is bounded (``steps * batch_size * d * hidden``). Inputs and
    targets are standardised per dimension because residual streams have a few huge coordinates.
    The target is the update ``y - x`` (``form="update"``, default) or ``y`` (``"plain"``).
    The global RNG is left untouched. :func:`fit_mlps` fits several layers' MLPs at once.

    Example:
        >>> X = torch.randn(512, 8)
        >>> m = fit_mlp(X, X + torch.tanh(X), steps=300, hidden=32)
        >>> rel_err = (m.predict(X) - X - torch.tanh(X)).norm() / (X + torch.tanh(X)).norm()
        >>> float(rel_err) < 0.2       # the identity map T(h) = h scores about 0.5 here
        True
    """
    return fit_mlps([(train_X, train_Y)], form, hidden, steps, lr, batch_size, seed)[0]


def fit_mlps(pairs: list[tuple[Tensor, Tensor]], form: Form = "update", hidden: int = 256, steps: int = 500,
             lr: float = 1e-3, batch_size: int = 256, seed: int = 0, progress: bool = False) -> list[MLPMap]:
    """:func:`fit_mlp` for several training sets of the same shape (one per layer), trained as one batch.

    Each network gets what :func:`fit_mlp` would give it on its own (the same initial weights and
    minibatch rows from the seed, a loss summed over networks so gradients do not mix, Adam
    elementwise), but the steps run as batched matrix products: one optimiser loop instead of
    one per layer. ``progress`` shows a bar over the steps.
    """
    if not pairs:
        return []
    for X_, Y_ in pairs:
        check_pairs(X_, Y_)
        if X_.shape != pairs[0][0].shape:
            raise ValueError(f"fit_mlps needs training sets of one shape; got {tuple(X_.shape)} and "
                             f"{tuple(pairs[0][0].shape)} (fit them separately with fit_mlp).")
    _check_choice("mlp", form, None, pairs[0][0].shape[1], 0)
    X = torch.stack([X_.detach() for X_, _ in pairs])                              # [L, N, d]
    T = torch.stack([(Y_ - X_ if form == "update" else Y_).detach() for X_, Y_ in pairs])
    in_mean, in_std = X.mean(1), X.std(1).clamp_min(1e-6)                         # [L, d]
    out_mean, out_std = T.mean(1), T.std(1).clamp_min(1e-6)
    # standardised in place: the stacks are ours, and at 30 layers each is a few hundred MB
    Xs, Ts = X.sub_(in_mean[:, None]).div_(in_std[:, None]), T.sub_(out_mean[:, None]).div_(out_std[:, None])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_nets, n_rows, d = X.shape
    # Kaiming-uniform-like init from our own generator (nn.Linear would draw from the global RNG).
    W1 = ((torch.rand(hidden, d, generator=gen) * 2 - 1) / d ** 0.5).to(X)
    W2 = ((torch.rand(d, hidden, generator=gen) * 2 - 1) / hidden ** 0.5).to(X)
    # stored transposed ([L, d, H], [L, H, d]) so the batched products need no transposed copies
    params = [W1.T.expand(n_nets, -1, -1).contiguous(), torch.zeros(n_nets, 1, hidden, dtype=X.dtype, device=X.device),
              W2.T.expand(n_nets, -1, -1).contiguous(), torch.zeros(n_nets, 1, d, dtype=X.dtype, device=X.device)]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.Adam(params, lr=lr, fused=True)   # one pass over the weights per step, not ten
    # Minibatch rows as one gather from the flattened stack (a dim-1 index_select is ~2x slower).
    flat_X, flat_T = Xs.reshape(n_nets * n_rows, d), Ts.reshape(n_nets * n_rows, d)
    offsets = (torch.arange(n_nets, device=X.device) * n_rows)[:, None]
    n_batch = min(batch_size, n_rows)
    scale = 2.0 / (n_batch * d)                        # d(mean squared error) / d(output)
    losses = torch.full((n_nets,), float("nan"))
    W1, b1, W2, b2 = params
    with torch.no_grad():
        # Gradients by hand (five batched products, the rest in place): autograd's elementwise
        # bookkeeping cost a third of each step. Checked against autograd in the tests.
        for step in tqdm(range(steps), desc=f"fit {n_nets} MLP{'s' * (n_nets > 1)}", disable=not progress,
                         unit="step"):
            batch = torch.randint(0, n_rows, (n_batch,), generator=gen).to(X.device)
            rows = (offsets + batch).flatten()
            Xb = flat_X.index_select(0, rows).view(n_nets, n_batch, d)
            Z = torch.baddbmm(b1, Xb, W1)                                          # [L, B, H]
            Hh = torch.nn.functional.gelu(Z)
            G = torch.baddbmm(b2, Hh, W2).sub_(flat_T.index_select(0, rows).view(n_nets, n_batch, d))
            if step == steps - 1:
                losses = G.pow(2).mean(dim=(1, 2))
            G.mul_(scale)
            torch.bmm(Hh.mT, G, out=W2.grad)
            torch.sum(G, dim=1, keepdim=True, out=b2.grad)
            dZ = torch.ops.aten.gelu_backward(torch.bmm(G, W2.mT), Z)
            torch.bmm(Xb.mT, dZ, out=W1.grad)
            torch.sum(dZ, dim=1, keepdim=True, out=b1.grad)
            opt.step()
    W1s, b1s, W2s, b2s = (p.detach() for p in params)
    return [MLPMap(W1s[i].T.contiguous(), b1s[i, 0], W2s[i].T.contiguous(), b2s[i, 0], in_mean[i], in_std[i],
                   out_mean[i], out_std[i], form, float(losses[i].detach())) for i in range(n_nets)]


def fit_tokenwise(train_X: Tensor, train_Y: Tensor, query_X: Tensor, function_class: FunctionClass,
                  k: int = 64, form: Form = "update", rank: int | None = None, keep_singular: int = 8,
                  chunk_size: int = 256, exclude_self: bool = False, knn_backend: str = "torch",
                  rcond: float | None = None, mlp: MLPMap | None = None, **mlp_kwargs) -> LocalFit:
    """Fit the tokenwise map for each query anchor and predict ``T(query_X)``.

    Local classes find each anchor's ``k`` cosine neighbours in ``train_X`` and call
    :func:`fit_local_maps`; ``"diag_global"`` and ``"mlp"`` fit once on all training pairs (``k`` unused;
    pass a fitted ``mlp`` to reuse it, or ``mlp_kwargs`` for :func:`fit_mlp`).

    Example:
        >>> X = torch.randn(400, 16, dtype=torch.float64); Y = X + 0.1 * torch.tanh(X)
        >>> fit = fit_tokenwise(X[:300], Y[:300], X[300:], "lowrank", k=64, rank=8, form="update")
        >>> fit.predictions.shape, fit.left_singular.shape
        (torch.Size([100, 16]), torch.Size([100, 8, 16]))
    """
    check_pairs(train_X, train_Y)
    d = train_X.shape[1]
    _check_choice(function_class, form, rank, d, keep_singular)
    if query_X.ndim != 2 or query_X.shape[1] != d:
        raise ValueError(f"query_X must be [M, d={d}], got {tuple(query_X.shape)}.")
    if mlp_kwargs and function_class != "mlp":
        raise ValueError(f"unexpected keyword arguments {sorted(mlp_kwargs)} for function_class={function_class!r}.")
    if function_class == "diag_global":
        m = fit_global_diag(train_X, train_Y, form)
        vecs, vals = m.spectrum(query_X.shape[0], keep_singular)
        return LocalFit(m.predict(query_X), vecs, vals, function_class, form)
    if function_class == "mlp":
        m = mlp if mlp is not None else fit_mlp(train_X, train_Y, form, **mlp_kwargs)
        if m.form != form:
            raise ValueError(f"the given mlp was fitted with form={m.form!r}, not {form!r}.")
        vecs, vals = m.spectrum(query_X, keep_singular, chunk_size)
        return LocalFit(m.predict(query_X), vecs, vals, function_class, form)
    idx, _ = knn_cosine(train_X, query_X, k, exclude_self=exclude_self, backend=knn_backend)
    return fit_local_maps(train_X, train_Y, idx, query_X, function_class, form, rank, keep_singular,
                          chunk_size, rcond)
