"""The freeze sees what the model really runs (issue 15): overrides and hooks are refused by name, and
every Jacobian checks its frozen output against the live model and its reconstruction against the dtype."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.modules.module as torch_module

from toolkit.backends import make_backend
from toolkit.jacobian.all_layers import all_layer_jacobians
from toolkit.jacobian.compute import detached_jacobian
from toolkit.jacobian.guards import (FreezeCheckError, FreezeWarning, LiveModelError, affine_hook, inspect_model,
                                     tolerance)
from toolkit.jacobian.matrix_free import jacobian_svd
from toolkit.models.tiny import tiny_hf_model

IDS = torch.tensor([3, 14, 15, 92, 65])


def tanh_on_output(module, args, out):
    return torch.tanh(out)


def test_instance_forward_override_is_refused_naming_the_module():
    model = tiny_hf_model("llama")
    mlp = model.model.layers[1].mlp
    original = mlp.forward

    def my_variant(x):
        return original(x) * 1.5

    mlp.forward = my_variant
    with pytest.raises(LiveModelError, match=r"model\.layers\.1\.mlp: instance-level forward override my_variant"):
        detached_jacobian(model, IDS)
    with pytest.raises(LiveModelError, match="remove it"):
        jacobian_svd(model, IDS, k=2)


def test_override_with_strict_false_records_the_live_output_mismatch():
    model = tiny_hf_model("llama")
    original = model.model.layers[1].mlp.forward
    model.model.layers[1].mlp.forward = lambda x: original(x) * 1.5
    with pytest.warns(FreezeWarning):
        r = detached_jacobian(model, IDS, strict=False)
    # The freeze computed the class forward: its y is not what the user's model computes, and says so.
    assert r.settings["checks"]["live_error"] > 1e-2 > tolerance(torch.float32).live
    assert any("instance-level forward override" in w for w in r.settings["warnings"])
    assert any("live model's own" in w for w in r.settings["warnings"])


def test_forward_hook_is_refused_naming_module_and_hook():
    model = tiny_hf_model("llama")
    handle = model.model.layers[1].mlp.register_forward_hook(tanh_on_output)
    try:
        with pytest.raises(LiveModelError, match=r"model\.layers\.1\.mlp: forward hook tanh_on_output.*affine_hook"):
            detached_jacobian(model, IDS)
        with pytest.raises(LiveModelError, match="tanh_on_output"):
            all_layer_jacobians(model, IDS)
    finally:
        handle.remove()
    assert detached_jacobian(model, IDS).reconstruction_error < 1e-5  # removed: computes again


def test_pre_hooks_backward_hooks_and_global_hooks_are_named():
    model = tiny_hf_model("gpt2")
    pre = model.transformer.h[0].attn.register_forward_pre_hook(lambda m, args: (args[0] * 2,) + args[1:])
    back = model.transformer.h[1].mlp.register_full_backward_hook(lambda m, gi, go: None)
    glob = torch_module.register_module_forward_hook(lambda m, a, out: None)
    try:
        found = [str(f) for f in inspect_model(model)]
    finally:
        pre.remove(), back.remove(), glob.remove()
    assert any(f.startswith("transformer.h.0.attn: forward-pre hook") for f in found)
    assert any(f.startswith("transformer.h.1.mlp: backward hook") for f in found)
    assert any("global forward hook" in f and "register_module_forward_hook" in f for f in found)
    assert inspect_model(model) == []


def test_strict_false_returns_with_a_recorded_warning():
    model = tiny_hf_model("llama")
    handle = model.model.layers[0].mlp.register_forward_hook(tanh_on_output)
    try:
        with pytest.warns(FreezeWarning, match="tanh_on_output"):
            r = detached_jacobian(model, IDS, strict=False)
        with pytest.warns(FreezeWarning):
            top = jacobian_svd(model, IDS, k=2, strict=False)
    finally:
        handle.remove()
    assert r.settings["checks"]["strict"] is False
    assert any("model.layers.0.mlp: forward hook tanh_on_output" in w for w in r.settings["warnings"])
    assert any("tanh_on_output" in w for w in top.settings["warnings"])


def test_a_nonlinear_hook_marked_affine_fails_the_numeric_checks():
    # The structural check trusts the mark; the reconstruction and the VJP probe do not.
    model = tiny_hf_model("llama")
    handle = model.model.layers[0].mlp.register_forward_hook(affine_hook(lambda m, a, out: torch.tanh(40 * out)))
    try:
        with pytest.raises(FreezeCheckError, match="not affine|reconstruction error"):
            detached_jacobian(model, IDS)
        with pytest.raises(FreezeCheckError, match="not affine"):
            jacobian_svd(model, IDS, k=2)
    finally:
        handle.remove()


def test_a_truly_affine_hook_passes_and_is_exact():
    model = tiny_hf_model("gpt2")
    shift = torch.randn(64)
    handle = model.transformer.h[0].mlp.register_forward_hook(affine_hook(lambda m, a, out: out + shift))
    try:
        r = detached_jacobian(model, IDS)
    finally:
        handle.remove()
    assert r.reconstruction_error < 1e-5 and r.settings["warnings"] == []
    assert r.settings["checks"]["live_error"] < 1e-5


def test_backend_wrappers_are_seen_through_and_user_hooks_are_not(smollm2_tokenizer):
    hf = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size)
    nn_model = make_backend(hf, smollm2_tokenizer, backend="nnsight")
    tl_model = make_backend(hf, smollm2_tokenizer, backend="tl")
    assert inspect_model(hf) == []  # nnsight Controllers, bridge wiring: known
    for model in (nn_model, tl_model):
        r = detached_jacobian(model, IDS)
        assert r.reconstruction_error < 1e-5 and r.settings["checks"]["live_error"] < 1e-4
    tl_model.bridge.add_hook("blocks.1.hook_mlp_out", lambda act, hook: torch.tanh(act))
    try:
        hook_point = r"mlp\.hook_out: forward hook <lambda> \(TransformerLens hook point 'blocks\.1\.mlp\.hook_out'\)"
        with pytest.raises(LiveModelError, match=hook_point):
            detached_jacobian(tl_model, IDS)
    finally:
        tl_model.bridge.reset_hooks()
    assert detached_jacobian(tl_model, IDS).reconstruction_error < 1e-5


def test_override_installed_before_nnsight_wraps_the_module_is_refused(smollm2_tokenizer):
    hf = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size)
    original = hf.model.layers[0].mlp.forward

    def doubled_mlp(x):
        return 2 * original(x)

    hf.model.layers[0].mlp.forward = doubled_mlp
    model = make_backend(hf, smollm2_tokenizer, backend="nnsight")  # the Controller now runs doubled_mlp
    with pytest.raises(LiveModelError, match=r"model\.layers\.0\.mlp: instance-level forward override"):
        detached_jacobian(model, IDS)


@pytest.fixture
def own_smollm2():
    """A SmolLM2 of this test's own: the session fixture is shared with tests that wrap it in place (nnsight gives
    every module an instance-level forward, TransformerBridge replaces the blocks), and this test edits its modules."""
    from transformers import AutoModelForCausalLM
    from toolkit.models.weights import SMOLLM2, converted_folder
    return AutoModelForCausalLM.from_pretrained(str(converted_folder(SMOLLM2)), dtype=torch.float32).eval()


def test_smollm2_hook_and_override_are_caught(own_smollm2, smollm2_tokenizer):
    smollm2_hf = own_smollm2
    # Boundary 5 (the hook sits in block 3): the same checks as the output, at a sixth of the cost.
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    clean = detached_jacobian(smollm2_hf, ids, target=5, chunk_size=192)
    assert clean.settings["checks"]["live_error"] < tolerance(torch.float32).live
    assert clean.reconstruction_error < 1e-5 and clean.settings["warnings"] == []

    mlp = smollm2_hf.model.layers[3].mlp
    handle = mlp.register_forward_hook(tanh_on_output)
    try:
        with pytest.raises(LiveModelError, match=r"model\.layers\.3\.mlp: forward hook tanh_on_output"):
            detached_jacobian(smollm2_hf, ids, target=5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loose = detached_jacobian(smollm2_hf, ids, target=5, chunk_size=192, strict=False)
    finally:
        handle.remove()
    # The hook is differentiated through, not detached: the map is not linear and the result says so.
    assert loose.reconstruction_error > 1e-3
    assert any("reconstruction error" in w for w in loose.settings["warnings"])
    assert sum(issubclass(w.category, FreezeWarning) for w in caught) >= 2

    original = mlp.forward
    mlp.forward = lambda x: original(x) * 1.5
    try:
        with pytest.raises(LiveModelError, match=r"model\.layers\.3\.mlp: instance-level forward override"):
            detached_jacobian(smollm2_hf, ids, target=5)
    finally:
        del mlp.forward
    assert inspect_model(smollm2_hf) == []
