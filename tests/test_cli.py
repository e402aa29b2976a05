"""The command line: help, model listing, clear errors, the demo job."""
from __future__ import annotations

import json
import subprocess
import sys

from toolkit.cli import main, parse_layers


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "toolkit", "--help"], capture_output=True, text=True, check=True)
    for command in ("models", "collect", "decompose", "jacobian", "demo"):
        assert command in out.stdout


def test_models_lists_backend_and_availability(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("smollm2-135m"))
    assert "nnsight" in line and "yes" in line
    assert "transformer_lens" in next(l for l in out.splitlines() if l.startswith("pythia-70m"))


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["collect", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model id 'no-such-model'") and "smollm2-135m" in err


def test_parse_layers():
    assert parse_layers("0,3-5") == [0, 3, 4, 5]
    assert parse_layers(None) is None and parse_layers("all") is None


def test_demo_writes_report_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n-train", "8", "--n-test", "3"]) == 0
    result = json.loads((tmp_path / "demo" / "result.json").read_text())
    assert result["settings"]["n_train"] == 8 and len(result["layer_summary"]) == 30
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "src=\"http" not in html and "<script src" not in html and "Plotly.newPlot" in html
