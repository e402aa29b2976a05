"""The decomposition end to end: result contents, save/load, figures, report, errors, backend parity."""
from __future__ import annotations

import csv

import numpy as np
import plotly.graph_objects as go
import pytest

from toolkit.backends import make_backend
from toolkit.decompose.pipeline import decompose
from toolkit.decompose.report import write_decomposition_report
from toolkit.decompose.result import DecompositionResult
from toolkit.models.tiny import TINY_ARCHITECTURES, tiny_hf_model
from toolkit.plots import decomposition as figs

SMALL = dict(n_train=8, n_test=3, seq_len=32, per_text=4, k=16, rank=8, mlp_steps=20, n_boot=100, progress=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny(smollm2_tokenizer):
    return make_backend(tiny_hf_model("gpt_neox", n_layers=3, vocab_size=smollm2_tokenizer.vocab_size),
                        smollm2_tokenizer)


def test_result_has_every_metric_and_roundtrips(tiny, tmp_path):
    result = decompose(tiny, "embedded", sweep_k=[8, 16], sweep_rank=[4, 8], **SMALL)
    a = result.anchors
    n = 3 * 3 * 4  # layers x test texts x positions
    for col in ("rel_err", "kl", "kl_random", "kl_mlp", "rel_err_mlp", "cos_full_tok", "angle_res_tok",
                "proj_full_1", "proj_tokenwise_4", "proj_residual_8", "token", "context"):
        assert len(a[col]) == n, col
    assert (a["kl"] >= 0).all() and (a["rel_err"] > 0).all()
    assert [r["layer"] for r in result.layer_summary] == [0, 1, 2]
    assert {r["k"] for r in result.sweeps["k"]} == {8, 16} and {r["rank"] for r in result.sweeps["rank"]} == {4, 8}
    result.save(tmp_path / "run")
    back = DecompositionResult.load(tmp_path / "run")
    assert back.layer_summary == result.layer_summary and back.sweeps == result.sweeps
    np.testing.assert_array_equal(back.anchors["kl"], a["kl"])
    with open(tmp_path / "run" / "anchors.csv", newline="") as f:
        rows = list(csv.reader(f))                 # contexts hold newlines and commas: parse, don't count
    assert len(rows) == n + 1 and rows[0][0] == "layer"
    for fig in (figs.rho_bars([result]), figs.rel_err_kl_scatter(result, 1), figs.layerwise_rho(result),
                figs.layerwise_rel_err(result), figs.alignment_summary(result), figs.angle_distributions(result),
                figs.projection_fractions(result), figs.sweep(result, "rank"), figs.kl_vs_random_control(result)):
        assert isinstance(fig, go.Figure) and fig.layout.title.text and fig.layout.xaxis.title.text
    html = write_decomposition_report(result, tmp_path / "report.html").read_text()
    assert html.count("Plotly.newPlot") >= 8


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_runs_end_to_end_on_every_tiny_architecture(arch, smollm2_tokenizer):
    model = make_backend(tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size), smollm2_tokenizer)
    result = decompose(model, "embedded", layers=[1], **{**SMALL, "n_train": 6, "n_test": 2}, compare_mlp=False)
    rel, kl = result.anchors["rel_err"], result.anchors["kl"]
    assert len(rel) == 2 * 4 and np.isfinite(rel).all() and (rel > 0).all() and (kl >= 0).all()


def test_rank_controls_rel_err(tiny):
    low = decompose(tiny, "embedded", layers=[1], **{**SMALL, "rank": 1}, compare_mlp=False)
    high = decompose(tiny, "embedded", layers=[1], **SMALL, compare_mlp=False)
    assert high.layer_summary[0]["rel_err_mean"] < low.layer_summary[0]["rel_err_mean"]


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="k=1000 is larger than the training set"):
        decompose(tiny, "embedded", **{**SMALL, "k": 1000})
    with pytest.raises(ValueError, match="rank=999 must be between 1 and the model width 64"):
        decompose(tiny, "embedded", **{**SMALL, "rank": 999})
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        decompose(tiny, "embedded", layers=[7], **SMALL)
    with pytest.raises(ValueError, match="need n_train \\+ n_test"):
        decompose(tiny, "embedded", **{**SMALL, "n_train": 100000})
    with pytest.raises(ValueError, match="unknown function class 'quadratic'"):
        decompose(tiny, "embedded", function_class="quadratic", **SMALL)


def test_load_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no decomposition result"):
        DecompositionResult.load(tmp_path)


@pytest.mark.transformer_lens
def test_smollm2_same_metrics_through_both_backends(smollm2_nnsight, smollm2_tl):
    kwargs = dict(layers=[2, 20], n_train=6, n_test=2, seq_len=40, per_text=4, k=16, rank=8, compare_mlp=False,
                  n_boot=50, progress=False)
    a = decompose(smollm2_nnsight, "wikitext-test", **kwargs)
    b = decompose(smollm2_tl, "wikitext-test", **kwargs)
    for col in ("rel_err", "kl", "abs_cos_full_tok", "proj_residual_8"):
        np.testing.assert_allclose(a.anchors[col], b.anchors[col], rtol=2e-3, atol=1e-5)
    assert a.settings["backend"] != b.settings["backend"]
    # on a real model the tokenwise map leaves a residual that matters
    assert (a.anchors["kl"] > 0).all() and 0.01 < np.median(a.anchors["rel_err"]) < 1.5


def test_records_the_rank_the_maps_really_have(tiny):
    """#15: `--rank 32 --k 8` fits rank-7 maps (update form: 8 centred neighbours span 7 directions); the
    result records rank 7 (and the request), and its numbers are those of rank 7."""
    kwargs = {**SMALL, "k": 8, "compare_mlp": False}
    asked = decompose(tiny, "embedded", layers=[1], **{**kwargs, "rank": 32}, sweep_rank=[4, 32])
    assert asked.settings["rank"] == 7 and asked.settings["rank_requested"] == 32
    same = decompose(tiny, "embedded", layers=[1], **{**kwargs, "rank": 7})
    assert same.settings["rank"] == 7 and "rank_requested" not in same.settings
    np.testing.assert_allclose(asked.anchors["rel_err"], same.anchors["rel_err"], rtol=1e-4)
    assert [(r["rank"], r.get("rank_requested")) for r in asked.sweeps["rank"]] == [(4, None), (7, 32)]


@pytest.mark.parametrize("arch", ["mistral", "ministral", "ministral3", "phi3", "olmo2", "gemma2", "smollm3",
                                  "gptj", "gpt_neo", "gemma"])
def test_decomposition_runs_on_every_family(arch, smollm2_tokenizer):
    """Issue 12's families end to end (through nnsight, which serves them all): one layer, small settings."""
    model = make_backend(tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size), smollm2_tokenizer)
    result = decompose(model, "embedded", layers=[1], **SMALL, compare_mlp=False)
    (row,) = result.layer_summary
    assert row["layer"] == 1 and np.isfinite(row["rel_err_mean"]) and row["rel_err_mean"] > 0
    kl = result.anchors["kl"]
    assert len(kl) == 3 * 4 and np.isfinite(kl).all() and (kl >= 0).all()
