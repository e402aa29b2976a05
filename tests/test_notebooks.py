"""Every curated notebook executes top to bottom with its fast parameters."""
from __future__ import annotations

from pathlib import Path

import papermill
import pytest

CELL_TIMEOUT_S = 900  # fast settings take under two minutes a notebook on 2 CPU cores
NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), parameters={"FAST": True}, kernel_name="python3",
                               cwd=str(path.parent), progress_bar=False,
                               execution_timeout=CELL_TIMEOUT_S)  # a stuck cell fails the test, not the run
    assert out.exists()


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
