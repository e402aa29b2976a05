"""Text corpora: named lists of documents with a content fingerprint.

A :class:`Corpus` is the raw text an analysis runs on, before tokenisation. Each
document is one coherent piece of prose (a WikiText article, a Python reference
topic), because :mod:`toolkit.data.chunking` never lets a text span two documents.

Sources, from always-there to needs-a-network:

* :func:`embedded_corpus` -- the Python Language Reference topics that ship with
  CPython (``pydoc_data.topics``). No file, no network; the offline default.
* :func:`wikitext_test_corpus` -- the WikiText-2/103 *test* split kept in
  ``../shared/data`` (checked against :data:`WIKITEXT2_TEST_SHA256`).
* :func:`text_file_corpus` -- any plain text file, WikiText-aware.
* :func:`hub_wikitext103_validation` -- the split the paper used (arXiv 2604.02459,
  appendix A.2), through the optional ``datasets`` package and the HF hub.

:func:`load_corpus` picks one of these from a short spec string (the CLI uses it).

The fingerprint is a SHA-256 over the documents (each length-prefixed, so document
boundaries count), so results can record exactly which text produced them.

Example:
    >>> from toolkit.data import load_corpus
    >>> corpus = load_corpus("embedded")
    >>> corpus.name, len(corpus) > 50
    ('embedded', True)
"""
from __future__ import annotations

import codecs
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

__all__ = [
    "Corpus",
    "CORPUS_NAMES",
    "WIKITEXT2_TEST_SHA256",
    "default_wikitext_test_path",
    "embedded_corpus",
    "text_file_corpus",
    "wikitext_test_corpus",
    "hub_wikitext103_validation",
    "split_wikitext_articles",
    "load_corpus",
]

#: SHA-256 of ``wikitext-2-raw/wiki.test.raw`` as kept in ``../shared/data`` (see its README).
WIKITEXT2_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"

#: Names :func:`load_corpus` understands (anything else must be a path to a text file).
CORPUS_NAMES = ("embedded", "wikitext-test", "wikitext103-validation")

# A WikiText level-1 heading is exactly " = Title = "; deeper levels are " = = Title = = ",
# so the title must not itself start with "=". Trailing spaces/CR are stripped before matching.
_WIKITEXT_H1 = re.compile(r" = (?!=)(.+?) =")


@dataclass(frozen=True)
class Corpus:
    """A named, immutable list of documents.

    Attributes:
        name: short name (``"embedded"``, ``"wikitext-test"``, a file name, ...).
        documents: the documents, in a fixed order; a tuple so the fingerprint cannot go stale.
        source: one line saying where the text came from.
        titles: one title per document where the source has titles (WikiText), else empty.
        fingerprint: SHA-256 hex digest of the documents (computed, not passed).

    An empty corpus (no document with any non-blank text) is refused at construction.

    Example:
        >>> c = Corpus("demo", ["First document.", "Second one."], source="typed by hand")
        >>> len(c), c.fingerprint[:12]
        (2, 'b274609cfb98')
    """

    name: str
    documents: tuple[str, ...]
    source: str = ""
    titles: tuple[str, ...] = ()
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        # Accept any sequence but store tuples: the fingerprint must describe the content forever.
        object.__setattr__(self, "documents", tuple(self.documents))
        object.__setattr__(self, "titles", tuple(self.titles))
        if self.titles and len(self.titles) != len(self.documents):
            raise ValueError(f"corpus {self.name!r}: {len(self.titles)} titles for "
                             f"{len(self.documents)} documents; give one title per document or none.")
        if not any(doc.strip() for doc in self.documents):
            raise ValueError(f"corpus {self.name!r} is empty: it has {len(self.documents)} documents "
                             f"and no non-blank text (source: {self.source or 'unknown'}).")
        object.__setattr__(self, "fingerprint", _fingerprint(self.documents))

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def n_chars(self) -> int:
        """Total number of characters over all documents."""
        return sum(len(d) for d in self.documents)

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, documents={len(self)}, chars={self.n_chars}, "
                f"fingerprint={self.fingerprint[:12]}..., source={self.source!r})")


def _fingerprint(documents: Iterable[str]) -> str:
    """SHA-256 over length-prefixed UTF-8 documents (so ["ab"] and ["a", "b"] differ)."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----- embedded --------------------------------------------------------------------------------

# reST title underlines ("*****", "=====", "-----") and bare table rules: layout, not prose.
_RULE_LINE = re.compile(r"^\s*([*=\-~^+])\1{2,}\s*$")
# "**PEP 484**" bold markup; the inner text has no quote or star, so Python's "**" operator
# and "**kwargs" (always quoted in these topics) are left alone.
_BOLD = re.compile(r'\*\*([^\s*"][^*"]*?[^\s*"]|[^\s*"])\*\*')


def _clean_topic(text: str) -> str:
    """Light clean-up of one pydoc topic: drop underline rules and ``**bold**`` markup."""
    lines = [line.rstrip() for line in text.splitlines() if not _RULE_LINE.match(line)]
    text = _BOLD.sub(r"\1", "\n".join(lines))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def embedded_corpus() -> Corpus:
    """The Python Language Reference topics that ship with CPython: the offline default.

    What it is: the ``pydoc_data.topics.topics`` dict of the running interpreter, i.e.
    the text ``help("if")``, ``help("assignment")`` ... show: about 80 topics of English
    technical prose (with some grammar rules and short code samples), ~450k characters.
    One document per topic, sorted by topic key so the order is deterministic; reST
    underline rules and ``**bold**`` markers are removed (the ``**`` operator stays). It is not a natural-language
    benchmark corpus like WikiText: use it for smoke tests, demos and CI, and a
    WikiText source for numbers to compare with the papers. The text (and so the
    fingerprint) can change between CPython versions; the fingerprint records which.

    Example:
        >>> c = embedded_corpus()
        >>> c.titles[0], c.documents[0].split("\\n")[0]
        ('assert', 'The "assert" statement')
    """
    import platform

    from pydoc_data.topics import topics

    keys = sorted(topics)
    docs = [_clean_topic(topics[k]) for k in keys]
    kept = [(k, d) for k, d in zip(keys, docs) if d]
    return Corpus(
        name="embedded",
        documents=[d for _, d in kept],
        titles=[k for k, _ in kept],
        source=f"CPython {platform.python_version()} pydoc_data.topics (Python Language Reference topics)",
    )


# ----- text files ------------------------------------------------------------------------------

def _wikitext_title(line: str) -> str | None:
    """The title if ``line`` is a WikiText level-1 heading (`` = Title = ``), else None."""
    m = _WIKITEXT_H1.fullmatch(line.rstrip())
    return m.group(1).strip() if m else None


def split_wikitext_articles(text: str) -> tuple[list[str], list[str]]:
    """Split raw WikiText into articles at level-1 headings; return ``(documents, titles)``.

    Rule: a line that is exactly `` = Title = `` (not `` = = Section = = ``) starts a new
    article; the article's document is its lines from that heading up to the next one,
    heading and section headings included, joined with ``"\\n"`` after dropping blank
    lines (other lines are kept as they are, WikiText's spaces included). Non-blank text before the first heading becomes a
    document titled ``""``.

    Example:
        >>> docs, titles = split_wikitext_articles(" = A = \\n text a \\n = = S = = \\n more \\n = B = \\n text b \\n")
        >>> titles, docs[1]
        (['A', 'B'], ' = B = \\n text b ')
    """
    docs: list[str] = []
    titles: list[str] = []
    current: list[str] = []
    title = ""

    def flush() -> None:
        if any(line.strip() for line in current):
            docs.append("\n".join(current))
            titles.append(title)

    for line in text.splitlines():      # splitlines drops "\n" and "\r\n" alike
        new_title = _wikitext_title(line)
        if new_title is not None:
            flush()
            current, title = [], new_title
        if line.strip():
            current.append(line)
    flush()
    return docs, titles


def _split_blank_lines(text: str) -> list[str]:
    """Blocks of text separated by one or more blank lines, each stripped of outer whitespace."""
    blocks = re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n"))
    return [b.strip() for b in blocks if b.strip()]


def _decode_text(path: Path, encoding: str) -> str:
    """The file's text, or a ``ValueError`` naming the file, what is wrong and the fix."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (--encoding) for {path}; use e.g. utf-8, "
                         f"latin-1 or cp1252.") from None
    data = path.read_bytes()
    if b"\0" in data:
        raise ValueError(f"{path} looks like a binary file (it holds NUL bytes at offset {data.index(0)}), not a "
                         f"text corpus; give a plain text file (documents separated by blank lines).")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid {encoding} text (byte {data[err.start]:#04x} at offset "
                         f"{err.start}); give its encoding, e.g. --encoding latin-1 (Python: "
                         f"load_corpus(path, encoding='latin-1')), or convert the file to UTF-8.") from None


def text_file_corpus(
    path: str | Path,
    sha256: str | None = None,
    split: Literal["auto", "wikitext", "blank-lines", "whole"] = "auto",
    name: str | None = None,
    encoding: str = "utf-8",
) -> Corpus:
    """Read a text file (UTF-8 unless ``encoding`` says otherwise) as a corpus, optionally checking its SHA-256 first.

    Splitting rule (``split="auto"``): if any line is a WikiText level-1 heading
    (`` = Title = ``), split into articles as :func:`split_wikitext_articles` does;
    otherwise each block separated by blank lines is a document (a paragraph per
    document: put whole documents in one block if they should stay together, since
    chunking drops documents shorter than ``seq_len``). ``"whole"`` makes the file one
    document.

    Args:
        path: the text file.
        sha256: expected hex digest of the file's bytes; a mismatch raises ``ValueError``.
        split: ``"auto"``, ``"wikitext"``, ``"blank-lines"`` or ``"whole"``.
        name: corpus name (default: the file name).
        encoding: the file's text encoding, e.g. ``"latin-1"``; a file that does not decode, or
            holds NUL bytes (binary), is refused with its name and the fix.

    Example:
        >>> c = text_file_corpus(default_wikitext_test_path())     # ../shared/data/wikitext-2-raw/wiki.test.raw
        >>> c.titles[0]
        'Robert Boulter'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path.resolve()}")
    if sha256 is not None:
        actual = _sha256_file(path)
        if actual.lower() != sha256.lower():
            raise ValueError(f"SHA-256 mismatch for {path}: expected {sha256.lower()}, got {actual}; "
                             f"the file is not the expected version (corrupt, truncated or re-encoded).")
    text = _decode_text(path, encoding)
    if split == "auto":
        split = "wikitext" if any(_wikitext_title(l) is not None for l in text.splitlines()) else "blank-lines"
    titles: list[str] = []
    if split == "wikitext":
        docs, titles = split_wikitext_articles(text)
    elif split == "blank-lines":
        docs = _split_blank_lines(text)
    elif split == "whole":
        docs = [text.strip()] if text.strip() else []
    else:
        raise ValueError(f"unknown split {split!r}: choose 'auto', 'wikitext', 'blank-lines' or 'whole'.")
    return Corpus(name=name or path.name, documents=docs, titles=titles,
                  source=f"text file {path.resolve()} (split: {split}"
                         + (", sha256 checked" if sha256 else "") + ")")


def default_wikitext_test_path() -> Path:
    """Where the shared WikiText test file lives: ``<repo root>/../shared/data/wikitext-2-raw/wiki.test.raw``.

    Example:
        >>> default_wikitext_test_path().name
        'wiki.test.raw'
    """
    repo_root = Path(__file__).resolve().parents[2]      # toolkit/data/corpora.py -> repo root
    return (repo_root.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw").resolve()


def wikitext_test_corpus(path: str | Path | None = None) -> Corpus:
    """The WikiText-2 (= WikiText-103) test split from the shared data folder, hash-checked.

    Always checks :data:`WIKITEXT2_TEST_SHA256`; one document per article (62 articles).

    Example:
        >>> c = wikitext_test_corpus()
        >>> len(c), c.titles[0]
        (62, 'Robert Boulter')
    """
    path = Path(path) if path is not None else default_wikitext_test_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"WikiText test file not found at {path}. It is kept outside the repository in "
            f"../shared/data/wikitext-2-raw/wiki.test.raw (see ../shared/data/README.md); pass its "
            f"path, or use load_corpus('embedded') for the offline corpus.")
    return text_file_corpus(path, sha256=WIKITEXT2_TEST_SHA256, split="wikitext", name="wikitext-test")


# ----- hub -------------------------------------------------------------------------------------

def hub_wikitext103_validation() -> Corpus:
    """WikiText-103 validation (``Salesforce/wikitext``, ``wikitext-103-raw-v1``) from the HF hub.

    This is the split the paper used. Needs the optional ``datasets`` package and either
    hub access or a local ``datasets`` cache; raises ``RuntimeError`` otherwise, pointing
    to the local test file. Rows are lines; they are joined and split into articles
    as :func:`split_wikitext_articles` does.

    Example:
        >>> c = hub_wikitext103_validation()    # doctest: +SKIP
        >>> c.name                              # doctest: +SKIP
        'wikitext103-validation'

        Offline (``HF_HUB_OFFLINE=1``, as in the tests) it says what to use instead:

        >>> try:
        ...     hub_wikitext103_validation()
        ... except RuntimeError as err:
        ...     print("load_corpus('wikitext-test')" in str(err))
        True
    """
    fallback = ("Use the local WikiText test split instead: load_corpus('wikitext-test') or "
                f"text_file_corpus({str(default_wikitext_test_path())!r}, sha256=WIKITEXT2_TEST_SHA256).")
    try:
        import datasets  # optional: not a dependency of the toolkit
    except ImportError as exc:
        raise RuntimeError("WikiText-103 validation needs the optional 'datasets' package, which is not "
                           f"installed (pip install datasets). {fallback}") from exc
    try:
        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="validation")
    except Exception as exc:   # offline mode, no route to the hub, missing cache: all mean the same here
        raise RuntimeError(f"the HF hub cannot be reached to load Salesforce/wikitext "
                           f"(wikitext-103-raw-v1, validation): {type(exc).__name__}: {exc}. {fallback}") from exc
    docs, titles = split_wikitext_articles("".join(ds["text"]))
    return Corpus(name="wikitext103-validation", documents=docs, titles=titles,
                  source="HF hub Salesforce/wikitext, wikitext-103-raw-v1, split validation")


# ----- one entry point -------------------------------------------------------------------------

def load_corpus(spec: str | Path = "embedded", encoding: str = "utf-8") -> Corpus:
    """Load a corpus from a short spec: a name in :data:`CORPUS_NAMES` or a text file path.

    * ``"embedded"`` -- :func:`embedded_corpus` (offline, always there; the default)
    * ``"wikitext-test"`` -- :func:`wikitext_test_corpus` (shared file, hash-checked)
    * ``"wikitext103-validation"`` -- :func:`hub_wikitext103_validation` (needs the hub)
    * anything else -- a path to an existing text file, read by :func:`text_file_corpus` in
      ``encoding`` (UTF-8 by default; the named corpora have their own)

    Example:
        >>> load_corpus().name
        'embedded'
    """
    if isinstance(spec, str) and spec in CORPUS_NAMES:
        loader = {"embedded": embedded_corpus, "wikitext-test": wikitext_test_corpus,
                  "wikitext103-validation": hub_wikitext103_validation}[spec]
        return loader()
    path = Path(spec)
    if path.is_file():
        return text_file_corpus(path, encoding=encoding)
    raise ValueError(f"unknown corpus {str(spec)!r}: choose one of {', '.join(CORPUS_NAMES)}, "
                     f"or give the path of an existing text file (none at {path.resolve()}).")
