"""Shared benchmark helpers: timing, peak memory, a printed table and a JSON file."""
from __future__ import annotations

import json
import platform
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def timed(record: dict, key: str = "seconds"):
    """Store the wall time of the block in ``record[key]``."""
    t0 = time.perf_counter()
    yield
    record[key] = round(time.perf_counter() - t0, 3)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def print_table(rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(out_dir: Path, name: str, rows: list[dict], settings: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "settings": settings, "rows": rows,
                                "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                            "threads": torch.get_num_threads(), "cpu": platform.processor()}},
                               indent=1))
    return path
