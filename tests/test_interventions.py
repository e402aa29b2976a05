"""The cached intervention path equals the plain full-forward path."""
from __future__ import annotations

import pytest
import torch

from toolkit.backends import make_backend
from toolkit.backends.base import Patch
from toolkit.backends.incremental import cache_kwargs, prefix_caches, repeat_cache
from toolkit.decompose.interventions import kl_divergence, patched_kl, patched_kl_plain
from toolkit.models.tiny import TINY_ARCHITECTURES, tiny_hf_model


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("backend", ["nnsight", "tl"])
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


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
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
