"""The HookedTransformer backend (TransformerLens 3): parity with nnsight, the freeze's guarantees on
TransformerLens' own components, processed weights refused, and the clear error on TransformerLens 4.

Every test needing HookedTransformer takes the ``hooked_tl`` fixture (conftest): it skips on the pinned
stack (TransformerLens 4.3) and runs in ``make test-tl3`` (transformer-lens 3.9), where a skip fails.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import toolkit
from toolkit.backends import make_backend
from toolkit.backends.hooked_backend import ProcessedWeightsError, hooked_from_hf, weight_processing
from toolkit.jacobian.freeze import UnsupportedModuleError, detached
from toolkit.jacobian.freeze_rules import FreezeError
from toolkit.models.tiny import tiny_hf_model

pytestmark = pytest.mark.transformer_lens

IDS = torch.tensor([[3, 17, 42, 7, 99, 5]])
TINY = ["gpt2", "gpt_neox", "llama"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def pair(arch: str, tokenizer):
    """(nnsight backend, hooked backend) over the same tiny HF model (nnsight on a copy: it wraps in place)."""
    hf = tiny_hf_model(arch, vocab_size=tokenizer.vocab_size)
    return make_backend(copy.deepcopy(hf), tokenizer, backend="nnsight"), make_backend(hf, tokenizer, backend="hooked")


def test_hooked_backend_needs_transformer_lens_3(smollm2_tokenizer):
    """TransformerLens 4 (main leg): backend='hooked' stops with the fix; TransformerLens 3: it builds."""
    hf = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size)
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"transformer-lens==3\.9\.0.*backend='tl'"):
            make_backend(hf, smollm2_tokenizer, backend="hooked")
        with pytest.raises(ImportError, match="TransformerLens 4 removed it"):
            toolkit.load_model("smollm2-135m", backend="hooked")
    else:
        assert make_backend(hf, smollm2_tokenizer, backend="hooked").name == "hooked"


@pytest.mark.parametrize("arch", TINY)
def test_tiny_states_logits_patches_equal_nnsight(arch, smollm2_tokenizer, hooked_tl):
    ref, model = pair(arch, smollm2_tokenizer)
    assert isinstance(model.hooked, hooked_tl) and model.frozen_module is model.hooked
    hs = model.hidden_states(IDS)
    assert hs.shape == (3, 1, 6, 64)
    assert (hs - ref.hidden_states(IDS)).abs().max() < 1e-5
    assert (model.hidden_states(IDS, layers=[1])[0] - hs[1]).abs().max() == 0   # early stop: same tensor
    assert (model.logits(IDS) - ref.logits(IDS)).abs().max() < 1e-4
    assert (model.unembed(hs[-1]) - ref.logits(IDS)).abs().max() < 1e-4          # ln_final + unembed of h_L
    assert (model.W_E - ref.W_E).abs().max() == 0 and (model.W_U - ref.W_U).abs().max() < 1e-6
    values = torch.randn(1, 2, 64)
    for layer in (0, 1, 2):
        pos = torch.tensor([[1, 4]])
        got, want = model.run_with_patch(IDS, layer, pos, values), ref.run_with_patch(IDS, layer, pos, values)
        assert (got - want).abs().max() < 1e-4
        assert (got - model.logits(IDS)).abs().max() > 1e-3                         # the patch did something
    with pytest.raises(ValueError, match="does not take kv_cache"):
        model.hidden_states(IDS, kv_cache=object())


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("target", ["output", 1, "mlp.0"])
def test_tiny_detached_jacobian_equals_nnsight(arch, target, smollm2_tokenizer, hooked_tl):
    ref, model = pair(arch, smollm2_tokenizer)
    if arch == "gpt2":  # random init leaves GPT-2's biases at 0: give the constant term something to carry
        with torch.no_grad():
            for m in (ref.hf_model, model.hf_model):
                for block in m.transformer.h:
                    block.mlp.c_fc.bias.fill_(0.1)
        model = make_backend(model.hf_model, smollm2_tokenizer, backend="hooked")
    a = toolkit.detached_jacobian(ref, IDS[0], target=target)
    b = toolkit.detached_jacobian(model, IDS[0], target=target)
    assert b.reconstruction_error < 1e-5 and a.reconstruction_error < 1e-5
    assert rel(b.jacobian, a.jacobian) < 1e-5 and rel(b.y, a.y) < 1e-5
    assert torch.allclose(b.c, a.c, atol=1e-5) and torch.allclose(b.x, a.x, atol=1e-6)
    if target != "mlp.0":   # "output" and boundaries run through the HookedTransformer's own hooks
        assert b.settings["backend"] == "hooked"
    if arch == "gpt2" and target == 1:
        assert b.c.norm() > 1e-3                                                      # biases: c != 0
    ordinary = toolkit.detached_jacobian(model, IDS[0], target=target, detached=False)
    assert ordinary.reconstruction_error > 1e-3 and rel(ordinary.jacobian, b.jacobian) > 1e-3


@pytest.mark.parametrize("arch", TINY)
def test_freeze_keeps_values_and_undoes_itself(arch, smollm2_tokenizer, hooked_tl):
    _, model = pair(arch, smollm2_tokenizer)
    ht = model.hooked
    before = model.logits(IDS)
    hooks = {name: dict(m._forward_hooks) for name, m in ht.named_modules()}
    with detached(ht) as freeze:
        with freeze.recording():
            during = ht(IDS)
        kinds = set(freeze.kinds.values())
        with freeze.replaying():                     # the frozen map at fixed factors is affine in the input
            embed = ht.embed(IDS).detach()
            f = lambda e: ht(e, start_at_layer=0)
            a, b = f(embed), f(2 * embed) - f(embed)
            assert (f(3 * embed) - (a + 2 * b)).abs().max() < 1e-3 * a.abs().max()
    assert (during - before).abs().max() < 1e-5
    assert {"norm", "attention", "linear"} <= kinds and kinds & {"activation", "gated_mlp"}
    assert {name: dict(m._forward_hooks) for name, m in ht.named_modules()} == hooks
    assert torch.equal(model.logits(IDS), before)


def test_unknown_component_kinds_are_refused(smollm2_tokenizer, hooked_tl):
    _, model = pair("gpt2", smollm2_tokenizer)
    ht = model.hooked

    class SquaredMLP(torch.nn.Module):          # a kind with no rule: may hold a nonlinearity
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x) ** 2

    original = ht.blocks[1].mlp
    ht.blocks[1].mlp = SquaredMLP(original)
    with pytest.raises(UnsupportedModuleError, match=r"SquaredMLP \(at blocks\.1\.mlp\)"):
        toolkit.detached_jacobian(model, IDS[0])
    ht.blocks[1].mlp = original
    ht.cfg.act_fn = "solu_ln"                   # an activation without a gate in the table
    with pytest.raises(FreezeError, match="'solu_ln' has no freeze rule"):
        with detached(ht):
            pass


def test_processed_weights_are_refused_naming_each_step(smollm2_tokenizer, hooked_tl):
    hf = tiny_hf_model("gpt2", vocab_size=smollm2_tokenizer.vocab_size)
    raw = hooked_from_hf(hf, smollm2_tokenizer)
    assert weight_processing(raw) == []
    assert make_backend(raw, hf_model=hf).name == "hooked"          # a user's raw HookedTransformer is taken
    unembed_only = copy.deepcopy(raw)
    unembed_only.process_weights_(fold_ln=False, center_writing_weights=False, center_unembed=True)
    assert weight_processing(unembed_only) == ["center_unembed"]
    folded = copy.deepcopy(raw)
    folded.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert weight_processing(folded) == ["fold_ln", "center_writing_weights", "center_unembed"]
    with pytest.raises(ProcessedWeightsError, match=r"fold_ln: .*center_writing_weights: .*center_unembed: .*"
                                                    r"from_pretrained_no_processing"):
        make_backend(folded, hf_model=hf)
    with pytest.raises(ProcessedWeightsError, match="center_unembed"):
        toolkit.detached_jacobian(unembed_only, IDS[0])                 # the analyses refuse it too


def test_user_hooked_transformer_needs_its_own_hf_model(smollm2_tokenizer, hooked_tl):
    hf = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size)
    ht = hooked_from_hf(hf, smollm2_tokenizer)
    with pytest.raises(ValueError, match=r"needs the HF model it was built from \(hf_model=\.\.\.\)"):
        make_backend(ht)
    other = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size, seed=1)
    with pytest.raises(ValueError, match="different networks"):
        make_backend(ht, hf_model=other)
    model = make_backend(ht, hf_model=hf)
    assert model.hooked is ht and (model.logits(IDS) - hf(IDS).logits).abs().max() < 1e-4


def test_interventions_run_through_the_hooked_model(smollm2_tokenizer, hooked_tl):
    """The decomposition's KL interventions: the hooked backend keeps no transformers cache, so they run as
    full patched forwards through the HookedTransformer, and agree with nnsight's cached path."""
    from toolkit.decompose.interventions import patched_kl
    ref, model = pair("llama", smollm2_tokenizer)
    assert not model.kv_cache_support and ref.kv_cache_support
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (2, 10), generator=generator)
    positions = torch.tensor([[2, 5], [3, 7]])
    values = {1: torch.randn(4, 64, generator=generator), ("shuffled", 2): torch.randn(4, 64, generator=generator)}
    for kl_positions in ("next", "later"):
        a = patched_kl(ref, tokens, positions, values, kl_positions, progress=False)
        b = patched_kl(model, tokens, positions, values, kl_positions, progress=False)
        for key in values:
            assert (b[key] > 0).all()
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-7)


# ----- real models -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_hooked(hooked_tl):
    return toolkit.load_model("smollm2-135m", backend="hooked", device="cpu")


def test_smollm2_hooked_equals_nnsight_and_runs_both_analyses(smollm2_hooked, smollm2_nnsight, tmp_path,
                                                              monkeypatch):
    """Done-when of issue 16: the public API on a real model through a TransformerLens 3 HookedTransformer."""
    model, ref = smollm2_hooked, smollm2_nnsight
    ids = model.to_tokens("The capital of France is")
    hs, ref_hs = model.hidden_states(ids), ref.hidden_states(ids)
    assert (hs - ref_hs).abs().max() <= 1e-6 * ref_hs.abs().max()          # ~2e4 massive activations: relative
    assert (model.logits(ids) - ref.logits(ids)).abs().max() < 5e-4
    pos, values = torch.tensor([[2]]), 1.5 * ref_hs[10, :, [1]]
    assert (model.run_with_patch(ids, 10, pos, values) - ref.run_with_patch(ids, 10, pos, values)).abs().max() < 5e-4
    again = make_backend(model.hooked)               # a bare HookedTransformer of a registry model: its HF copy found
    assert again.hf_model is not model.hf_model and again.info.model_id == "smollm2-135m"
    assert (again.logits(ids) - model.logits(ids)).abs().max() == 0
    short = ids[0, :3]
    a = toolkit.detached_jacobian(ref, short, target="resid.6")
    b = toolkit.detached_jacobian(model, short, target="resid.6")
    assert b.settings["backend"] == "hooked" and b.reconstruction_error < 1e-5
    assert rel(b.jacobian, a.jacobian) < 1e-5 and rel(b.y, a.y) < 1e-5
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    kwargs = dict(layers=[2], n_train=6, n_test=2, seq_len=40, per_text=4, k=16, rank=8, compare_mlp=False,
                  n_boot=50, progress=False, controls=False, random_control=False)
    ours = toolkit.decompose_layers(model, "wikitext-test", **kwargs)
    theirs = toolkit.decompose_layers(ref, "wikitext-test", **kwargs)
    assert ours.settings["backend"] == "hooked"
    for col in ("rel_err", "kl"):
        np.testing.assert_allclose(ours.anchors[col], theirs.anchors[col], rtol=2e-3, atol=1e-5)
    assert (ours.anchors["kl"] > 0).all()


def test_gemma3_official_name_loads_with_raw_numerics(hooked_tl):
    """Gemma-3-270m goes through HookedTransformer.from_pretrained_no_processing(official name, hf_model=...)."""
    model = toolkit.load_model("gemma-3-270m", backend="hooked", device="cpu")
    ref = make_backend(model.hf_model, model.tokenizer, backend="nnsight", model_id="gemma-3-270m")
    assert model.hooked.cfg.original_architecture == "Gemma3ForCausalLM" and weight_processing(model.hooked) == []
    ids = model.to_tokens("The capital of France is")
    hs, ref_hs = model.hidden_states(ids), ref.hidden_states(ids)
    assert (hs - ref_hs).abs().max() <= 1e-6 * ref_hs.abs().max()
    assert (model.logits(ids) - ref.logits(ids)).abs().max() < 5e-4
    a = toolkit.detached_jacobian(ref, ids[0, :3], target="resid.2")
    b = toolkit.detached_jacobian(model, ids[0, :3], target="resid.2")
    assert b.reconstruction_error < 1e-5 and rel(b.jacobian, a.jacobian) < 1e-5
