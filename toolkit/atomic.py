"""Atomic writes of files and whole folders, and the removal of temporaries that killed runs left.

Every writer here first writes a hidden sibling temporary (``.NAME.tmp-HOST-PID-RANDOM``) and
then renames it into place, so a reader sees the old content or the new one, never a mix.
A process killed with ``kill -9`` cannot remove its temporary; :func:`remove_stale_temporaries`
removes those whose writer is gone (same host, process no longer alive), or, for writers on
another host, that are older than ``max_age_s``. A temporary a live process is writing is never
touched.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_folder(root / "run") as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> sorted(p.name for p in root.iterdir())
    ['run']
    >>> _ = atomic_write_text(root / "note.txt", "hi"); (root / "note.txt").read_text()
    'hi'
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_HOST = socket.gethostname().replace("-", "_")  # '-' separates the fields of a temporary's name
DAY_S = 24 * 3600.0


def temporary_prefix(name: str) -> str:
    """The hidden name prefix of a temporary for ``name`` written by this process.

    Example:
        >>> temporary_prefix("run").startswith(".run.tmp-")
        True
    """
    return f".{name}.tmp-{_HOST}-{os.getpid()}-"


def _writer_of(temporary: Path) -> tuple[str, int] | None:
    """``(host, pid)`` from a temporary's name, or None when the name is not one of ours."""
    _, _, tail = temporary.name.rpartition(".tmp-")
    parts = tail.split("-")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(temporary: Path, max_age_s: float = DAY_S) -> bool:
    """Whether a temporary's writer is gone: dead process on this host, or older than ``max_age_s`` elsewhere.

    Example:
        >>> is_stale(Path(temporary_prefix("x") + "abc"))        # this process is alive
        False
    """
    writer = _writer_of(temporary)
    if writer is None:
        return False
    host, pid = writer
    if host == _HOST:
        return not _alive(pid)
    try:
        return time.time() - temporary.lstat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def remove_stale_temporaries(folder: str | Path, name: str = "*", max_age_s: float = DAY_S) -> list[Path]:
    """Remove the temporaries of ``name`` (``"*"``: of anything) in ``folder`` whose writer is gone.

    Returns what was removed. Temporaries of live writers, and anything not named like a
    temporary, stay.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".run.tmp-elsewhere-1-x").mkdir()           # another host, fresh: kept
        >>> remove_stale_temporaries(root, max_age_s=3600)
        []
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob(".*.tmp-*" if name == "*" else f".{glob.escape(name)}.tmp-*"):
        if is_stale(tmp, max_age_s):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary and a rename; returns the path.

    Example:
        >>> import tempfile
        >>> p = atomic_write_bytes(Path(tempfile.mkdtemp()) / "x.bin", b"abc"); p.read_bytes()
        b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text.

    Example:
        >>> import tempfile
        >>> atomic_write_text(Path(tempfile.mkdtemp()) / "x.txt", "é").read_text(encoding="utf-8")
        'é'
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(tmp: Path, path: Path) -> None:
    """Put the folder ``tmp`` at ``path``, replacing what is there in one step where the OS can.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); (root / "new").mkdir(); (root / "old").mkdir()
        >>> swap_in(root / "new", root / "old"); [p.name for p in root.iterdir()]
        ['old']
    """
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # now holds the old content
    else:  # two renames; a kill between them leaves the old content in .NAME.old-*
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` as a whole.

    On an exception the temporary is removed and ``path`` is untouched. Stale temporaries of
    ``path`` left by killed writers are removed first.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with atomic_folder(root / "run") as tmp:
        ...     _ = (tmp / "a").write_text("1")
        >>> (root / "run" / "a").read_text()
        '1'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(path.name), dir=path.parent))
    try:
        yield tmp
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
