"""Reduced precision (bfloat16, float16) end to end, with stated bounds.

The detached Jacobian's reconstruction ``||sum_i J_i x_i + c - y|| / ||y||`` is exact up to the
rounding of the dtype the model runs in: measured here about 1e-2 in bfloat16 (8-bit mantissa,
eps 7.8e-3) and 1e-3 in float16 (eps 9.8e-4; the paper reports ~1e-3), against ~5e-7 in float32.
The bound asserted is four times the dtype's eps: 3e-2 (bfloat16), 4e-3 (float16).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import toolkit
from toolkit.backends import make_backend
from toolkit.jacobian.compute import detached_jacobian
from toolkit.jacobian.through_backend import backend_jacobian
from toolkit.models.tiny import tiny_hf_model

BOUND = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_tiny_reconstruction_within_the_dtype_bound(arch, dtype):
    model = tiny_hf_model(arch, dtype=dtype)
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    for target in ("output", 1, "mlp.1", "layer.1"):
        r = detached_jacobian(model, ids, target=target)
        assert r.jacobian.dtype == dtype and r.settings["dtype"] == str(dtype)
        # Within the bound, and not secretly float32: the error is that of the reduced dtype.
        assert 1e-5 < r.reconstruction_error < BOUND[dtype], (target, r.reconstruction_error)


def test_tiny_bfloat16_interventions_and_steering(smollm2_tokenizer):
    from toolkit.decompose.interventions import patched_kl, patched_kl_plain
    from toolkit.jacobian.steering import steer
    model = make_backend(tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size, dtype=torch.bfloat16),
                         smollm2_tokenizer, backend="nnsight")
    tokens = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[3, 7], [2, 9]])
    values = {1: torch.randn(4, model.d_model), 2: torch.randn(4, model.d_model)}
    fast, plain = patched_kl(model, tokens, positions, values, progress=False), patched_kl_plain(model, tokens, positions, values)
    for b in values:
        assert fast[b].dtype == torch.float64 and bool((fast[b] > 0).all())
        assert torch.allclose(fast[b], plain[b], rtol=5e-2, atol=1e-4)   # two routes, bf16 rounding apart
    r = steer(model, "The bridge is the Golden", "I am going to see the", layer=1, lam=0.0, max_new_tokens=3)
    assert r.steered.token_ids == r.baseline.token_ids
    r = steer(model, "The bridge is the Golden", "I am going to see the", layer=1, lam=4.0, max_new_tokens=3)
    assert r.steered.edit_norm > 0 and np.isfinite(r.steered.token_logprobs).all()


@pytest.fixture(scope="module")
def smollm2_bf16():
    return toolkit.load_model("smollm2-135m", backend="nnsight", dtype="bfloat16", device="cpu")


def test_smollm2_bfloat16_reconstruction(smollm2_bf16, smollm2_nnsight):
    assert smollm2_bf16.dtype == torch.bfloat16
    ids = smollm2_bf16.to_tokens("The bridge out of Marin is the Golden")[0][:6]
    r = backend_jacobian(smollm2_bf16, ids)
    ref = backend_jacobian(smollm2_nnsight, ids)
    assert r.jacobian.dtype == torch.bfloat16
    print(f"SmolLM2 output Jacobian, 6 tokens: reconstruction error bfloat16 {r.reconstruction_error:.2e}, "
          f"float32 {ref.reconstruction_error:.2e}")
    assert 1e-4 < r.reconstruction_error < BOUND[torch.bfloat16]
    # The bfloat16 Jacobian is the float32 one to bfloat16 accuracy (relative Frobenius distance).
    diff = float((r.jacobian.double() - ref.jacobian.double()).norm() / ref.jacobian.double().norm())
    assert diff < 5e-2, diff


def test_smollm2_bfloat16_rho_inside_float32_interval(smollm2_bf16, smollm2_nnsight):
    from toolkit.decompose.pipeline import decompose
    kw = dict(layers=[3, 20], n_train=32, n_test=12, seq_len=64, compare_mlp=False, random_control=False,
              n_boot=300, progress=False)
    f32 = {r["layer"]: r for r in decompose(smollm2_nnsight, "embedded", **kw).layer_summary}
    bf16 = {r["layer"]: r for r in decompose(smollm2_bf16, "embedded", **kw).layer_summary}
    for layer in (3, 20):
        lo, hi, rho = f32[layer]["rho_ci_low"], f32[layer]["rho_ci_high"], bf16[layer]["rho"]
        print(f"layer {layer}: rho float32 {f32[layer]['rho']:.3f} [{lo:.3f}, {hi:.3f}], bfloat16 {rho:.3f}")
        assert np.isfinite(rho) and lo <= rho <= hi
