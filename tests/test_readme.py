"""The README's Python tour runs as written (every ```python block, in order, in one namespace) on SmolLM2."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_tour_runs(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4, "the README lost its Python tour"
    monkeypatch.chdir(tmp_path)  # blocks that write (runs/...) write here
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block that broke
            raise AssertionError(f"README python block {i + 1} failed:\n{block}\n{type(err).__name__}: {err}") from err
    assert namespace["jac"].reconstruction_error < 1e-5
    assert len(namespace["result"].layer_summary) == 2
