"""Collection of hidden states: correctness against direct forwards, caching, atomic writes."""
from __future__ import annotations

import pytest
import torch

from toolkit.backends import make_backend
from toolkit.collection import collect_hidden_states
from toolkit.collection.from_corpus import collect_from_corpus
from toolkit.models.tiny import tiny_hf_model


@pytest.fixture
def tiny(smollm2_tokenizer):
    return make_backend(tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size, n_layers=3),
                        smollm2_tokenizer, backend="nnsight")


def _inputs(n_texts=5, seq_len=12, per_text=3):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (n_texts, seq_len), generator=g)
    positions = torch.sort(torch.stack([torch.randperm(seq_len - 1, generator=g)[:per_text] + 1
                                        for _ in range(n_texts)]), dim=1).values
    return tokens, positions


def test_rows_equal_direct_hidden_states(tiny, tmp_path):
    tokens, positions = _inputs()
    states = collect_hidden_states(tiny, tokens, positions, layers=[1], batch_size=2, cache_dir=tmp_path,
                                   progress=False)
    assert states.boundaries == [1, 2] and states.layers == [1]
    x, y = states.pairs(1)
    direct = tiny.hidden_states(tokens, [1, 2])
    rows = torch.arange(5)[:, None]
    torch.testing.assert_close(x, direct[0, rows, positions].reshape(-1, tiny.d_model))
    torch.testing.assert_close(y, direct[1, rows, positions].reshape(-1, tiny.d_model))
    assert torch.equal(states.token, tokens[rows, positions].reshape(-1))
    with pytest.raises(KeyError, match="were not collected"):
        states.pairs(0)


def test_second_call_loads_without_running_the_model(tiny, tmp_path, monkeypatch):
    tokens, positions = _inputs()
    first = collect_hidden_states(tiny, tokens, positions, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(tiny, "hidden_states", lambda *a, **k: pytest.fail("recomputed a cached entry"))
    second = collect_hidden_states(tiny, tokens, positions, cache_dir=tmp_path, progress=False)
    assert second.directory == first.directory
    torch.testing.assert_close(second.hidden(3), first.hidden(3))


def test_interrupted_run_leaves_nothing_valid(tiny, tmp_path, monkeypatch):
    tokens, positions = _inputs()
    real = tiny.hidden_states
    calls = {"n": 0}
    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(tiny, "hidden_states", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_hidden_states(tiny, tokens, positions, batch_size=2, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []          # no entry and no temporary folder
    monkeypatch.setattr(tiny, "hidden_states", real)
    states = collect_hidden_states(tiny, tokens, positions, batch_size=2, cache_dir=tmp_path, progress=False)
    assert states.hidden(0).abs().sum() > 0


def test_broken_entry_is_recomputed(tiny, tmp_path):
    tokens, positions = _inputs()
    states = collect_hidden_states(tiny, tokens, positions, cache_dir=tmp_path, progress=False)
    (states.directory / "h002.npy").unlink()
    again = collect_hidden_states(tiny, tokens, positions, cache_dir=tmp_path, progress=False)
    assert (again.directory / "h002.npy").exists()


def test_bad_inputs(tiny, tmp_path):
    tokens, positions = _inputs()
    with pytest.raises(ValueError, match="layer 3 is out of range.*numbered 0..2"):
        collect_hidden_states(tiny, tokens, positions, layers=[3], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no texts"):
        collect_hidden_states(tiny, tokens[:0], positions[:0], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="positions must lie in"):
        collect_hidden_states(tiny, tokens, positions + 20, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="longer than the context"):
        collect_hidden_states(tiny, torch.zeros(2, 300, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                              cache_dir=tmp_path)


def test_smollm2_wikitext_collection_both_backends(smollm2_nnsight, smollm2_tl, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    kwargs = dict(n_train=4, n_test=2, seq_len=48, per_text=4, layers=[0, 14, 29], progress=False)
    train_a, test_a = collect_from_corpus(smollm2_nnsight, "wikitext-test", **kwargs)
    train_b, test_b = collect_from_corpus(smollm2_tl, "wikitext-test", **kwargs)
    assert train_a.meta["n_texts"] == 4 and test_a.meta["n_texts"] == 2
    assert train_a.boundaries == [0, 1, 14, 15, 29, 30]
    assert torch.equal(train_a.tokens, train_b.tokens) and torch.equal(test_a.positions, test_b.positions)
    # train and test are different texts
    assert not any(torch.equal(t, s) for t in train_a.tokens for s in test_a.tokens)
    for layer in (0, 14, 29):
        xa, ya = train_a.pairs(layer)
        xb, yb = train_b.pairs(layer)
        assert xa.shape == (16, 576)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-3)
    # blocks really change the stream
    x, y = train_a.pairs(14)
    assert ((y - x).norm(dim=1) > 1e-3).all()


def test_too_few_texts_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="need n_train \\+ n_test"):
        collect_from_corpus(tiny, "embedded", n_train=100000, n_test=10, seq_len=32, progress=False)
