"""The cached intervention path equals the plain full-forward path."""
from __future__ import annotations

import pytest
import torch

from toolkit.backends import make_backend
from toolkit.backends.base import Patch
from toolkit.backends.incremental import (cache_kwargs, full_cache, full_cache_supported, prefix_caches, repeat_cache,
                                          run_queries)
from toolkit.collection.pairs import collect_hidden_states
from toolkit.decompose.interventions import patched_kl, patched_kl_plain
from toolkit.decompose.kl import kl_divergence, kl_from_normed, kl_many
from toolkit.families import family_hf_class, tl_bridge_supports
from toolkit.models.tiny import MECHANISM_ARCHITECTURES, tiny_hf_model

# nnsight serves every family; TransformerBridge those it has an adapter for (not Ministral)
CASES = [(a, b) for a in MECHANISM_ARCHITECTURES + ("ministral",) for b in ("nnsight", "tl")
         if b == "nnsight" or tl_bridge_supports(family_hf_class(a))]


@pytest.mark.parametrize("arch, backend", CASES)
def test_cached_step_equals_full_patch(arch, backend, smollm2_tokenizer):
    model = make_backend(tiny_hf_model(arch, n_layers=3, vocab_size=smollm2_tokenizer.vocab_size),
                         smollm2_tokenizer, backend=backend)
    ids, p = torch.randint(0, 500, (1, 12)), 7
    n = model.n_layers + 1
    values = torch.randn(n, model.d_model)
    cache = repeat_cache(prefix_caches(model, ids, [p])[0], n)
    patches = [Patch(l, torch.tensor([l]), torch.tensor([0]), values[l:l + 1]) for l in range(n)]
    step = model.run_with_patches(ids[:, p:p + 1].expand(n, 1), patches, **cache_kwargs(model, cache))
    full = torch.stack([model.run_with_patch(ids, l, torch.tensor([p]), values[l:l + 1])[0, p] for l in range(n)])
    torch.testing.assert_close(step[:, 0], full, rtol=1e-4, atol=1e-5)


def test_prefix_caches_rejects_bad_cuts(smollm2_tokenizer):
    model = make_backend(tiny_hf_model("llama"), smollm2_tokenizer)
    with pytest.raises(ValueError, match="ascending and >= 1"):
        prefix_caches(model, torch.randint(0, 500, (1, 8)), [4, 2])


def test_kl_divergence_basics():
    a = torch.randn(3, 50)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert (kl_divergence(a, torch.randn(3, 50)) > 0).all()


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 60.0])   # 60: logit gaps past expm1's range, the fallback
def test_kl_matches_float64_log_softmax(scale):
    g = torch.Generator().manual_seed(3)
    p = 4 * torch.randn(16, 49152, generator=g)
    p[:, :10] += 12                                           # peaked, like a language model's next token
    q = p[:, None] + scale * torch.randn(16, 3, 49152, generator=g) + 2.0   # a constant shift changes nothing
    logp, logq = torch.log_softmax(p.double(), -1)[:, None], torch.log_softmax(q.double(), -1)
    expected = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(kl_many(p, q), expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(kl_divergence(p[:, None], q), expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 60.0])
def test_kl_from_hidden_states_matches_float64_log_softmax(scale):
    g = torch.Generator().manual_seed(4)
    W, bias = 0.05 * torch.randn(20000, 64, generator=g), torch.randn(20000, generator=g)
    n_p = 3 * torch.randn(8, 64, generator=g)
    n_q = n_p[:, None] + scale * 0.3 * torch.randn(8, 3, 64, generator=g)
    for b in (None, bias):
        lp, lq = n_p.double() @ W.double().T, n_q.double() @ W.double().T
        if b is not None:
            lp, lq = lp + b.double(), lq + b.double()
        logp, logq = torch.log_softmax(lp, -1)[:, None], torch.log_softmax(lq, -1)
        expected = (logp.exp() * (logp - logq)).sum(-1)
        # chunks that do not divide the vocabulary; scale 60 takes the far-row fallback
        got = kl_from_normed(n_p, n_q, W, b, chunk=3000)
        torch.testing.assert_close(got, expected, rtol=2e-3 if scale == 1e-4 else 1e-4, atol=1e-12)
        p = torch.softmax(lp.float(), -1)
        torch.testing.assert_close(kl_from_normed(n_p, n_q, W, b, p=p, p_weight=p @ W), got, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("kl_positions", ["next", "later"])
def test_fast_kl_equals_plain_on_smollm2(smollm2_nnsight, kl_positions):
    model = smollm2_nnsight
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 20000, (2, 24), generator=g)
    positions = torch.tensor([[3, 10, 17], [5, 6, 20]])
    rows = torch.arange(2)[:, None]
    hs = model.hidden_states(tokens, [5, 20])
    values = {b: (hs[i, rows, positions] * 0.9 + 0.3 * torch.randn(2, 3, 576, generator=g)).reshape(-1, 576)
              for i, b in enumerate((5, 20))}
    fast = patched_kl(model, tokens, positions, values, kl_positions=kl_positions, progress=False)
    plain = patched_kl_plain(model, tokens, positions, values, kl_positions=kl_positions)
    for b in values:
        assert (plain[b] > 1e-4).all()
        torch.testing.assert_close(fast[b], plain[b], rtol=1e-3, atol=1e-6)
    # replacing with the original value changes nothing
    same = {5: hs[0, rows, positions].reshape(-1, 576)}
    assert patched_kl(model, tokens, positions, same, progress=False)[5].abs().max() < 1e-6


def test_bad_values_shape(smollm2_tokenizer):
    model = make_backend(tiny_hf_model("llama"), smollm2_tokenizer)
    tokens, positions = torch.randint(0, 500, (2, 8)), torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="values for boundary 1 must be \\[4, 64\\]"):
        patched_kl(model, tokens, positions, {1: torch.randn(3, 64)})
    with pytest.raises(ValueError, match="boundary 0"):
        patched_kl(model, tokens, positions, {0: torch.randn(4, 64)})


@pytest.mark.parametrize("arch", MECHANISM_ARCHITECTURES)
def test_fast_kl_equals_plain_on_tiny_models(arch, smollm2_tokenizer):
    # tiny gemma3 has a sliding window of 8 < seq_len: it must take the per-position route and still agree
    model = make_backend(tiny_hf_model(arch, n_layers=3, vocab_size=smollm2_tokenizer.vocab_size),
                         smollm2_tokenizer)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 500, (2, 16), generator=g)
    positions = torch.tensor([[1, 7, 15], [2, 3, 9]])
    values = {b: torch.randn(6, model.d_model, generator=g) for b in (1, 2, 3)}
    values[("variant", 2)] = torch.randn(6, model.d_model, generator=g)
    fast = patched_kl(model, tokens, positions, values, max_rows=3, progress=False)  # 2 groups of rows
    plain = patched_kl_plain(model, tokens, positions, values)
    for b in values:
        # Mamba's cached step and its full-sequence scan differ by float32 rounding (~1e-3 relative on KL)
        torch.testing.assert_close(fast[b], plain[b], rtol=5e-3, atol=1e-7)


def test_full_cache_route_on_gemma3_with_both_layer_types(smollm2_tokenizer):
    # 7 layers of Gemma 3: sliding and global layers (own rotary bases) in one model, window wider
    # than text + queries, so every boundary takes the full-cache route that skips the blocks below it.
    hf = tiny_hf_model("gemma3", n_layers=7, sliding_window=64, vocab_size=smollm2_tokenizer.vocab_size)
    model = make_backend(hf, smollm2_tokenizer)
    assert len(set(model.hf_model.config.layer_types)) == 2
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 500, (3, 20), generator=g)
    positions = torch.tensor([[1, 7, 19], [2, 3, 9], [0, 10, 18]])
    assert full_cache_supported(model, tokens.shape[1], 2 * positions.shape[1])
    values = {b: torch.randn(9, model.d_model, generator=g) for b in (1, 4, 7)}
    values[("variant", 4)] = torch.randn(9, model.d_model, generator=g)
    fast = patched_kl(model, tokens, positions, values, max_rows=4, batch_size=2, progress=False)
    plain = patched_kl_plain(model, tokens, positions, values)
    for b in values:
        torch.testing.assert_close(fast[b], plain[b], rtol=1e-3, atol=1e-7)


def test_run_queries_leaves_cache_and_model_as_they_were(smollm2_tokenizer):
    model = make_backend(tiny_hf_model("gpt2", n_layers=3, vocab_size=smollm2_tokenizer.vocab_size), smollm2_tokenizer)
    tokens = torch.randint(0, 500, (2, 10))
    cache, _ = full_cache(model, tokens)
    before = [l.keys.clone() for l in cache.layers]
    blocks = list(model.blocks)
    wpe = model.hf_model.transformer.wpe
    run_queries(model, cache, 10, 2, torch.randn(2, 3, model.d_model), torch.tensor([[1, 4, 9], [0, 2, 5]]))
    assert [l.keys.shape for l in cache.layers] == [b.shape for b in before]
    assert all(torch.equal(l.keys, b) for l, b in zip(cache.layers, before))
    assert list(model.blocks) == blocks and model.hf_model.transformer.wpe is wpe
    with pytest.raises(ValueError, match="out of range"):
        run_queries(model, cache, 10, 9, torch.randn(2, 3, model.d_model), torch.tensor([[1, 4, 9], [0, 2, 5]]))
    assert list(model.blocks) == blocks


@pytest.mark.parametrize("backend", ["smollm2_nnsight", "smollm2_tl"])
def test_caches_kept_from_collection_give_the_same_kl(backend, request, tmp_path):
    model = request.getfixturevalue(backend)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(100, 20000, (3, 20), generator=g)
    positions = torch.tensor([[2, 9, 19], [0, 5, 6], [3, 11, 12]])
    states = collect_hidden_states(model, tokens, positions, batch_size=2, cache_dir=tmp_path, keep_kv_cache=True)
    assert [s for s, _ in states.kv_caches] == [0, 2]
    values = {b: states.hidden(b) + 2.0 * torch.randn(9, 576, generator=g) for b in (3, 29)}
    kept = patched_kl(model, tokens, positions, values, kv_caches=states.kv_caches,
                      final_states=states.hidden(model.n_layers), progress=False)
    fresh = patched_kl(model, tokens, positions, values, batch_size=3, progress=False)
    plain = patched_kl_plain(model, tokens, positions, values)
    for b in values:
        assert (plain[b] > 1e-4).all()
        torch.testing.assert_close(kept[b], fresh[b], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(kept[b], plain[b], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="consecutive batches"):
        patched_kl(model, tokens, positions, values, kv_caches=states.kv_caches[1:],
                   final_states=states.hidden(model.n_layers), progress=False)
    # a store hit runs nothing, so it has no caches; a collection that stops below the last block keeps none
    assert collect_hidden_states(model, tokens, positions, batch_size=2, cache_dir=tmp_path,
                                 keep_kv_cache=True).kv_caches is None
    assert collect_hidden_states(model, tokens, positions, layers=[3], cache_dir=tmp_path,
                                 keep_kv_cache=True).kv_caches is None


def test_run_queries_keeps_a_bf16_gpt2_in_bf16(smollm2_tokenizer):
    # GPT-2's learned positions are swapped for zeros: they must be in the model's dtype, not float32
    model = make_backend(tiny_hf_model("gpt2", n_layers=3, vocab_size=smollm2_tokenizer.vocab_size,
                                       dtype=torch.bfloat16), smollm2_tokenizer)
    cache, _ = full_cache(model, torch.randint(0, 500, (2, 10)))
    out = run_queries(model, cache, 10, 2, torch.randn(2, 3, model.d_model), torch.tensor([[1, 4, 9], [0, 2, 5]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
