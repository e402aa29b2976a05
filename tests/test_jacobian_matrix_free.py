"""Matrix-free top-k SVD (JVPs + VJPs only) against the exact SVD of the formed Jacobian."""
from __future__ import annotations

import pytest
import torch

from toolkit.jacobian.compute import detached_jacobian
from toolkit.jacobian.matrix_free import jacobian_svd, randomized_svd
from toolkit.jacobian.operator import batched_jvp, batched_vjp, frozen_operator
from toolkit.jacobian.targets import input_embeddings, state_function, target_input
from toolkit.models.tiny import MECHANISM_ARCHITECTURES, tiny_hf_model

IDS = torch.tensor([3, 17, 42, 7, 99, 5])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


def test_randomized_svd_on_explicit_matrices():
    torch.manual_seed(0)
    # decaying spectrum with a small gap at k: Krylov must still get the top-k right
    U, _ = torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(300, 80, dtype=torch.float64))
    s = torch.cat([torch.tensor([10.0, 5.0, 4.0, 3.0, 2.9, 2.8]), 2.5 * 0.92 ** torch.arange(74.0)]).double()
    A = U @ torch.diag(s) @ V.T
    S, Uk, Vk, info = randomized_svd(lambda X: A @ X, lambda Y: A.T @ Y, A.shape, k=6, dtype=torch.float64, tol=1e-10)
    assert rel(S, s[:6]) < 1e-8 and info["converged"]
    assert torch.allclose(Uk.T @ A @ Vk, torch.diag(S), atol=1e-8)  # the triplets, not only the values
    assert info["n_matvec"] + info["n_rmatvec"] < 2 * 80  # fewer products than forming either side
    # too few blocks: not converged, values are lower bounds
    S1, *_, info1 = randomized_svd(lambda X: A @ X, lambda Y: A.T @ Y, A.shape, k=6, max_blocks=1,
                                   dtype=torch.float64, tol=1e-12)
    assert not info1["converged"] and (S1 <= s[:6] + 1e-9).all()
    with pytest.raises(ValueError, match="k must be"):
        randomized_svd(lambda X: A @ X, lambda Y: A.T @ Y, A.shape, k=81)


def test_operator_products_match_autograd_functional_jacobian():
    model = tiny_hf_model("gemma3", n_layers=3, width=32)
    x = input_embeddings(model, IDS)
    f = state_function(model, "mlp.1", position=None)  # all positions: [T, d] -> [T, d]
    with frozen_operator(model, f, x, chunk_size=7) as op:
        reference = torch.autograd.functional.jacobian(f, x, vectorize=True).reshape(op.shape)
        V, U = torch.randn(op.shape[1], 5), torch.randn(op.shape[0], 3)
        assert torch.allclose(op.matvec(V), reference @ V, atol=1e-4)
        assert torch.allclose(op.rmatvec(U), reference.T @ U, atol=1e-4)
        assert torch.allclose(op.dense("forward"), reference, atol=1e-5)
        assert torch.allclose(op.dense("reverse"), reference, atol=1e-5)
    with pytest.raises(ValueError, match="tangents must be"):
        batched_jvp(f, x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="cotangents must be"):
        xg = x.clone().requires_grad_()
        batched_vjp(xg.sum(0), xg, torch.randn(2, 3))


@pytest.mark.parametrize("arch", MECHANISM_ARCHITECTURES)
def test_top8_matches_formed_jacobian_on_tiny_models(arch):
    model = tiny_hf_model(arch, n_layers=3, width=32)
    # whole-prompt output map [J_1 .. J_T]: 32 x 192
    top = jacobian_svd(model, IDS, k=8)
    J = detached_jacobian(model, IDS).jacobian
    exact = torch.linalg.svdvals(J.permute(1, 0, 2).reshape(32, -1).double())[:8]
    assert rel(top.singular_values, exact) < 1e-4, top
    assert top.U.shape == (32, 8) and top.V.shape == (len(IDS), 32, 8)
    # one layer's full transform h_1 -> h_2 at every position: 192 x 192
    top = jacobian_svd(model, IDS, target="layer.1", position=None, k=8)
    x = target_input(model, IDS, "layer.1")
    with frozen_operator(model, state_function(model, "layer.1", input_ids=IDS, position=None), x) as op:
        full = op.dense("reverse")
    exact = torch.linalg.svdvals(full.double())[:8]
    assert rel(top.singular_values, exact) < 1e-4, top
    assert top.n_jvp + top.n_vjp < 2 * full.shape[0]
    # the vectors are singular vectors of the formed map: u_i^T J v_i = s_i
    u, v = top.U.reshape(-1, 8).double(), top.V.reshape(-1, 8).double()
    assert torch.allclose(torch.diag(u.T @ full.double() @ v), top.singular_values, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 on its own copy (the session fixture may be wrapped in place by a TransformerBridge)."""
    from transformers import AutoModelForCausalLM
    from toolkit.models.weights import SMOLLM2, converted_folder
    return AutoModelForCausalLM.from_pretrained(str(converted_folder(SMOLLM2)), dtype=torch.float32).eval()


def test_smollm2_top8_matches_formed_jacobian(smollm2, smollm2_tokenizer):
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids[0][:4]
    # the whole-prompt output map, 576 x 2304
    top = jacobian_svd(smollm2, ids, k=8)
    r = detached_jacobian(smollm2, ids, chunk_size=192)
    exact = torch.linalg.svdvals(r.jacobian.permute(1, 0, 2).reshape(576, -1).double())[:8]
    print(top, exact[:4])
    assert rel(top.singular_values, exact) < 1e-4
    assert top.n_jvp + top.n_vjp < 576
    # layer 15's full transform, 2304 x 2304
    layer = "layer.15"
    top = jacobian_svd(smollm2, ids, target=layer, position=None, k=8)
    x = target_input(smollm2, ids, layer)
    with frozen_operator(smollm2, state_function(smollm2, layer, input_ids=ids, position=None), x,
                         chunk_size=256) as op:
        full = op.dense("reverse")
    exact = torch.linalg.svdvals(full.double())[:8]
    print(top, exact[:4])
    assert rel(top.singular_values, exact) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_linear_maps_replay_jvps_as_a_batch(arch):
    """Bias-free: the frozen map has no constant, so J v is the replayed model run on v (as a batch)."""
    model = tiny_hf_model(arch, n_layers=3, width=32)
    x = input_embeddings(model, IDS)
    V = torch.randn(5, *x.shape)
    for target, position in (("output", -1), ("layer.1", None)):
        x_t = target_input(model, IDS, target)
        f = state_function(model, target, input_ids=IDS, position=position)
        with frozen_operator(model, f, x_t) as op:
            assert op.jvp_route == "replay" and float(op.constant().abs().max()) == 0.0
            replayed = op.jvp(V)
        with frozen_operator(model, f, x_t, jvp="ad") as op:
            assert op.jvp_route == "ad"
            ad = op.jvp(V)
        assert (replayed - ad).abs().max() < 1e-5 * ad.abs().max(), target
    # the replay trick only slices queries/keys while replaying: a live frozen batch is untouched
    batch = torch.stack([IDS, IDS.flip(0)])
    with torch.no_grad():
        ref = model(batch).logits
        from toolkit.jacobian.freeze import detached
        with detached(model):
            frozen = model(batch).logits
    assert (frozen - ref).abs().max() < 1e-5


def test_affine_maps_refuse_replay():
    model = tiny_hf_model("gpt2", n_layers=2, width=32)
    with torch.no_grad():  # random init leaves the biases at 0 (then the map is linear and replays)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    x = input_embeddings(model, IDS)
    with frozen_operator(model, state_function(model, "output"), x) as op:
        assert op.jvp_route == "ad" and float(op.constant().abs().max()) > 0
    with pytest.raises(ValueError, match="constant term"):
        with frozen_operator(model, state_function(model, "output"), x, jvp="replay"):
            pass
