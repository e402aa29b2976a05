"""Backends: boundary definitions, patching, and TransformerLens/nnsight parity."""
from __future__ import annotations

import pytest
import torch

from toolkit.backends import make_backend
from toolkit.models.architectures import spec_for
from toolkit.families import family_hf_class, tl_bridge_supports
from toolkit.models.tiny import TINY_ARCHITECTURES, tiny_hf_model

pytestmark = pytest.mark.transformer_lens  # also run on transformer-lens 3.9 (make test-tl3)

# TransformerBridge has no adapter for some families (Ministral): nnsight serves those alone.
TL_ARCHITECTURES = [a for a in TINY_ARCHITECTURES if tl_bridge_supports(family_hf_class(a))]
CASES = [(a, b) for a in TINY_ARCHITECTURES for b in ("nnsight", "transformer_lens")
         if b == "nnsight" or a in TL_ARCHITECTURES]


def _reference_states(hf_model, ids):
    """h_0..h_L from plain forward hooks on the HF blocks: an independent reference."""
    blocks = spec_for(hf_model).blocks(hf_model)
    seen = {}
    def pre(i):
        def hook(mod, args, kwargs):
            seen[("in", i)] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook
    def post(i):
        def hook(mod, args, out):
            seen[("out", i)] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook
    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        hf_model(ids)
    for h in handles:
        h.remove()
    return torch.stack([seen[("in", 0)]] + [seen[("out", i)] for i in range(len(blocks))])


def _reference_patch(hf_model, ids, layer, positions, values):
    """Logits with h_layer replaced, using a plain pre-hook (or post-hook for the last boundary)."""
    blocks = spec_for(hf_model).blocks(hf_model)
    rows = torch.arange(ids.shape[0])[:, None]
    def edit(h):
        h = h.clone()
        h[rows, positions[:, None]] = values[:, None]
        return h
    if layer < len(blocks):
        def hook(mod, args, kwargs):
            if args:
                return (edit(args[0]),) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
        handle = blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    else:
        handle = blocks[-1].register_forward_hook(  # GPT-J / GPT-Neo blocks return (hidden, attn weights)
            lambda m, a, out: (edit(out[0]),) + out[1:] if isinstance(out, tuple) else edit(out))
    with torch.no_grad():
        logits = hf_model(ids).logits
    handle.remove()
    return logits


@pytest.mark.parametrize("arch, backend", CASES)
def test_hidden_states_match_reference_and_unembed(arch, backend, smollm2_tokenizer):
    hf = tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size)
    model = make_backend(hf, smollm2_tokenizer, backend=backend)
    ids = torch.randint(0, 500, (2, 7))
    hs = model.hidden_states(ids)
    assert hs.shape == (model.n_layers + 1, 2, 7, model.d_model)
    torch.testing.assert_close(hs, _reference_states(hf, ids), rtol=0, atol=1e-6)
    # h_L is before the final norm: unembedding it reproduces the logits.
    torch.testing.assert_close(model.unembed(hs[-1]), model.logits(ids), rtol=1e-5, atol=1e-5)
    # a subset of boundaries, in any order
    torch.testing.assert_close(model.hidden_states(ids, [2, 0]), hs[[2, 0]])


@pytest.mark.parametrize("arch, backend", CASES)
def test_patch_matches_reference(arch, backend, smollm2_tokenizer):
    hf = tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size)
    model = make_backend(hf, smollm2_tokenizer, backend=backend)
    ids = torch.randint(0, 500, (3, 6))
    positions = torch.tensor([0, 2, 5])
    values = torch.randn(3, model.d_model)
    base = model.logits(ids)
    for layer in range(model.n_layers + 1):
        got = model.run_with_patch(ids, layer, positions, values)
        torch.testing.assert_close(got, _reference_patch(hf, ids, layer, positions, values), rtol=1e-5, atol=1e-5)
        # causal: nothing before the patched position changes; the patched position does.
        assert torch.allclose(got[1, :2], base[1, :2], atol=1e-5)
        assert not torch.allclose(got[1, 2], base[1, 2], atol=1e-3)


@pytest.mark.parametrize("arch", TL_ARCHITECTURES)
def test_backends_agree_on_tiny_models(arch, smollm2_tokenizer):
    hf = tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size)
    a = make_backend(hf, smollm2_tokenizer, backend="nnsight")
    b = make_backend(hf, smollm2_tokenizer, backend="tl")
    ids = torch.randint(0, 500, (2, 9))
    torch.testing.assert_close(a.hidden_states(ids), b.hidden_states(ids), rtol=1e-6, atol=1e-6)
    pos, vals = torch.tensor([[1, 4], [3, 8]]), torch.randn(2, 2, a.d_model)
    torch.testing.assert_close(a.run_with_patch(ids, 1, pos, vals), b.run_with_patch(ids, 1, pos, vals),
                               rtol=1e-5, atol=1e-5)


def test_default_backend_by_architecture(smollm2_tokenizer):
    assert make_backend(tiny_hf_model("gpt2"), smollm2_tokenizer).name == "transformer_lens"
    assert make_backend(tiny_hf_model("gpt_neox"), smollm2_tokenizer).name == "transformer_lens"
    for arch in ("llama", "gemma3", "qwen3", "mamba", "qwen2"):
        assert make_backend(tiny_hf_model(arch), smollm2_tokenizer).name == "nnsight"


def test_transformer_lens_refuses_a_family_without_a_bridge_adapter(smollm2_tokenizer):
    assert "ministral" in TINY_ARCHITECTURES and "ministral" not in TL_ARCHITECTURES
    with pytest.raises(ValueError, match="no adapter for MinistralForCausalLM.*backend='nnsight'"):
        make_backend(tiny_hf_model("ministral"), smollm2_tokenizer, backend="tl")


def test_wraps_user_built_nnsight_and_bridge(smollm2_tokenizer):
    from nnsight import NNsight
    from transformer_lens.model_bridge import TransformerBridge
    hf = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size)
    ids = torch.randint(0, 500, (1, 5))
    from_nnsight = make_backend(NNsight(hf), smollm2_tokenizer)
    bridge = TransformerBridge.boot_transformers("llama", hf_model=hf, tokenizer=smollm2_tokenizer)
    from_bridge = make_backend(bridge)
    assert (from_nnsight.name, from_bridge.name) == ("nnsight", "transformer_lens")
    torch.testing.assert_close(from_nnsight.hidden_states(ids), from_bridge.hidden_states(ids))


def test_bad_inputs(smollm2_tokenizer):
    model = make_backend(tiny_hf_model("llama", n_ctx=16), smollm2_tokenizer, backend="nnsight")
    ids = torch.randint(0, 500, (1, 5))
    with pytest.raises(ValueError, match="out of range.*boundaries run from 0"):
        model.hidden_states(ids, [3])
    with pytest.raises(ValueError, match="longer than the context"):
        model.hidden_states(torch.randint(0, 500, (1, 17)))
    with pytest.raises(ValueError, match="patch shapes do not fit"):
        model.run_with_patch(ids, 1, torch.tensor([[1, 2]]), torch.randn(1, 3, model.d_model))
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend(tiny_hf_model("llama"), smollm2_tokenizer, backend="pyvene")
