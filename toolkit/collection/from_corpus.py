"""From a corpus to collected hidden states: chunk, split by text, sample positions, collect.

This is the paper's setup (appendix A.2) in one call: fixed-length texts, a train/test split
by text, a few seeded positions per text.

Example:
    >>> from toolkit.collection.from_corpus import collect_from_corpus
    >>> train, test = collect_from_corpus(model, "wikitext-test", n_train=6, n_test=2, seq_len=32, per_text=2,
    ...                                   layers=[10], use_cache=False, progress=False)   # model = toolkit.load_model()
    >>> X, Y = train.pairs(10)                                 # h_10 and h_11 at 6 texts x 2 positions
    >>> X.shape[0]
    12
"""
from __future__ import annotations

from typing import Sequence

from toolkit.backends.base import Backend
from toolkit.checks import block_indices, positive_int
from toolkit.collection.pairs import CollectedStates, collect_hidden_states
from toolkit.data import Corpus, chunk_corpus, load_corpus, sample_positions, split_texts


def check_collection_settings(*, n_train: int, n_test: int, seq_len: int, per_text: int, batch_size: int,
                              layers: Sequence[int] | None = None) -> None:
    """Refuse bad collection settings before any work (the CLI calls this before loading a model).

    Example:
        >>> check_collection_settings(n_train=10, n_test=0, seq_len=32, per_text=4, batch_size=8)
        Traceback (most recent call last):
        ...
        ValueError: n_test (--n-test) must be a positive integer (test texts), got 0; use 1 or more.
    """
    positive_int("n_train", n_train, "training texts")
    positive_int("n_test", n_test, "test texts")
    positive_int("seq_len", seq_len, "tokens per text")
    positive_int("per_text", per_text, "sampled positions per text")
    positive_int("batch_size", batch_size, "texts per forward pass")
    block_indices(layers)


def collect_from_corpus(model: Backend, corpus: str | Corpus = "embedded", *, n_train: int = 2000,
                        n_test: int = 500, seq_len: int = 192, per_text: int = 8, layers: Sequence[int] | None = None,
                        seed: int = 0, batch_size: int = 8, progress: bool = True, use_cache: bool = True,
                        keep_test_kv_cache: bool = False, split: str = "text",
                        min_position: int = 1) -> tuple[CollectedStates, CollectedStates]:
    """Collect train and test hidden states (separate texts) for the pairs of blocks ``layers``.

    ``split``: ``"text"`` or ``"document"`` (no document on both sides), see :func:`split_texts`.
    ``min_position``: the first position sampled (1 skips the first token, an attention sink).
    ``keep_test_kv_cache``: keep the test texts' attention caches (see :func:`collect_hidden_states`).
    """
    check_collection_settings(n_train=n_train, n_test=n_test, seq_len=seq_len, per_text=per_text,
                              batch_size=batch_size, layers=layers)
    corpus = load_corpus(corpus) if isinstance(corpus, str) else corpus
    # All texts, so the seeded split draws from the whole corpus rather than its first documents.
    texts = chunk_corpus(corpus, model.tokenizer, seq_len=seq_len, n_ctx=model.n_ctx)
    train_texts, test_texts = split_texts(texts, n_train, n_test, seed=seed, by=split)
    out = []
    for part, tokens in (("train", train_texts.tokens), ("test", test_texts.tokens)):
        # Different seeds per part so train and test positions are drawn independently.
        positions = sample_positions(tokens.shape[0], seq_len, per_text=per_text, seed=seed + (part == "test"),
                                     min_position=min_position)
        out.append(collect_hidden_states(model, tokens, positions, layers=layers, batch_size=batch_size,
                                         progress=progress, use_cache=use_cache,
                                         keep_kv_cache=keep_test_kv_cache and part == "test"))
    return out[0], out[1]
