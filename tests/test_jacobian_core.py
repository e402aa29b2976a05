"""The detached Jacobian's core: the reversible freeze, exact reconstruction, invariance, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.jacobian.compute import (detached_jacobian, input_embeddings, jacobian_rows, linear_map,
                                      ordinary_jacobian, target_function)
from toolkit.jacobian.freeze import UnsupportedModuleError, detached
from toolkit.jacobian.result import DetachedJacobian
from toolkit.models.tiny import TINY_ARCHITECTURES, tiny_hf_model

IDS = torch.tensor([3, 17, 42, 7, 99, 5])
OTHER_IDS = torch.tensor([11, 2, 250, 64, 8, 31])
AFFINE = {"gpt2", "gpt_neox", "mamba", "gptj", "gpt_neo"}  # biases / LayerNorm offsets / conv bias: c != 0 once frozen


def tiny(arch: str, **kwargs) -> nn.Module:
    """Tiny model with every bias and LayerNorm weight perturbed, so that a dropped or doubled
    affine term (random init leaves them at 0 / 1) shows up in the reconstruction."""
    model = tiny_hf_model(arch, n_layers=kwargs.pop("n_layers", 3), width=kwargs.pop("width", 32), **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or (".ln_" in name or "layernorm" in name or "ln_f" in name):
                p.add_(0.1 * torch.randn_like(p))
    return model


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None], use_cache=False).logits


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_freeze_leaves_forward_values_unchanged(arch):
    model = tiny(arch)
    if arch == "gemma3":
        model.config.final_logit_softcapping = 30.0  # outside y, but the logits must still match
    ref = forward_logits(model, IDS)
    with detached(model) as freeze:
        frozen = forward_logits(model, IDS)
    assert freeze.kinds  # something was frozen
    assert (frozen - ref).abs().max().item() < 1e-5
    assert (forward_logits(model, IDS) - ref).abs().max().item() == 0.0  # and nothing lingers


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("target", ["output", 2])
def test_detached_reconstruction_is_exact_and_ordinary_is_not(arch, target):
    model = tiny(arch)
    det = detached_jacobian(model, IDS, target=target)
    ordinary = ordinary_jacobian(model, IDS, target=target)
    assert det.jacobian.shape == (len(IDS), 32, 32)
    assert det.reconstruction_error < 1e-5, det
    assert ordinary.reconstruction_error > 1e-3, ordinary  # GPT-2 at random init: ~9e-3; others ~1
    assert not torch.allclose(det.jacobian, ordinary.jacobian, atol=1e-3)
    # y is the model's own value (freeze changes no values), and c is there exactly when the map is affine.
    assert torch.allclose(det.y, ordinary.y, atol=1e-5)
    c_rel = (det.c.norm() / det.y.norm()).item()
    assert (c_rel > 1e-3) if arch in AFFINE else (c_rel < 1e-7), c_rel
    # causal: later positions do not reach the last one's past, and the last input reaches y
    assert det.jacobian[-1].abs().sum() > 0


def test_boundary_zero_is_the_identity_at_its_position():
    r = detached_jacobian(tiny("llama"), IDS, target=0, position=2)
    expected = torch.zeros_like(r.jacobian)
    expected[2] = torch.eye(32)
    assert torch.equal(r.jacobian, expected) and r.reconstruction_error == 0.0


def test_smollm2_output_reconstruction(smollm2_hf, smollm2_tokenizer):
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    assert len(ids) == 5
    r = detached_jacobian(smollm2_hf, ids, chunk_size=192)
    assert r.jacobian.shape == (len(ids), 576, 576)
    assert r.reconstruction_error < 1e-5, r
    assert r.c.norm() / r.y.norm() < 1e-7  # Llama-style, bias-free: no constant term
    # y is the final-norm state the unfrozen model computes
    with torch.no_grad():
        y_ref = smollm2_hf.model(ids[None]).last_hidden_state[0, -1]
    assert torch.allclose(r.y, y_ref, atol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_freeze_invariance_factors_fixed_at_x_star(arch):
    """With the factors captured at x*, the linear map's Jacobian is the same at any x'."""
    model = tiny(arch)
    x_star, x_prime = input_embeddings(model, IDS), input_embeddings(model, OTHER_IDS)
    at_star = detached_jacobian(model, IDS)
    with linear_map(model, x_star) as F:
        xg = x_prime.clone().requires_grad_(True)
        y_prime = F(xg)
        j_prime = jacobian_rows(y_prime, xg)
        with torch.no_grad():
            y_star = F(x_star)
    scale = at_star.jacobian.abs().max()
    assert (j_prime - at_star.jacobian).abs().max() < 1e-5 * scale
    assert torch.allclose(y_star, at_star.y, atol=1e-5)
    # the fixed-factor map is affine: F(x') = sum_i J_i x'_i + c
    predicted = torch.einsum("toi,ti->o", at_star.jacobian, x_prime) + at_star.c
    assert (predicted - y_prime).norm() / y_prime.norm() < 1e-5
    # ... whereas refreezing at x' (its own factors) gives another Jacobian: the test can fail
    at_prime = detached_jacobian(model, OTHER_IDS)
    assert (at_prime.jacobian - at_star.jacobian).abs().max() > 1e-3 * scale


def test_chunked_vjp_matches_autograd_functional_jacobian():
    model = tiny("gpt2")
    x = input_embeddings(model, IDS)
    f = target_function(model, target=2)
    with detached(model):
        reference = torch.autograd.functional.jacobian(f, x, vectorize=True)  # [d_out, T, d_in]
    for chunk in (5, 64):
        r = detached_jacobian(model, IDS, target=2, chunk_size=chunk)
        assert torch.allclose(r.jacobian, reference.movedim(0, 1), atol=1e-6)


def test_attention_pattern_is_frozen():
    """Only V -> O carries gradient: query and key projections get none."""
    model = tiny("llama")
    x = input_embeddings(model, IDS).requires_grad_(True)
    attn = model.model.layers[0].self_attn
    with detached(model):
        target_function(model)(x).sum().backward()
    assert attn.q_proj.weight.grad is None and attn.k_proj.weight.grad is None
    assert attn.v_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    target_function(model)(x).sum().backward()  # unfrozen again: queries and keys learn
    assert attn.q_proj.weight.grad.abs().sum() > 0


def test_phi3_fused_projections_freeze_only_their_qk_columns_and_gate_half():
    """Phi 3 fuses [q | k | v] in qkv_proj and [gate | up] in gate_up_proj: only v and up stay in the graph."""
    model = tiny("phi3")
    x = input_embeddings(model, IDS).requires_grad_(True)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qk = (model.config.num_attention_heads + model.config.num_key_value_heads) * attn.head_dim
    gate = mlp.down_proj.in_features
    assert attn.qkv_proj.out_features > qk and mlp.gate_up_proj.out_features == 2 * gate
    with detached(model):
        target_function(model)(x).sum().backward()
    g_qkv, g_gate_up = attn.qkv_proj.weight.grad, mlp.gate_up_proj.weight.grad
    assert g_qkv[:qk].abs().max() == 0 and g_qkv[qk:].abs().min(dim=1).values.gt(0).any()
    assert g_gate_up[:gate].abs().max() == 0 and g_gate_up[gate:].abs().sum(dim=1).gt(0).all()
    model.zero_grad(set_to_none=True)
    target_function(model)(x).sum().backward()  # unfrozen: queries, keys and the gate learn
    assert attn.qkv_proj.weight.grad[:qk].abs().sum() > 0 and mlp.gate_up_proj.weight.grad[:gate].abs().sum() > 0


@pytest.mark.parametrize("swap", ["mish", "custom"])
def test_unsupported_module_kind_is_named(swap):
    class Wiggle(nn.Module):
        def forward(self, x):
            return torch.sin(x) * x

    model = tiny("gpt2")
    model.transformer.h[1].mlp.act = nn.Mish() if swap == "mish" else Wiggle()
    name = "Mish" if swap == "mish" else "Wiggle"
    with pytest.raises(UnsupportedModuleError, match=name) as err:
        with detached(model):
            pass
    assert "transformer.h.1.mlp.act" in str(err.value)
    assert not any("forward" in vars(m) for m in model.modules())  # refused before patching anything
    with pytest.raises(UnsupportedModuleError, match=name):
        detached_jacobian(model, IDS)


def test_freeze_is_reversible_even_after_an_exception():
    model = tiny("gemma3")
    norm = model.model.layers[0].input_layernorm
    h = torch.randn(1, 4, 32, requires_grad=True)
    v = torch.randn(1, 4, 32)

    def norm_grad() -> torch.Tensor:
        (g,) = torch.autograd.grad((norm(h) * v).sum(), h)
        return g

    before = norm_grad()
    with pytest.raises(KeyError):
        with detached(model):
            during = norm_grad()
            raise KeyError("boom")
    after = norm_grad()
    assert not torch.allclose(before, during, atol=1e-4)  # the freeze cut the rsqrt's gradient
    assert torch.equal(before, after)                     # and gradients flow through the norm again
    assert not any("forward" in vars(m) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    with detached(model):  # and it can be frozen again
        pass


def test_save_load_roundtrip_and_refusal(tmp_path):
    r = detached_jacobian(tiny("gpt_neox"), IDS, target=1)
    loaded = DetachedJacobian.load(r.save(tmp_path / "jac.pt"))
    assert torch.equal(loaded.jacobian, r.jacobian) and torch.equal(loaded.c, r.c)
    assert loaded.settings == r.settings and loaded.reconstruction_error == r.reconstruction_error
    torch.save({"kind": "something.else", "data": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved DetachedJacobian"):
        DetachedJacobian.load(tmp_path / "other.pt")


def test_bad_requests_fail_clearly():
    model = tiny("llama")
    with pytest.raises(ValueError, match="boundary"):
        detached_jacobian(model, IDS, target=7)
    with pytest.raises(ValueError, match="one non-empty sequence"):
        detached_jacobian(model, torch.stack([IDS, IDS]))
