"""Tokenwise decomposition core: kNN, local function classes (both forms), interpolation, geometry.

Every closed form is checked against an independent numerical solution (numpy lstsq, scipy nnls,
scipy orthogonal_procrustes, numpy argsort); exact synthetic settings check recovery and that a
planted non-tokenwise term comes out as the residual.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from toolkit.decompose import (distance_weights, energy_fraction, fit_global_diag, fit_local_maps, fit_mlp, fit_mlps,
                               fit_tokenwise, interpolate_maps, knn_cosine, random_baseline, tokenwise_geometry)

F64 = torch.float64
LOCAL_LINEAR = ["lowrank", "diag_local", "orthogonal"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny batched ops on a shared 2-core machine: threading overhead dominates, one thread is faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _random_orthogonal(d, seed=0):
    q, r = torch.linalg.qr(_rand(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def _planted_map(function_class, d, seed=1):
    """A map the class can represent exactly: dense W, nonneg diagonal, or orthogonal Q."""
    if function_class == "lowrank":
        return _rand(d, d, seed=seed) / d ** 0.5
    if function_class in ("diag_local", "diag_global"):
        return torch.diag(_rand(d, seed=seed).abs() + 0.1)
    return _random_orthogonal(d, seed=seed)


# ----------------------------------------------------------------------------------------- kNN

@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_matches_numpy_argsort(exclude_self):
    X = _rand(300, 10, seed=3).numpy()
    Q = X if exclude_self else _rand(40, 10, seed=4).numpy()
    idx, sim = knn_cosine(torch.from_numpy(X), torch.from_numpy(Q), k=7, exclude_self=exclude_self, chunk_size=16)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ Xn.T
    if exclude_self:
        np.fill_diagonal(S, -np.inf)
    expected = np.argsort(-S, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx.numpy(), expected)
    np.testing.assert_allclose(sim.numpy(), np.take_along_axis(S, expected, axis=1), atol=1e-12)


def test_knn_faiss_missing_gives_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        knn_cosine(_rand(10, 3), _rand(2, 3), k=2, backend="faiss")


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_faiss_exact_and_ivf_return_the_same_neighbours(exclude_self):
    X = _rand(800, 16, seed=5)
    Q = X if exclude_self else _rand(60, 16, seed=6)
    expected, _ = knn_cosine(X, Q, k=8, exclude_self=exclude_self)
    flat, _ = knn_cosine(X, Q, k=8, exclude_self=exclude_self, backend="faiss")
    assert torch.equal(flat, expected)
    # all cells probed: the inverted file is exact on a small set
    ivf_all, _ = knn_cosine(X, Q, k=8, exclude_self=exclude_self, backend="faiss-ivf", nprobe=10_000)
    assert torch.equal(ivf_all, expected)
    # default nprobe searches a fraction of the cells: approximate, but most neighbours are found
    ivf, _ = knn_cosine(X, Q, k=8, exclude_self=exclude_self, backend="faiss-ivf")
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 8 for a, b in zip(ivf, expected)])
    assert recall > 0.6


# ----------------------------------------------------- exact tokenwise settings and planted terms

@pytest.mark.parametrize("form", ["plain", "update"])
@pytest.mark.parametrize("function_class", LOCAL_LINEAR + ["diag_global"])
def test_exact_tokenwise_map_is_recovered(function_class, form):
    d, N = 12, 600
    X, Xq = _rand(N, d, seed=5), _rand(50, d, seed=6)
    W = _planted_map(function_class, d)
    b = _rand(d, seed=7)
    if form == "plain":            # y = W x
        Y, Yq = X @ W.T, Xq @ W.T
    else:                          # y = x + (W - I) x + b: an affine map whose linear part is in the class
        Y, Yq = X @ W.T + b, Xq @ W.T + b
    fit = fit_tokenwise(X, Y, Xq, function_class, k=40, form=form)
    g = tokenwise_geometry(Xq, Yq, fit)
    assert float(g.rel_err.max()) < 1e-4
    assert float((Yq - fit.predictions).norm(dim=1).max()) < 1e-8


def test_plain_form_cannot_absorb_an_offset_but_update_form_can():
    d = 12
    X, Xq = _rand(600, d, seed=5), _rand(50, d, seed=6)
    W, b = _planted_map("lowrank", d), 3 * _rand(d, seed=7)
    Y, Yq = X + X @ W.T + b, Xq + Xq @ W.T + b
    plain = tokenwise_geometry(Xq, Yq, fit_tokenwise(X, Y, Xq, "lowrank", k=40, form="plain"))
    update = tokenwise_geometry(Xq, Yq, fit_tokenwise(X, Y, Xq, "lowrank", k=40, form="update"))
    assert float(update.rel_err.max()) < 1e-8
    assert float(plain.rel_err.median()) > 1e-2


def _uncorrelated_noise(Xn, form, seed):
    """Noise whose columns are orthogonal (over the k samples) to the columns of X (and to 1 in update form).

    Then the least-squares fit cannot absorb any of it: the fitted map is the planted one exactly.
    """
    basis = Xn - Xn.mean(0) if form == "update" else Xn
    if form == "update":
        basis = torch.cat([basis, torch.ones(Xn.shape[0], 1, dtype=F64)], dim=1)
    q, _ = torch.linalg.qr(basis)
    G = _rand(*Xn.shape, seed=seed)
    return G - q @ (q.T @ G)


@pytest.mark.parametrize("form", ["plain", "update"])
@pytest.mark.parametrize("function_class", LOCAL_LINEAR)
def test_planted_cross_token_term_is_the_residual(function_class, form):
    # Disjoint neighbourhoods of k rows; y = W x + z with z uncorrelated with x inside each neighbourhood.
    d, k, n_anchor = 8, 30, 6
    X = _rand(n_anchor * k, d, seed=11)
    W = _planted_map(function_class, d, seed=12)
    Z = torch.cat([_uncorrelated_noise(X[a * k:(a + 1) * k], form, seed=100 + a) for a in range(n_anchor)])
    Y = X @ W.T + Z
    neighbours = torch.arange(n_anchor * k).view(n_anchor, k)
    Xq = _rand(n_anchor, d, seed=13)
    zq = 0.5 * _rand(n_anchor, d, seed=14)                       # the anchors' own cross-token term
    Yq = Xq @ W.T + zq
    fit = fit_local_maps(X, Y, neighbours, Xq, function_class, form=form)
    torch.testing.assert_close(Yq - fit.predictions, zq, atol=1e-9, rtol=0)
    g = tokenwise_geometry(Xq, Yq, fit)
    torch.testing.assert_close(g.rel_err, zq.norm(dim=1) / Yq.norm(dim=1))
    assert bool((Z.norm(dim=1) > 0.1).all())                     # the planted term is not trivially small


# --------------------------------------------------------- closed forms vs direct numerical solutions

def _neighbourhoods(d=20, k=12, N=200, M=5, seed=20):
    X, Y = _rand(N, d, seed=seed), _rand(N, d, seed=seed + 1)
    Xq = _rand(M, d, seed=seed + 2)
    idx, _ = knn_cosine(X, Xq, k)
    P = _rand(M, d, seed=seed + 3)                                # evaluation points, off the neighbours' span
    return X, Y, idx, P


@pytest.mark.parametrize("form", ["plain", "update"])
def test_lowrank_untruncated_matches_numpy_lstsq_min_norm(form):
    X, Y, idx, P = _neighbourhoods()                              # k=12 < d=20: min-norm choice matters
    fit = fit_local_maps(X, Y, idx, P, "lowrank", form=form)
    for a in range(idx.shape[0]):
        Xn, Yn, p = X[idx[a]].numpy(), Y[idx[a]].numpy(), P[a].numpy()
        if form == "plain":
            sol = np.linalg.lstsq(Xn, Yn, rcond=None)[0]         # [d, d] = A^T
            expected = p @ sol
        else:
            mu, U = Xn.mean(0), Yn - Xn
            b = U.mean(0)
            sol = np.linalg.lstsq(Xn - mu, U - b, rcond=None)[0]
            expected = p + (p - mu) @ sol + b
        np.testing.assert_allclose(fit.predictions[a].numpy(), expected, atol=1e-9)


@pytest.mark.parametrize("form", ["plain", "update"])
def test_lowrank_truncation_matches_truncated_svd_of_lstsq(form):
    X, Y, idx, P = _neighbourhoods(k=15)
    r = 4
    fit = fit_local_maps(X, Y, idx, P, "lowrank", form=form, rank=r, keep_singular=r)
    for a in range(idx.shape[0]):
        Xn, Yn, p = X[idx[a]].numpy(), Y[idx[a]].numpy(), P[a].numpy()
        if form == "plain":
            A = np.linalg.lstsq(Xn, Yn, rcond=None)[0].T
        else:
            mu, U = Xn.mean(0), Yn - Xn
            A = np.linalg.lstsq(Xn - mu, U - U.mean(0), rcond=None)[0].T
        u, s, vt = np.linalg.svd(A)
        A_r = (u[:, :r] * s[:r]) @ vt[:r]
        expected = A_r @ p if form == "plain" else p + A_r @ (p - mu) + U.mean(0)
        np.testing.assert_allclose(fit.predictions[a].numpy(), expected, atol=1e-9)
        np.testing.assert_allclose(fit.singular_values[a].numpy(), s[:r], rtol=1e-9)
        V = fit.left_singular[a].numpy()                          # rows; compare projectors (sign-free)
        np.testing.assert_allclose(V.T @ V, u[:, :r] @ u[:, :r].T, atol=1e-8)


@pytest.mark.parametrize("form", ["plain", "update"])
def test_diag_local_matches_scipy_nnls(form):
    X, _, idx, P = _neighbourhoods(d=6, k=10)
    Y = X * torch.tensor([1.5, -0.7, 0.2, 0.0, 2.0, -2.0], dtype=F64) + 0.3 * _rand(*X.shape, seed=30)
    fit = fit_local_maps(X, Y, idx, P, "diag_local", form=form)
    for a in range(idx.shape[0]):
        Xn, Yn, p = X[idx[a]].numpy(), Y[idx[a]].numpy(), P[a].numpy()
        mx, my = (Xn.mean(0), Yn.mean(0)) if form == "update" else (0.0, 0.0)
        D = np.array([scipy.optimize.nnls((Xn - mx)[:, [j]], (Yn - my)[:, j])[0][0] for j in range(6)])
        assert (D == 0).any()                                     # the constraint is active somewhere
        np.testing.assert_allclose(fit.predictions[a].numpy(), my + D * (p - mx), atol=1e-10)


@pytest.mark.parametrize("form", ["plain", "update"])
def test_orthogonal_matches_scipy_procrustes(form):
    X, Y, idx, P = _neighbourhoods(d=6, k=20)                     # k >= d: Q is unique
    fit = fit_local_maps(X, Y, idx, P, "orthogonal", form=form)
    for a in range(idx.shape[0]):
        Xn, Yn, p = X[idx[a]].numpy(), Y[idx[a]].numpy(), P[a].numpy()
        mx, my = (Xn.mean(0), Yn.mean(0)) if form == "update" else (0.0, 0.0)
        R, _ = scipy.linalg.orthogonal_procrustes(Xn - mx, Yn - my)   # (X - mx) R ~ (Y - my), Q = R^T
        np.testing.assert_allclose(fit.predictions[a].numpy(), my + (p - mx) @ R, atol=1e-9)


def test_orthogonal_rank_deficient_is_optimal_orthogonal_and_identity_off_span():
    d, k = 16, 5                                                  # 2k < d: Q is underdetermined
    X, Y, idx, _ = _neighbourhoods(d=d, k=k, M=3)
    eye = torch.eye(d, dtype=F64)
    for a in range(3):
        # Applying the map to the basis vectors recovers Q column by column.
        Q = fit_local_maps(X, Y, idx[a].expand(d, k), eye, "orthogonal", form="plain").predictions.T
        torch.testing.assert_close(Q.T @ Q, eye, atol=1e-10, rtol=0)
        Xn, Yn = X[idx[a]], Y[idx[a]]
        R, _ = scipy.linalg.orthogonal_procrustes(Xn.numpy(), Yn.numpy())
        best = np.linalg.norm(Xn.numpy() @ R - Yn.numpy())
        assert abs(float((Xn @ Q.T - Yn).norm()) - best) < 1e-9
        # Among the optimal Q, the one closest to I (max trace): reference computed in the full d-space.
        u, sv, vt = np.linalg.svd(Xn.numpy().T @ Yn.numpy())
        det = sv > 1e-10 * sv[0]
        u0, v0 = u[:, ~det], vt[~det].T
        pn, _, qnt = np.linalg.svd(v0.T @ u0)
        R_ref = u[:, det] @ vt[det] + u0 @ (qnt.T @ pn.T) @ v0.T
        np.testing.assert_allclose(Q.numpy(), R_ref.T, atol=1e-9)
        span = torch.linalg.qr(torch.cat([Xn, Yn]).T)[0]          # [d, 2k]
        v = _rand(d, seed=40 + a)
        v = v - span @ (span.T @ v)
        torch.testing.assert_close(Q @ v, v, atol=1e-10, rtol=0)


def test_diag_global_equals_diag_local_on_all_points():
    X = _rand(80, 5, seed=50)
    Y = X * 0.8 - 0.2 * X ** 2
    Xq = _rand(4, 5, seed=51)
    for form in ("plain", "update"):
        glob = fit_tokenwise(X, Y, Xq, "diag_global", form=form)
        loc = fit_local_maps(X, Y, torch.arange(80).expand(4, 80), Xq, "diag_local", form=form)
        torch.testing.assert_close(glob.predictions, loc.predictions)
    assert bool((fit_global_diag(X, -Y).diag == 0).all())        # a negative slope clips to 0


# ------------------------------------------------------------------------------------- MLP

def test_mlp_is_seeded_beats_identity_and_its_spectrum_is_the_jacobians():
    X = _rand(512, 6, seed=60).float()
    Y = X + torch.tanh(2 * X)
    a = fit_mlp(X, Y, hidden=32, steps=400, lr=3e-3, seed=1)
    b = fit_mlp(X, Y, hidden=32, steps=400, lr=3e-3, seed=1)
    torch.testing.assert_close(a.W1, b.W1, rtol=0, atol=0)
    Xq = _rand(20, 6, seed=61).float()
    Yq = Xq + torch.tanh(2 * Xq)
    fit = fit_tokenwise(X, Y, Xq, "mlp", mlp=a, form="update", keep_singular=3)
    rel = tokenwise_geometry(Xq, Yq, fit).rel_err.mean()
    identity = ((Yq - Xq).norm(dim=1) / Yq.norm(dim=1)).mean()
    assert float(rel) < 0.5 * float(identity)
    for i in range(3):                                           # left singular vectors of d f / d h
        J = torch.autograd.functional.jacobian(lambda h: a.predict(h[None])[0] - h, Xq[i])
        u = torch.linalg.svd(J)[0][:, :3]
        V = fit.left_singular[i]
        torch.testing.assert_close(V.T @ V, u @ u.T, atol=1e-4, rtol=0)


def test_mlps_trained_together_equal_mlps_trained_alone():
    pairs = [(X, X + torch.tanh(k * X)) for k, X in ((1, _rand(300, 6, seed=62).float()),
                                                     (3, _rand(300, 6, seed=63).float()))]
    together = fit_mlps(pairs, hidden=16, steps=50, lr=3e-3, seed=2)
    Xq = _rand(10, 6, seed=64).float()
    for (X, Y), m in zip(pairs, together):
        alone = fit_mlp(X, Y, hidden=16, steps=50, lr=3e-3, seed=2)
        torch.testing.assert_close(m.predict(Xq), alone.predict(Xq), rtol=1e-5, atol=1e-6)
    assert together[0].final_loss != together[1].final_loss           # each net saw its own data
    with pytest.raises(ValueError, match="one shape"):
        fit_mlps([pairs[0], (pairs[1][0][:200], pairs[1][1][:200])])



def _autograd_mlp_training(X, T, hidden, steps, lr, batch_size, seed):
    """Reference for fit_mlps' hand-written gradients: the same network, init and minibatches, by autograd."""
    gen = torch.Generator().manual_seed(seed)
    d = X.shape[1]
    W1 = ((torch.rand(hidden, d, generator=gen) * 2 - 1) / d ** 0.5).requires_grad_()
    W2 = ((torch.rand(d, hidden, generator=gen) * 2 - 1) / hidden ** 0.5).requires_grad_()
    b1, b2 = torch.zeros(hidden, requires_grad=True), torch.zeros(d, requires_grad=True)
    Xs = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    Ts = (T - T.mean(0)) / T.std(0).clamp_min(1e-6)
    opt = torch.optim.Adam([W1, b1, W2, b2], lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = torch.randint(0, X.shape[0], (min(batch_size, X.shape[0]),), generator=gen)
        out = torch.nn.functional.gelu(Xs[batch] @ W1.T + b1) @ W2.T + b2
        loss = ((out - Ts[batch]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return W1.detach(), b1.detach(), W2.detach(), b2.detach(), float(loss.detach())


def test_mlp_training_gradients_match_autograd():
    pairs = [(X, X + torch.tanh(k * X)) for k, X in ((1, _rand(300, 7, seed=65).float()),
                                                     (2, _rand(300, 7, seed=66).float()))]
    nets = fit_mlps(pairs, hidden=12, steps=40, lr=3e-3, batch_size=64, seed=3)
    for (X, Y), m in zip(pairs, nets):
        W1, b1, W2, b2, loss = _autograd_mlp_training(X, Y - X, 12, 40, 3e-3, 64, 3)
        for ours, ref in ((m.W1, W1), (m.b1, b1), (m.W2, W2), (m.b2, b2)):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        assert abs(m.final_loss - loss) <= 1e-5 * loss
        assert not torch.allclose(m.W1, _autograd_mlp_training(X, Y - X, 12, 0, 3e-3, 64, 3)[0])  # it trained

# ----------------------------------------------------------------------------- interpolation

def test_interpolation_is_the_weighted_sum_of_anchor_maps():
    d, k = 10, 15
    X, Y = _rand(300, d, seed=70), _rand(300, d, seed=71)
    anchors, Xq = _rand(12, d, seed=72), _rand(6, d, seed=73)
    fit = interpolate_maps(X, Y, anchors, Xq, "lowrank", k=k, n_anchors=3, form="update", rank=4,
                           temperature=0.2)
    torch.testing.assert_close(fit.weights.sum(1), torch.ones(6, dtype=F64))
    anchor_nb, _ = knn_cosine(X, anchors, k)
    for q in range(6):                                           # each anchor's map, fitted on its own
        per_anchor = fit_local_maps(X, Y, anchor_nb[fit.anchors[q]], Xq[q].expand(3, d), "lowrank",
                                    form="update", rank=4).predictions
        torch.testing.assert_close(fit.predictions[q], fit.weights[q] @ per_anchor)


def test_distance_weights_order_and_limits():
    sims = torch.tensor([[0.99, 0.9, 0.5]], dtype=F64)
    for w in (distance_weights(sims), distance_weights(sims, "inverse")):
        assert bool((w[0, :-1] > w[0, 1:]).all())
    torch.testing.assert_close(distance_weights(sims, temperature=1e-4), torch.tensor([[1.0, 0, 0]], dtype=F64))
    torch.testing.assert_close(distance_weights(sims, temperature=1e4), torch.full((1, 3), 1 / 3, dtype=F64),
                               atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------- geometry

def test_geometry_on_hand_constructed_vectors():
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]], dtype=F64)
    y = torch.tensor([[1.0, 1, 0], [1.0, 1, 0]], dtype=F64)
    tx = torch.tensor([[1.0, 0.5, 0.5], [1.0, -1, 0]], dtype=F64)   # t at 45 degrees; t = -u
    basis = torch.eye(3, dtype=F64)[[1, 2, 0]].expand(2, 3, 3)       # singular vectors e2, e3, e1
    g = tokenwise_geometry(x, y, tx, left_singular=basis, top_k=(1, 2))
    torch.testing.assert_close(g.rel_err, torch.tensor([0.5, 2 / 2 ** 0.5], dtype=F64))
    torch.testing.assert_close(g.cos_u_t, torch.tensor([2 ** -0.5, -1.0], dtype=F64))
    torch.testing.assert_close(g.abs_cos_u_t, torch.tensor([2 ** -0.5, 1.0], dtype=F64))
    torch.testing.assert_close(g.angle_u_t, torch.tensor([45.0, 180.0], dtype=F64))
    torch.testing.assert_close(g.angle_r_t[:1], torch.tensor([90.0], dtype=F64))  # r = (0, .5, -.5) _|_ t
    torch.testing.assert_close(g.cos_r_t[1:], torch.tensor([-1.0], dtype=F64))    # r = 2u, t = -u
    torch.testing.assert_close(g.energy["frac_u_top1"], torch.tensor([1.0, 1.0], dtype=F64))
    torch.testing.assert_close(g.energy["frac_t_top1"], torch.tensor([0.5, 1.0], dtype=F64))
    torch.testing.assert_close(g.energy["frac_r_top2"], torch.tensor([1.0, 1.0], dtype=F64))
    assert g.baseline == {1: 1 / 3, 2: 2 / 3}
    exact = tokenwise_geometry(x, y, y)                               # r = 0: undefined, not 0
    assert bool(torch.isnan(exact.cos_r_t).all()) and float(exact.rel_err.max()) == 0.0


def test_energy_fraction_random_baseline():
    M, d = 2000, 64
    V = torch.linalg.qr(_rand(M, d, d, seed=80))[0].mT               # random orthonormal rows per anchor
    v = _rand(M, d, seed=81)
    for k in (1, 4, 8):
        mean = float(energy_fraction(v, V, k).mean())
        assert abs(mean - random_baseline(k, d)) < 0.1 * random_baseline(k, d) + 0.003


# -------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_are_refused_with_clear_messages():
    X, Y = _rand(20, 6), _rand(20, 6, seed=1)
    with pytest.raises(ValueError, match=r"k=30 neighbours requested but only N=20"):
        knn_cosine(X, X[:3], k=30)
    with pytest.raises(ValueError, match=r"k=20 .* N=19 .*self excluded"):
        knn_cosine(X, X, k=20, exclude_self=True)
    with pytest.raises(ValueError, match=r"k=25 neighbours requested but only N=20"):
        fit_tokenwise(X, Y, X[:2], "lowrank", k=25)
    with pytest.raises(ValueError, match=r"rank=7 must be between 1 and d=6"):
        fit_tokenwise(X, Y, X[:2], "lowrank", k=10, rank=7)
    with pytest.raises(ValueError, match=r"rank applies to function_class='lowrank' only"):
        fit_tokenwise(X, Y, X[:2], "orthogonal", k=10, rank=3)
    with pytest.raises(ValueError, match=r"train_X and train_Y must both be \[N, d\]"):
        fit_tokenwise(X, Y[:, :5], X[:2], "lowrank", k=10)
    with pytest.raises(ValueError, match=r"query_X must be \[M, d=6\], got \(2, 5\)"):
        fit_tokenwise(X, Y, X[:2, :5], "lowrank", k=10)
    with pytest.raises(ValueError, match=r"same width d"):
        knn_cosine(X, X[:2, :5], k=3)
    with pytest.raises(ValueError, match=r"neighbours must be \[M, k\] and points \[M, d=6\]"):
        fit_local_maps(X, Y, torch.zeros(3, 4, dtype=torch.long), X[:2], "lowrank")
    with pytest.raises(ValueError, match=r"function_class must be one of"):
        fit_tokenwise(X, Y, X[:2], "dense", k=10)
    with pytest.raises(ValueError, match=r"form must be 'plain'"):
        fit_tokenwise(X, Y, X[:2], "lowrank", k=10, form="affine")
    with pytest.raises(ValueError, match=r"keep_singular=65"):
        fit_tokenwise(X, Y, X[:2], "lowrank", k=10, keep_singular=65)
    with pytest.raises(ValueError, match=r"x, y and the predictions must all be \[M, d\]"):
        tokenwise_geometry(X[:3], Y[:3], Y[:2])
    with pytest.raises(ValueError, match=r"interpolation mixes local maps"):
        interpolate_maps(X, Y, X[:4], X[:2], "mlp", k=5)


@pytest.mark.parametrize("form", ["plain", "update"])
@pytest.mark.parametrize("rank", [None, 5])
def test_float32_lowrank_fit_agrees_with_float64(form, rank):
    # float32 takes the Gram-matrix SVD (64 x 64 eigendecompositions), float64 the direct SVD
    X = _rand(400, 96, seed=70) * torch.linspace(0.1, 3, 96, dtype=F64)     # spread singular values
    Y = X @ _rand(96, 96, seed=71) * 0.1 + X + 0.05 * torch.tanh(X)
    Xq = X[:12] + 0.01 * _rand(12, 96, seed=72)
    exact = fit_tokenwise(X, Y, Xq, "lowrank", k=40, form=form, rank=rank, keep_singular=4)
    fast = fit_tokenwise(X.float(), Y.float(), Xq.float(), "lowrank", k=40, form=form, rank=rank, keep_singular=4)
    torch.testing.assert_close(fast.predictions.double(), exact.predictions, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.singular_values.double(), exact.singular_values, rtol=1e-4, atol=1e-5)
    overlap = (fast.left_singular.double() @ exact.left_singular.mT).abs()   # same vectors up to sign
    torch.testing.assert_close(torch.diagonal(overlap, dim1=1, dim2=2), torch.ones(12, 4, dtype=F64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("form", ["plain", "update"])
def test_float32_lowrank_fit_agrees_with_float64_on_smollm2_states(smollm2_nnsight, form):
    # Real residual streams have a few coordinates hundreds of times larger than the rest; their
    # rounding must not be amplified by the pseudo-inverse (a float32 X h once cost 1e-5..1e-4 of the
    # residual at the median and >1x at the worst anchor here).
    from toolkit.data import chunk_corpus, load_corpus
    model = smollm2_nnsight
    texts = chunk_corpus(load_corpus("embedded"), model.tokenizer, seq_len=64, max_texts=10).tokens
    hs = model.hidden_states(texts, [3, 4])
    X, Y = hs[0].reshape(-1, 576), hs[1].reshape(-1, 576)
    query = torch.arange(5, X.shape[0], 10)
    train = torch.tensor([i for i in range(X.shape[0]) if i % 10 != 5])
    exact = fit_tokenwise(X[train].double(), Y[train].double(), X[query].double(), "lowrank", k=64, form=form)
    fast = fit_tokenwise(X[train], Y[train], X[query], "lowrank", k=64, form=form)
    y = Y[query].double()
    # error relative to the float64 residual, floored at float32's resolution of y
    scale = torch.maximum((y - exact.predictions).norm(dim=1), 1e-5 * y.norm(dim=1))
    err = (fast.predictions.double() - exact.predictions).norm(dim=1) / scale
    assert float(err.max()) < 2e-3 and float(err.median()) < 1e-5


def test_one_thread_factorizations_match_torch_and_restore_the_thread_count():
    from toolkit.decompose.linalg import eigh, one_thread, svd
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 6, 9, generator=g, dtype=F64)
    G = A @ A.mT
    torch.set_num_threads(2)                     # the module fixture set 1; the wrappers must restore 2
    try:
        lam, U = eigh(G)
        assert torch.get_num_threads() == 2
        Uu, S, Vh = svd(A, full_matrices=False)
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("restored on error too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(G))
    torch.testing.assert_close(U @ torch.diag_embed(lam) @ U.mT, G)
    torch.testing.assert_close(Uu @ torch.diag_embed(S) @ Vh, A)
