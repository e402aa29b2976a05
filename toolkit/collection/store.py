"""An on-disk, atomically written store of hidden states at sampled positions.

Layout of one entry (a folder named by its cache key)::

    meta.json          settings, model and corpus fingerprints, shapes; written last
    tokens.npy         [n_texts, seq_len] int64, the texts
    positions.npy      [n_texts, per_text] int64, the sampled positions
    h{l:03d}.npy       [n_texts * per_text, d_model] float32, boundary l at those positions

A run writes into a hidden temporary folder beside the final one and renames it into
place only after ``meta.json`` is written, so an interrupted run never leaves an entry that
loads as valid. The temporary's name records the writer's host and pid; a run killed with
``kill -9`` leaves it behind, and the next writer in the same store removes every temporary
whose writer is dead (:func:`toolkit.atomic.remove_stale_temporaries`), never a live one.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from toolkit.atomic import remove_stale_temporaries, swap_in, temporary_prefix

META = "meta.json"
FORMAT_VERSION = 1


def boundary_file(layer: int) -> str:
    return f"h{layer:03d}.npy"


class EntryWriter:
    """Write one store entry; use as a context manager so a failure leaves nothing behind."""

    def __init__(self, final_dir: Path, n_rows: int, d_model: int, boundaries: list[int]):
        self.final_dir = Path(final_dir)
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.final_dir.parent)  # left by killed runs of any entry
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=temporary_prefix(self.final_dir.name), dir=self.final_dir.parent))
        self.arrays = {l: np.lib.format.open_memmap(self.tmp_dir / boundary_file(l), mode="w+",
                                                    dtype=np.float32, shape=(n_rows, d_model))
                       for l in boundaries}

    def __enter__(self) -> "EntryWriter":
        return self

    def write_rows(self, start: int, per_boundary: dict[int, np.ndarray]) -> None:
        for l, rows in per_boundary.items():
            self.arrays[l][start:start + len(rows)] = rows

    def commit(self, meta: dict, **extra_arrays: np.ndarray) -> Path:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        for name, arr in extra_arrays.items():
            np.save(self.tmp_dir / f"{name}.npy", arr)
        (self.tmp_dir / META).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION, "complete": True},
                                                    indent=1))
        swap_in(self.tmp_dir, self.final_dir)  # replaces an older or broken entry under the same key
        return self.final_dir

    def __exit__(self, exc_type, exc, tb) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def read_meta(entry_dir: Path) -> dict | None:
    """The entry's metadata if the entry is complete and intact, else None."""
    try:
        meta = json.loads((Path(entry_dir) / META).read_text())
    except (OSError, ValueError):
        return None
    if not meta.get("complete") or meta.get("format_version") != FORMAT_VERSION:
        return None
    names = [boundary_file(l) for l in meta["boundaries"]] + ["tokens.npy", "positions.npy"]
    if not all((Path(entry_dir) / n).exists() for n in names):
        return None
    return meta
