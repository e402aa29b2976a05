"""Tokenise a corpus into texts of one fixed length.

The decomposition paper (arXiv 2604.02459, appendix A.2) runs on texts of 192
tokens from WikiText-103 validation; this module makes such texts from any
:class:`~toolkit.data.corpora.Corpus` and any HF-style tokenizer.

The rule
--------
1. Each document is tokenised on its own, without special tokens.
2. Its tokens are cut into consecutive, non-overlapping windows.
3. If the tokenizer adds a BOS token by default (Gemma does; SmolLM2, GPT-2 and
   Pythia do not) -- detected by tokenising a short string with and without
   special tokens -- every text is ``[BOS] + seq_len - 1`` document tokens, so the
   model sees what it saw in training. Otherwise a text is ``seq_len`` document tokens.
4. The trailing piece of a document shorter than a full window is dropped: no text is
   ever padded and no text mixes two documents. Documents shorter than one window
   give no text at all.
5. Documents are taken in corpus order and tokenising stops as soon as ``max_texts``
   texts exist, so asking for a few texts from a large corpus is cheap (and these
   texts come from the first documents: shuffle afterwards with
   :func:`toolkit.data.sampling.split_texts`).

Each text remembers the document it came from (``doc_index``) and where in that
document's token list it starts (``token_offset``), so it can be traced back.

Example:
    >>> from toolkit.data import chunk_corpus, load_corpus
    >>> texts = chunk_corpus(load_corpus("embedded"), model.tokenizer, seq_len=192, n_ctx=model.n_ctx)
    >>> texts.tokens.shape[1], int(texts.doc_index.max()) + 1 <= len(load_corpus("embedded"))
    (192, True)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from toolkit.data.corpora import Corpus

__all__ = ["TokenizedTexts", "chunk_corpus", "detect_bos_prefix", "DEFAULT_SEQ_LEN"]

#: Text length used in the paper's appendix A.2.
DEFAULT_SEQ_LEN = 192


@dataclass(frozen=True)
class TokenizedTexts:
    """Fixed-length token texts cut from a corpus, with where each came from.

    Attributes:
        tokens: ``[n_texts, seq_len]`` LongTensor of token ids.
        doc_index: ``[n_texts]`` LongTensor, the corpus document each text came from.
        token_offset: ``[n_texts]`` LongTensor, index of the text's first *document* token
            in that document's token list (the BOS, if any, is not a document token).
        seq_len: length of every text, BOS included.
        bos_prefixed: whether every text starts with the tokenizer's BOS.
        corpus_fingerprint: :attr:`Corpus.fingerprint` of the source corpus.
        corpus_name: :attr:`Corpus.name` of the source corpus.

    Example:
        >>> t = TokenizedTexts(torch.arange(6).view(2, 3), torch.tensor([0, 0]), torch.tensor([0, 3]),
        ...                    seq_len=3, bos_prefixed=False, corpus_fingerprint="abc", corpus_name="demo")
        >>> len(t), t.select([1]).tokens.tolist()
        (2, [[3, 4, 5]])
    """

    tokens: Tensor
    doc_index: Tensor
    token_offset: Tensor
    seq_len: int
    bos_prefixed: bool
    corpus_fingerprint: str
    corpus_name: str = ""

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.tokens.ndim != 2 or self.tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must be [n_texts, {self.seq_len}], got {tuple(self.tokens.shape)}.")
        if self.doc_index.shape != (n,) or self.token_offset.shape != (n,):
            raise ValueError(f"doc_index {tuple(self.doc_index.shape)} and token_offset "
                             f"{tuple(self.token_offset.shape)} must both be [{n}].")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, indices: Tensor | Sequence[int]) -> "TokenizedTexts":
        """The texts at ``indices`` (in that order), with their provenance and metadata.

        Example:
            >>> from toolkit.data.corpora import load_corpus
            >>> texts = chunk_corpus(load_corpus("embedded"), model.tokenizer, seq_len=64, max_texts=10)
            >>> texts.select(torch.tensor([0, 5])).tokens.shape
            torch.Size([2, 64])
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TokenizedTexts(self.tokens[idx], self.doc_index[idx], self.token_offset[idx], self.seq_len,
                              self.bos_prefixed, self.corpus_fingerprint, self.corpus_name)

    def save(self, path: str | Path) -> None:
        """Save tokens and metadata to one ``torch.save`` file.

        Example:
            >>> from toolkit.data.corpora import load_corpus
            >>> texts = chunk_corpus(load_corpus("embedded"), model.tokenizer, seq_len=64, max_texts=10)
            >>> texts.save(tmp / "texts.pt"); TokenizedTexts.load(tmp / "texts.pt").seq_len
            64
        """
        torch.save({"tokens": self.tokens, "doc_index": self.doc_index, "token_offset": self.token_offset,
                    "seq_len": self.seq_len, "bos_prefixed": self.bos_prefixed,
                    "corpus_fingerprint": self.corpus_fingerprint, "corpus_name": self.corpus_name}, path)

    @classmethod
    def load(cls, path: str | Path) -> "TokenizedTexts":
        """Load what :meth:`save` wrote (tensors and plain metadata only: ``weights_only`` load).

        Example:
            >>> from toolkit.data.corpora import load_corpus
            >>> chunk_corpus(load_corpus("embedded"), model.tokenizer, seq_len=64, max_texts=2).save(tmp / "t.pt")
            >>> TokenizedTexts.load(tmp / "t.pt").bos_prefixed          # SmolLM2 puts no BOS before a text
            False
        """
        return cls(**torch.load(path, weights_only=True))


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    # verbose=False: HF tokenizers warn when a whole document exceeds model_max_length,
    # which is expected here because documents are cut into windows afterwards.
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def detect_bos_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts *before* the text by default (``[bos_id]`` or ``[]``).

    Found by tokenising a probe string with and without special tokens; any tokens it
    appends at the end (an EOS) are ignored because a text must not end a document early.

    Example:
        >>> detect_bos_prefix(model.tokenizer)            # SmolLM2: none (Gemma's gives [2])
        []
    """
    probe = "The cat sat on the mat."
    plain = _ids(tokenizer, probe, add_special_tokens=False)
    special = _ids(tokenizer, probe, add_special_tokens=True)
    for start in range(len(special) - len(plain) + 1):
        if special[start:start + len(plain)] == plain:
            return special[:start]
    raise ValueError("cannot tell which special tokens this tokenizer adds: the probe text tokenised "
                     f"with special tokens ({special}) does not contain its plain tokenisation ({plain}).")


def chunk_corpus(
    corpus: Corpus,
    tokenizer: Any,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_texts: int | None = None,
    n_ctx: int | None = None,
) -> TokenizedTexts:
    """Cut a corpus into ``[n_texts, seq_len]`` token texts by the rule in the module docstring.

    Args:
        corpus: the documents.
        tokenizer: an HF tokenizer, or anything called as ``tokenizer(text, add_special_tokens=...)``
            that returns a mapping with ``"input_ids"`` (a list of ints).
        seq_len: tokens per text, BOS included (>= 2; the paper uses 192).
        max_texts: stop once this many texts exist (``None``: the whole corpus).
        n_ctx: the model's context length; ``seq_len`` above it is refused.

    Example:
        >>> from toolkit.data.corpora import load_corpus
        >>> texts = chunk_corpus(load_corpus("embedded"), model.tokenizer, seq_len=64, max_texts=10)
        >>> texts.tokens.shape
        torch.Size([10, 64])
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a text needs a token and a next token), got {seq_len!r}.")
    if n_ctx is not None and seq_len > n_ctx:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context n_ctx {n_ctx}; "
                         f"use seq_len <= {n_ctx}.")
    if max_texts is not None and (not isinstance(max_texts, int) or max_texts < 1):
        raise ValueError(f"max_texts must be a positive integer or None, got {max_texts!r}.")

    prefix = detect_bos_prefix(tokenizer)
    body = seq_len - len(prefix)          # document tokens per text
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for document tokens after the "
                         f"{len(prefix)} prefix token(s) the tokenizer adds.")

    rows: list[list[int]] = []
    doc_index: list[int] = []
    offsets: list[int] = []
    for d, doc in enumerate(corpus.documents):
        if max_texts is not None and len(rows) >= max_texts:
            break                          # no need to tokenise the rest
        ids = _ids(tokenizer, doc, add_special_tokens=False)
        for start in range(0, len(ids) - body + 1, body):   # full windows only: the tail is dropped
            if max_texts is not None and len(rows) >= max_texts:
                break
            rows.append(prefix + ids[start:start + body])
            doc_index.append(d)
            offsets.append(start)

    if not rows:
        raise ValueError(f"corpus {corpus.name!r} gives no text at seq_len {seq_len}: all its "
                         f"{len(corpus)} documents are shorter than seq_len ({body} document tokens "
                         f"per text); lower seq_len or use a corpus with longer documents.")
    return TokenizedTexts(
        tokens=torch.tensor(rows, dtype=torch.long),
        doc_index=torch.tensor(doc_index, dtype=torch.long),
        token_offset=torch.tensor(offsets, dtype=torch.long),
        seq_len=seq_len,
        bos_prefixed=bool(prefix),
        corpus_fingerprint=corpus.fingerprint,
        corpus_name=corpus.name,
    )
