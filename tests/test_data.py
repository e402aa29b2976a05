"""Tests for toolkit.data: corpora, fixed-length chunking, splits and position sampling."""
from __future__ import annotations

import hashlib
import re
import sys
import types

import pytest
import torch

from toolkit.data import (
    CORPUS_NAMES,
    WIKITEXT2_TEST_SHA256,
    Corpus,
    TokenizedTexts,
    chunk_corpus,
    default_wikitext_test_path,
    detect_bos_prefix,
    embedded_corpus,
    hub_wikitext103_validation,
    load_corpus,
    sample_positions,
    split_texts,
    split_wikitext_articles,
    text_file_corpus,
    wikitext_test_corpus,
)


class CharTokenizer:
    """Tokenizer-like stub: one id per character (its code point), optional BOS id 0 in front."""

    def __init__(self, add_bos: bool):
        self.add_bos = add_bos
        self.calls: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs):
        self.calls.append(text)
        ids = [ord(c) for c in text]
        return {"input_ids": ([0] + ids) if (add_special_tokens and self.add_bos) else ids}

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


class BosWrapped:
    """A real HF tokenizer made to add a BOS by default, as Gemma's does."""

    def __init__(self, tok, bos_id: int):
        self.tok, self.bos_id = tok, bos_id

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = list(self.tok(text, add_special_tokens=False, **kwargs)["input_ids"])
        return {"input_ids": ([self.bos_id] + ids) if add_special_tokens else ids}


@pytest.fixture(scope="module")
def wikitext():
    return wikitext_test_corpus()


@pytest.fixture(scope="module")
def embedded():
    return embedded_corpus()


# ----- corpora ------------------------------------------------------------------------------------

def test_shared_wikitext_file_has_the_documented_hash():
    path = default_wikitext_test_path()
    assert path.is_file(), f"shared WikiText file missing at {path}"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WIKITEXT2_TEST_SHA256


def test_hash_mismatch_raises_with_both_hashes(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(" = Title = \n Some text .\n")
    actual = hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"expected {WIKITEXT2_TEST_SHA256}, got {actual}"):
        text_file_corpus(f, sha256=WIKITEXT2_TEST_SHA256)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        wikitext_test_corpus(f)                      # the WikiText loader always checks
    assert len(text_file_corpus(f, sha256=actual)) == 1


def test_wikitext_splits_into_articles(wikitext):
    assert 40 <= len(wikitext) <= 100                # the test split has 62 articles
    assert wikitext.titles[0] == "Robert Boulter"
    assert wikitext.titles[1] == "Du Fu"
    assert wikitext.documents[0].startswith(" = Robert Boulter = \n Robert Boulter is an English film")
    heading = re.compile(r" = (?!=)(.+?) =")
    for doc in wikitext.documents:                   # exactly one level-1 heading, on the first line
        lines = doc.split("\n")
        assert heading.fullmatch(lines[0].rstrip())
        assert not any(heading.fullmatch(l.rstrip()) for l in lines[1:])
        assert "\r" not in doc
    assert any(" = = " in doc for doc in wikitext.documents)   # section headings stay inside articles
    assert wikitext.name == "wikitext-test" and "sha256 checked" in wikitext.source


def test_split_wikitext_articles_rules():
    text = "preamble line\n\n = A = \n a text \n = = Section = = \n more \n\n = = = Sub = = = \n x \n = B = \n b \n"
    docs, titles = split_wikitext_articles(text)
    assert titles == ["", "A", "B"]
    assert docs[0] == "preamble line"
    assert docs[1] == " = A = \n a text \n = = Section = = \n more \n = = = Sub = = = \n x "
    assert docs[2] == " = B = \n b "


def test_plain_text_file_splits_at_blank_lines(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("First para line one.\nline two.\n\n  \nSecond para.\n\n\nThird.\n")
    c = text_file_corpus(f)
    assert c.documents == ("First para line one.\nline two.", "Second para.", "Third.")
    assert c.name == "notes.txt" and c.titles == ()
    assert text_file_corpus(f, split="whole").documents == ("First para line one.\nline two.\n\n  \nSecond para.\n\n\nThird.",)
    with pytest.raises(ValueError, match="unknown split 'lines'"):
        text_file_corpus(f, split="lines")


def test_empty_and_missing_files_raise(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="corpus 'empty.txt' is empty"):
        text_file_corpus(empty)
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(empty))
    with pytest.raises(FileNotFoundError, match="WikiText test file not found"):
        wikitext_test_corpus(tmp_path / "nope.raw")
    with pytest.raises(FileNotFoundError, match="no text file"):
        text_file_corpus(tmp_path / "nope.txt")


def test_embedded_corpus_is_deterministic_english(embedded):
    assert len(embedded) > 50 and embedded.n_chars > 100_000
    assert list(embedded.titles) == sorted(embedded.titles)
    words = re.findall(r"[a-z]+", " ".join(embedded.documents).lower())
    for common in ("the", "is", "of", "and", "a"):
        assert words.count(common) > 500, common
    assert all(d.strip() for d in embedded.documents)
    assert not any(re.fullmatch(r"\*{3,}|={3,}", l.strip()) for d in embedded.documents for l in d.split("\n"))
    text = "\n".join(embedded.documents)
    assert "PEP 484" in text and "**PEP" not in text            # bold markup gone ...
    assert '"**kwargs"' in text or "**kwargs)" in text         # ... Python's ** operator kept
    assert embedded_corpus().fingerprint == embedded.fingerprint


def test_corpus_fingerprint_and_invariants():
    a = Corpus("x", ["ab"])
    assert a.fingerprint != Corpus("x", ["a", "b"]).fingerprint      # boundaries count
    assert a.fingerprint == Corpus("other name", ("ab",)).fingerprint  # content only
    assert re.fullmatch(r"[0-9a-f]{64}", a.fingerprint)
    with pytest.raises(ValueError, match="corpus 'e' is empty"):
        Corpus("e", [])
    with pytest.raises(ValueError, match="corpus 'e' is empty"):
        Corpus("e", [" ", "\n"])
    with pytest.raises(ValueError, match="2 titles for 1 documents"):
        Corpus("t", ["doc"], titles=["a", "b"])


def test_load_corpus_specs(tmp_path, embedded, wikitext):
    assert load_corpus().fingerprint == embedded.fingerprint
    assert load_corpus("wikitext-test").fingerprint == wikitext.fingerprint
    f = tmp_path / "t.txt"
    f.write_text("hello there\n\nsecond")
    assert len(load_corpus(str(f))) == 2 and len(load_corpus(f)) == 2
    with pytest.raises(ValueError, match="unknown corpus 'wikitext-2'.*embedded, wikitext-test, wikitext103-validation"):
        load_corpus("wikitext-2")
    assert CORPUS_NAMES == ("embedded", "wikitext-test", "wikitext103-validation")


def test_hub_loader_without_datasets_points_to_local_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)          # import datasets -> ImportError
    with pytest.raises(RuntimeError, match="'datasets' package, which is not installed.*wikitext-test"):
        hub_wikitext103_validation()


def test_hub_loader_unreachable_hub_raises_runtime_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match="hub cannot be reached.*text_file_corpus"):
        load_corpus("wikitext103-validation")


def test_hub_loader_builds_articles_from_rows(monkeypatch):
    seen = {}

    def fake(path, name, split):
        seen.update(path=path, name=name, split=split)
        return {"text": ["", " = Alpha = \n", "", " alpha text . \n", " = = Part = = \n", " more . \n", " = Beta = \n", " beta . \n"]}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake))
    c = hub_wikitext103_validation()
    assert seen == {"path": "Salesforce/wikitext", "name": "wikitext-103-raw-v1", "split": "validation"}
    assert c.titles == ("Alpha", "Beta") and c.name == "wikitext103-validation"
    assert c.documents[0] == " = Alpha = \n alpha text . \n = = Part = = \n more . "


# ----- chunking -----------------------------------------------------------------------------------

def test_chunks_with_smollm2_are_windows_of_their_document(smollm2_tokenizer, embedded):
    seq_len = 64
    texts = chunk_corpus(embedded, smollm2_tokenizer, seq_len=seq_len, max_texts=60)
    assert texts.tokens.shape == (60, seq_len) and texts.tokens.dtype == torch.long
    assert texts.bos_prefixed is False                      # SmolLM2 adds no BOS
    assert texts.corpus_fingerprint == embedded.fingerprint
    assert (texts.doc_index[1:] >= texts.doc_index[:-1]).all()
    cache: dict[int, list[int]] = {}
    for row, d, off in zip(texts.tokens.tolist(), texts.doc_index.tolist(), texts.token_offset.tolist()):
        doc = embedded.documents[d]
        ids = cache.setdefault(d, smollm2_tokenizer(doc, add_special_tokens=False)["input_ids"])
        assert off % seq_len == 0 and off + seq_len <= len(ids)     # full, non-overlapping windows
        assert row == ids[off:off + seq_len]                         # one document only, in order
        assert smollm2_tokenizer.decode(row) in doc                  # decodes to a piece of its document
    # the tail shorter than a window is dropped: each complete document gives len // seq_len texts
    counts = torch.bincount(texts.doc_index)
    for d in texts.doc_index.unique().tolist()[:-1]:                 # the last one may be cut by max_texts
        assert counts[d] == len(cache[d]) // seq_len


def test_chunking_stops_early_at_max_texts():
    corpus = Corpus("c", ["a" * 50, "b" * 50, "c" * 50, "d" * 50])
    tok = CharTokenizer(add_bos=False)
    texts = chunk_corpus(corpus, tok, seq_len=10, max_texts=7)
    assert len(texts) == 7 and texts.doc_index.tolist() == [0] * 5 + [1] * 2
    docs_tokenised = [c for c in tok.calls if c in corpus.documents]
    assert docs_tokenised == ["a" * 50, "b" * 50]                    # c and d never tokenised
    assert len(chunk_corpus(corpus, tok, seq_len=10)) == 20


def test_bos_prefix_with_a_stub_tokenizer():
    corpus = Corpus("c", ["x" * 5, "abcdefghij" * 3, "y" * 11])       # lengths 5, 30, 11
    tok = CharTokenizer(add_bos=True)
    assert detect_bos_prefix(tok) == [0]
    texts = chunk_corpus(corpus, tok, seq_len=8)
    assert texts.bos_prefixed is True
    assert (texts.tokens[:, 0] == 0).all()
    assert texts.doc_index.tolist() == [1, 1, 1, 1, 2]                # 30 // 7 = 4, 11 // 7 = 1, 5 -> none
    assert tok.decode(texts.tokens[0, 1:].tolist()) == "abcdefg"
    assert texts.token_offset.tolist() == [0, 7, 14, 21, 0]
    no_bos = chunk_corpus(corpus, CharTokenizer(add_bos=False), seq_len=8)
    assert no_bos.bos_prefixed is False and no_bos.doc_index.tolist() == [1, 1, 1, 2]


def test_bos_prefix_with_a_real_tokenizer(smollm2_tokenizer, embedded):
    assert detect_bos_prefix(smollm2_tokenizer) == []
    bos = smollm2_tokenizer.bos_token_id
    texts = chunk_corpus(embedded, BosWrapped(smollm2_tokenizer, bos), seq_len=32, max_texts=5)
    ids = smollm2_tokenizer(embedded.documents[0], add_special_tokens=False)["input_ids"]
    assert texts.bos_prefixed and (texts.tokens[:, 0] == bos).all()
    assert texts.tokens[0, 1:].tolist() == ids[:31] and texts.tokens[1, 1:].tolist() == ids[31:62]


def test_chunking_rejects_bad_inputs():
    corpus = Corpus("short", ["tiny", "docs"])
    tok = CharTokenizer(add_bos=False)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        chunk_corpus(corpus, tok, seq_len=1)
    with pytest.raises(ValueError, match="seq_len 192 is longer than the model's context n_ctx 128; use seq_len <= 128"):
        chunk_corpus(corpus, tok, seq_len=192, n_ctx=128)
    with pytest.raises(ValueError, match="no text at seq_len 16: all its 2 documents are shorter than seq_len"):
        chunk_corpus(corpus, tok, seq_len=16)
    with pytest.raises(ValueError, match="max_texts must be a positive integer"):
        chunk_corpus(corpus, tok, seq_len=2, max_texts=0)


def test_tokenized_texts_save_load_and_select(tmp_path):
    texts = chunk_corpus(Corpus("c", ["abcdefghijkl"]), CharTokenizer(add_bos=True), seq_len=4)
    path = tmp_path / "texts.pt"
    texts.save(path)
    back = TokenizedTexts.load(path)
    assert torch.equal(back.tokens, texts.tokens) and back.bos_prefixed and back.corpus_fingerprint == texts.corpus_fingerprint
    sub = texts.select([2, 0])
    assert sub.token_offset.tolist() == [6, 0] and sub.seq_len == 4
    with pytest.raises(ValueError, match=r"tokens must be \[n_texts, 5\]"):
        TokenizedTexts(texts.tokens, texts.doc_index, texts.token_offset, 5, True, "f")


# ----- sampling -----------------------------------------------------------------------------------

def test_split_is_disjoint_and_reproducible():
    texts = chunk_corpus(Corpus("c", ["abcdefghij" * 10, "klmnopqrst" * 10]), CharTokenizer(False), seq_len=5)
    assert len(texts) == 40
    train, test = split_texts(texts, n_train=25, n_test=10, seed=3)
    assert len(train) == 25 and len(test) == 10 and isinstance(train, TokenizedTexts)
    key = lambda t: set(zip(t.doc_index.tolist(), t.token_offset.tolist()))
    assert not key(train) & key(test)
    train2, test2 = split_texts(texts, n_train=25, n_test=10, seed=3)
    assert torch.equal(train.tokens, train2.tokens) and torch.equal(test.tokens, test2.tokens)
    other, _ = split_texts(texts, n_train=25, n_test=10, seed=4)
    assert not torch.equal(train.tokens, other.tokens)
    tr, te = split_texts(torch.arange(40), n_train=25, n_test=10, seed=3)  # tensors work too
    assert not set(tr.tolist()) & set(te.tolist()) and len(set(tr.tolist())) == 25


def test_split_too_few_texts_names_the_numbers(smollm2_tokenizer, wikitext):
    with pytest.raises(ValueError, match=r"need n_train \+ n_test = 12 texts, the corpus gives 10 at seq_len 4; "
                                         r"lower the counts or seq_len or use a larger corpus"):
        split_texts(torch.zeros(10, 4), n_train=8, n_test=4)
    with pytest.raises(ValueError, match="n_test must be a non-negative integer"):
        split_texts(torch.zeros(10, 4), n_train=8, n_test=-1)
    # The paper's 2000 + 500 texts do not fit in the WikiText test split at 192 tokens (~1.5k texts).
    texts = chunk_corpus(wikitext, smollm2_tokenizer, seq_len=192)
    assert 1000 < len(texts) < 2500
    with pytest.raises(ValueError, match=f"the corpus gives {len(texts)} at seq_len 192"):
        split_texts(texts, n_train=2000, n_test=500)


def test_positions_ranges_uniqueness_order():
    pos = sample_positions(50, 192, per_text=8, seed=0)
    assert pos.shape == (50, 8) and pos.dtype == torch.long
    assert pos.min() >= 1 and pos.max() <= 191
    assert (pos[:, 1:] > pos[:, :-1]).all()                 # sorted and distinct within a text
    assert len(set(pos.flatten().tolist())) > 100            # spread over the text, not a fixed set
    full = sample_positions(3, 10, per_text=9, seed=0)       # every position 1..9
    assert full.tolist() == [list(range(1, 10))] * 3
    with0 = sample_positions(200, 6, per_text=2, seed=0, min_position=0)
    assert with0.min() == 0
    assert sample_positions(0, 10, per_text=2).shape == (0, 2)


def test_positions_are_reproducible_regardless_of_call_order():
    a = sample_positions(20, 64, per_text=8, seed=7)
    torch.manual_seed(123); torch.rand(100)                  # disturb the global RNG
    sample_positions(5, 64, per_text=8, seed=8)              # and make another call in between
    b = sample_positions(20, 64, per_text=8, seed=7)
    assert torch.equal(a, b)
    assert torch.equal(sample_positions(30, 64, per_text=8, seed=7)[:20], a)   # more texts keep earlier rows
    assert not torch.equal(a, sample_positions(20, 64, per_text=8, seed=8))


def test_positions_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"per_text 10 is more than the 9 positions available in \[1, 9\]"):
        sample_positions(4, 10, per_text=10)
    with pytest.raises(ValueError, match=r"min_position must lie in \[0, seq_len - 1\] = \[0, 9\]"):
        sample_positions(4, 10, per_text=2, min_position=10)
    with pytest.raises(ValueError, match="per_text must be a positive integer"):
        sample_positions(4, 10, per_text=0)
    with pytest.raises(ValueError, match="n_texts must be a non-negative integer"):
        sample_positions(-1, 10)
