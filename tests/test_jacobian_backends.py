"""The detached Jacobian through nnsight and TransformerLens equals the direct one."""
from __future__ import annotations

import copy

import pytest
import torch

from toolkit.backends import make_backend
from toolkit.jacobian.freeze import detached
from toolkit import detached_jacobian
from toolkit import detached_jacobian as backend_jacobian  # the loaded model: its own hooking path
from toolkit.families import family_hf_class, tl_bridge_supports
from toolkit.models.tiny import TINY_ARCHITECTURES, tiny_hf_model

pytestmark = pytest.mark.transformer_lens  # also run on transformer-lens 3.9 (make test-tl3)

IDS = torch.tensor([3, 17, 42, 7, 99, 5])
NEW_FAMILIES = ["mistral", "ministral3", "phi3", "olmo2", "gemma2", "smollm3", "gptj", "gpt_neo", "gemma"]  # issue 12
NO_TL_BRIDGE = [a for a in TINY_ARCHITECTURES if not tl_bridge_supports(family_hf_class(a))]  # Ministral


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("target", ["output", 1])
def test_tiny_backends_equal_direct(arch, target, smollm2_tokenizer):
    hf = tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size)
    # references on an untouched copy: TransformerBridge wraps the HF modules in place
    ref = detached_jacobian(copy.deepcopy(hf), IDS, target=target)
    ref_ordinary = detached_jacobian(copy.deepcopy(hf), IDS, target=target, detached=False)
    nn_model = make_backend(hf, smollm2_tokenizer, backend="nnsight")
    via_nn = backend_jacobian(nn_model, IDS, target=target)
    tl_model = make_backend(hf, smollm2_tokenizer, backend="tl")
    via_tl = backend_jacobian(tl_model, IDS, target=target)
    via_nn_bridged = backend_jacobian(nn_model, IDS, target=target)  # nnsight over the now-bridged model
    for r in (via_nn, via_tl, via_nn_bridged):
        assert r.reconstruction_error < 1e-5, r
        assert rel(r.jacobian, ref.jacobian) < 1e-5
        assert rel(r.y, ref.y) < 1e-6 and torch.allclose(r.c, ref.c, atol=1e-5) and torch.equal(r.x, ref.x)
    assert via_nn.settings["backend"] == "nnsight" and via_tl.settings["backend"] == "transformer_lens"
    for model in (nn_model, tl_model):  # the ordinary Jacobian too: same map, no freeze
        ordinary = backend_jacobian(model, IDS, target=target, detached=False)
        assert rel(ordinary.jacobian, ref_ordinary.jacobian) < 1e-5
        assert ordinary.reconstruction_error > 1e-3


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_new_families_same_jacobian_through_both_backends(arch, smollm2_tokenizer):
    """Issue 12's families with a TransformerBridge adapter: direct, nnsight and TransformerLens agree."""
    hf = tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size)
    ref = detached_jacobian(copy.deepcopy(hf), IDS, target="output")
    via_nn = backend_jacobian(make_backend(hf, smollm2_tokenizer, backend="nnsight"), IDS, target="output")
    via_tl = backend_jacobian(make_backend(hf, smollm2_tokenizer, backend="tl"), IDS, target="output")
    for r in (ref, via_nn, via_tl):
        assert r.reconstruction_error < 1e-5, r
    for r in (via_nn, via_tl):
        assert rel(r.jacobian, ref.jacobian) < 1e-5 and rel(r.y, ref.y) < 1e-6 and torch.allclose(r.c, ref.c, atol=1e-5)


def test_freeze_is_reversible_on_wrapped_models(smollm2_tokenizer):
    """Bridges and nnsight controllers get their own forwards back; values unchanged while frozen."""
    hf = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size)
    nn_model = make_backend(hf, smollm2_tokenizer, backend="nnsight")
    tl_model = make_backend(hf, smollm2_tokenizer, backend="tl")
    before = {name: vars(m).get("forward") for name, m in hf.named_modules()}
    ids = IDS[None]
    ref_tl, ref_nn = tl_model.logits(ids), nn_model.hidden_states(ids)
    with detached(hf):
        frozen_tl = tl_model.bridge(ids)
        frozen_nn = nn_model.hidden_states(ids)
    assert (frozen_tl - ref_tl).abs().max() < 1e-5 and (frozen_nn - ref_nn).abs().max() < 1e-5
    assert {name: vars(m).get("forward") for name, m in hf.named_modules()} == before
    assert torch.equal(tl_model.bridge(ids), ref_tl)


def test_smollm2_backends_agree(smollm2_hf, smollm2_nnsight, smollm2_tl, smollm2_tokenizer):
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    assert len(ids) == 5
    # boundary 8 (the output target is checked on the tiny models): the bridge makes each
    # backward pass through all 30 blocks slow, and this test runs three Jacobians
    ref = detached_jacobian(smollm2_hf, ids, target=8)
    via_nn = backend_jacobian(smollm2_nnsight, ids, target=8)
    via_tl = backend_jacobian(smollm2_tl, ids, target=8)
    for r in (ref, via_nn, via_tl):
        assert r.jacobian.shape == (5, 576, 576)
        assert r.reconstruction_error < 1e-5, r
    assert rel(via_nn.jacobian, ref.jacobian) < 1e-5
    assert rel(via_tl.jacobian, ref.jacobian) < 1e-5
    assert rel(via_nn.y, via_tl.y) < 1e-6


def test_bad_backend_and_target(smollm2_tokenizer):
    model = make_backend(tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size), smollm2_tokenizer,
                         backend="nnsight")
    with pytest.raises(ValueError, match="layer boundary"):
        backend_jacobian(model, IDS, target=7)
    model.hf_model.train()
    with pytest.raises(ValueError, match="training mode"):
        backend_jacobian(model, IDS)
    model.hf_model.eval()


@pytest.mark.parametrize("arch", ["mamba", "gemma3", "gpt_neox", "qwen3", "qwen2"] + NO_TL_BRIDGE)
def test_tiny_nnsight_equals_direct_on_other_architectures(arch, smollm2_tokenizer):
    """nnsight serves Mamba and Gemma (and can serve Pythia): same Jacobian as the direct path."""
    hf = tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size)
    ref = detached_jacobian(hf, IDS, target="output")
    via_nn = backend_jacobian(make_backend(hf, smollm2_tokenizer, backend="nnsight"), IDS, target="output")
    assert via_nn.reconstruction_error < 1e-5, via_nn
    assert rel(via_nn.jacobian, ref.jacobian) < 1e-5


def test_deprecated_backend_jacobian_alias_warns_and_agrees(smollm2_tokenizer):
    from toolkit.jacobian.through_backend import backend_jacobian as old_name
    model = make_backend(tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size), smollm2_tokenizer,
                         backend="nnsight")
    with pytest.warns(DeprecationWarning, match="toolkit.detached_jacobian"):
        old = old_name(model, IDS, target=1)
    new = detached_jacobian(model, IDS, target="resid.1")
    assert old.settings["backend"] == new.settings["backend"] == "nnsight"
    assert torch.equal(old.jacobian, new.jacobian)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="takes every target"):
        old_name(model, IDS, target="mlp.0")
