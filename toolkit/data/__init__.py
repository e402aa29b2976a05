"""Data for the analyses: corpora, fixed-length token texts, train/test split, positions.

The usual path (the paper's appendix A.2 setup, with the offline corpus):

Example:
    >>> from toolkit.data import load_corpus, chunk_corpus, split_texts, sample_positions
    >>> corpus = load_corpus("embedded")                      # or "wikitext-test", a path, ...
    >>> texts = chunk_corpus(corpus, model.tokenizer, seq_len=192, n_ctx=model.n_ctx)   # model = toolkit.load_model()
    >>> train, test = split_texts(texts, n_train=100, n_test=25, seed=0)                # the paper: 2000 / 500
    >>> positions = sample_positions(len(test), test.seq_len, per_text=8, seed=0)
    >>> train.tokens.shape, positions.shape
    (torch.Size([100, 192]), torch.Size([25, 8]))
"""
from toolkit.data.chunking import DEFAULT_SEQ_LEN, TokenizedTexts, chunk_corpus, detect_bos_prefix
from toolkit.data import corpora
from toolkit.data.corpora import (
    CORPUS_NAMES,
    WIKITEXT2_TEST_SHA256,
    Corpus,
    default_wikitext_test_path,
    embedded_corpus,
    hub_wikitext103_validation,
    load_corpus,
    split_wikitext_articles,
    text_file_corpus,
    wikitext_test_corpus,
)
from toolkit.data.sampling import sample_positions, split_texts

__all__ = [*corpora.__all__, "TokenizedTexts", "DEFAULT_SEQ_LEN", "chunk_corpus", "detect_bos_prefix",
           "split_texts", "sample_positions"]
