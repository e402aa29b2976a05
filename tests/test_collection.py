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


# ----- #15: temporaries of killed runs, and a model identity that survives moving ----------------
def test_killed_run_temporary_is_removed_and_a_live_one_kept(tiny, tmp_path):
    """`kill -9` during a collection leaves its temporary folder; the next collection in the store removes
    it (its writer is dead) and leaves the temporary of a writer that is still running."""
    import os
    import signal

    from toolkit.atomic import temporary_prefix
    from toolkit.collection.store import EntryWriter
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a collection that is writing its entry when it gets killed
        try:
            EntryWriter(tmp_path / "somekey", 10, 8, [0, 1])
            os.write(write, b"1")
            signal.pause()
        finally:
            os._exit(1)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
    dead = [p for p in tmp_path.iterdir() if "somekey" in p.name]
    assert len(dead) == 1 and dead[0].is_dir() and dead[0].name.startswith(".")   # left behind by the kill
    live = tmp_path / (temporary_prefix("otherkey") + "running")  # this process: alive
    live.mkdir()
    tokens, positions = _inputs()
    states = collect_hidden_states(tiny, tokens, positions, cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([states.directory.name, live.name])


def test_moved_weights_and_moved_cache_stay_valid(smollm2_tokenizer, tmp_path, monkeypatch):
    """The same weights loaded from another folder, with the store moved elsewhere, hit the same entry;
    one changed weight does not."""
    import shutil

    from transformers import AutoModelForCausalLM
    tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size, n_layers=2).save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    def load(folder):
        hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        return make_backend(hf, smollm2_tokenizer, backend="nnsight")

    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert a.hf_model.config._name_or_path != b.hf_model.config._name_or_path
    tokens, positions = _inputs()
    first = collect_hidden_states(a, tokens, positions, cache_dir=tmp_path / "cache", progress=False)
    expected = first.hidden(2)
    shutil.move(tmp_path / "cache", tmp_path / "moved")
    monkeypatch.setattr(b, "hidden_states", lambda *x, **k: pytest.fail("the moved weights missed the cache"))
    second = collect_hidden_states(b, tokens, positions, cache_dir=tmp_path / "moved", progress=False)
    assert second.meta["model_fingerprint"] == first.meta["model_fingerprint"]
    torch.testing.assert_close(second.hidden(2), expected)
    monkeypatch.undo()
    with torch.no_grad():
        b.hf_model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    third = collect_hidden_states(b, tokens, positions, cache_dir=tmp_path / "moved", progress=False)
    assert third.directory != second.directory and third.meta["model_fingerprint"] != first.meta["model_fingerprint"]


def test_smollm2_fingerprint_is_the_weights_not_the_folder(smollm2_tl, tmp_path):
    """SmolLM2 through TransformerLens' bridge (modules wrapped in place) and a fresh load of the same files
    from another folder have one fingerprint; it takes well under the time of a forward pass of a batch."""
    import time

    from transformers import AutoModelForCausalLM

    from toolkit.collection import model_fingerprint
    from toolkit.models.fingerprint import weights_fingerprint
    from toolkit.models.weights import SMOLLM2, converted_folder
    for f in converted_folder(SMOLLM2).iterdir():       # the same files, seen from another folder
        (tmp_path / f.name).symlink_to(f)
    fresh = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    t0 = time.perf_counter()
    bridged = model_fingerprint(smollm2_tl)
    elapsed = time.perf_counter() - t0
    assert bridged == weights_fingerprint(fresh)
    assert elapsed < 30, elapsed  # ~0.3 s on an idle core; generous for a shared machine
