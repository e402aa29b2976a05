"""Seeded train/test split of texts and sampling of token positions within texts.

The paper's setup (arXiv 2604.02459, appendix A.2): 2000 train and 500 test texts,
8 positions per text. Train texts provide the neighbours that local maps are fitted
on; test texts provide the anchors they are evaluated at.

Reproducibility: each call seeds its own ``torch.Generator``, so results depend only
on the arguments -- never on the global RNG or on what ran before.

Position 0 is excluded by default (``min_position=1``): the first token of a text
acts as an attention sink whose residual stream has outlier norms (massive
activations), so it would dominate neighbour searches and error statistics without
saying anything about ordinary tokens.

Example:
    >>> from toolkit.data import chunk_corpus, load_corpus, split_texts, sample_positions
    >>> texts = chunk_corpus(load_corpus("embedded"), model.tokenizer, seq_len=64)
    >>> train, test = split_texts(texts, n_train=200, n_test=50, seed=0)       # the paper: 2000 / 500
    >>> pos = sample_positions(len(test), test.seq_len, per_text=8, seed=0)
    >>> len(train), tuple(pos.shape), int(pos.min()) >= 1
    (200, (50, 8), True)
"""
from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["split_texts", "sample_positions", "SPLITS"]

#: How :func:`split_texts` keeps train and test apart: by text (chunk) or by source document.
SPLITS = ("text", "document")

T = TypeVar("T")


def _take(texts: T, idx: Tensor) -> T:
    """``texts`` restricted to rows ``idx``, keeping its type."""
    if isinstance(texts, Tensor):            # checked first: Tensor also has a .select(dim, i)
        return texts[idx]
    if hasattr(texts, "select"):             # TokenizedTexts keeps its provenance
        return texts.select(idx)
    return [texts[i] for i in idx.tolist()]  # any other sequence -> list


def split_texts(texts: T, n_train: int, n_test: int, seed: int = 0, by: str = "text") -> tuple[T, T]:
    """Shuffle texts with a seeded generator and split them by text into train and test.

    ``texts`` is a :class:`~toolkit.data.chunking.TokenizedTexts`, a ``[n_texts, seq_len]``
    tensor or a sequence; both parts come back as the same kind. Train takes the first
    ``n_train`` of a seeded permutation and test the next ``n_test``, so the two never share
    a text and a larger ``n_test`` only adds texts. Each part is in ascending original order.
    With ``by="text"`` the split is by text (chunk): windows of one document can land on both
    sides, which makes test texts easier than new documents would be. ``by="document"`` (needs
    a :class:`~toolkit.data.chunking.TokenizedTexts`, which knows each text's ``doc_index``)
    shuffles the documents instead and gives test the texts of whole documents until it has
    ``n_test`` of them (then a seeded subset), train a seeded subset of the texts of the other
    documents: no document feeds both sides.

    Example:
        >>> train, test = split_texts(torch.arange(10)[:, None].expand(10, 4), n_train=6, n_test=2, seed=0)
        >>> train.shape, test.shape
        (torch.Size([6, 4]), torch.Size([2, 4]))
        >>> from toolkit.data.chunking import TokenizedTexts
        >>> texts = TokenizedTexts(torch.arange(12).view(6, 2), torch.tensor([0, 0, 1, 1, 2, 2]),
        ...                        torch.zeros(6, dtype=torch.long), 2, False, "demo")
        >>> train, test = split_texts(texts, n_train=4, n_test=2, by="document")
        >>> set(train.doc_index.tolist()) & set(test.doc_index.tolist())
        set()
    """
    if by not in SPLITS:
        raise ValueError(f"by must be one of {SPLITS}, got {by!r}.")
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    n = len(texts)
    need = n_train + n_test
    if need > n:
        seq_len = getattr(texts, "seq_len", None)
        if seq_len is None and isinstance(texts, Tensor) and texts.ndim == 2:
            seq_len = texts.shape[1]
        at = f" at seq_len {seq_len}" if seq_len is not None else ""
        raise ValueError(f"need n_train + n_test = {need} texts, the corpus gives {n}{at}; "
                         f"lower the counts or seq_len or use a larger corpus.")
    if by == "document":
        return _split_by_document(texts, n_train, n_test, seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx = perm[:n_train].sort().values
    test_idx = perm[n_train:need].sort().values
    return _take(texts, train_idx), _take(texts, test_idx)


def _split_by_document(texts, n_train: int, n_test: int, seed: int):
    doc = getattr(texts, "doc_index", None)
    if doc is None:
        raise ValueError("split by='document' needs TokenizedTexts (chunk_corpus's output, which records each "
                         "text's document); for a plain tensor or list use by='text'.")
    g = torch.Generator().manual_seed(seed)
    docs = doc.unique()
    order = docs[torch.randperm(docs.numel(), generator=g)]
    counts = torch.bincount(doc)[order]
    n_test_docs = int((counts.cumsum(0) < n_test).sum()) + (1 if n_test > 0 else 0)
    test_docs = order[:n_test_docs]
    in_test = torch.isin(doc, test_docs)
    test_pool, train_pool = in_test.nonzero()[:, 0], (~in_test).nonzero()[:, 0]
    if test_pool.numel() < n_test or train_pool.numel() < n_train:
        raise ValueError(f"split by document: the corpus's {docs.numel()} documents give {test_pool.numel()} test "
                         f"and {train_pool.numel()} train texts, short of n_test={n_test} / n_train={n_train}; "
                         f"lower the counts or seq_len, or split by text (split='text').")
    test_idx = test_pool[torch.randperm(test_pool.numel(), generator=g)[:n_test]].sort().values
    train_idx = train_pool[torch.randperm(train_pool.numel(), generator=g)[:n_train]].sort().values
    return _take(texts, train_idx), _take(texts, test_idx)


def sample_positions(
    n_texts: int,
    seq_len: int,
    per_text: int = 8,
    seed: int = 0,
    min_position: int = 1,
) -> Tensor:
    """Pick ``per_text`` distinct token positions in each text, seeded.

    Positions lie in ``[min_position, seq_len - 1]``, are distinct within a text and sorted
    ascending. Row ``i`` depends only on ``(i, seq_len, per_text, seed, min_position)``, not on
    ``n_texts``, so asking for more texts keeps the earlier rows.

    Returns:
        ``[n_texts, per_text]`` LongTensor.

    Example:
        >>> pos = sample_positions(n_texts=3, seq_len=192, per_text=8, seed=0)
        >>> pos.shape, bool((pos >= 1).all() and (pos <= 191).all())
        (torch.Size([3, 8]), True)
    """
    if not isinstance(n_texts, int) or n_texts < 0:
        raise ValueError(f"n_texts must be a non-negative integer, got {n_texts!r}.")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    if not isinstance(min_position, int) or not 0 <= min_position < seq_len:
        raise ValueError(f"min_position must lie in [0, seq_len - 1] = [0, {seq_len - 1}], got {min_position!r}.")
    available = seq_len - min_position
    if not isinstance(per_text, int) or per_text < 1:
        raise ValueError(f"per_text must be a positive integer, got {per_text!r}.")
    if per_text > available:
        raise ValueError(f"per_text {per_text} is more than the {available} positions available in "
                         f"[{min_position}, {seq_len - 1}]; lower per_text or min_position, or raise seq_len.")
    g = torch.Generator().manual_seed(seed)
    # One row of uniforms per text, argsorted: an independent random permutation per row.
    # Rows are drawn in order, so row i is the same whatever n_texts is.
    scores = torch.rand(n_texts, available, generator=g)
    picked = scores.argsort(dim=1)[:, :per_text] + min_position
    return picked.sort(dim=1).values.long()
