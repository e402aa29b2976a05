"""The public surface: `import toolkit` is enough, any model and any prompt form, results own their views."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import toolkit
from toolkit.decompose.result import DecompositionResult
from toolkit.models.tiny import tiny_hf_model
from toolkit.plots.decomposition import rel_err_kl_scatter

PROMPT = "The bridge out of Marin is the"


def test_top_level_exports():
    for name in ("load_model", "decompose_layers", "detached_jacobian", "jacobian_svd", "all_layer_jacobians",
                 "steer", "steering_sweep", "make_backend", "ensure_tokens"):
        assert callable(getattr(toolkit, name)), name


def test_prompt_forms_agree(smollm2_nnsight):
    model = smollm2_nnsight
    ids = model.to_tokens(PROMPT)
    for prompt in (PROMPT, [PROMPT], ids, ids[0], ids[0].tolist()):
        assert torch.equal(toolkit.ensure_tokens(model, prompt), ids.cpu())
    assert torch.equal(model.hidden_states(PROMPT), model.hidden_states(ids))  # was: 'str' has no attribute 'ndim'
    with pytest.raises(ValueError, match="different lengths"):
        toolkit.ensure_tokens(model, ["a", "a much longer text than the first"])
    with pytest.raises(ValueError, match="must be integers"):
        toolkit.ensure_tokens(model, torch.randn(3))


def test_jacobian_takes_any_model_and_text(smollm2_hf, smollm2_nnsight, smollm2_tl):
    """The loaded model, its HF module and the TL backend give the same Jacobian of a text prompt."""
    ids = smollm2_nnsight.to_tokens(PROMPT)[0]
    via_backend = toolkit.detached_jacobian(smollm2_nnsight, PROMPT, target="resid.12")
    via_hf = toolkit.detached_jacobian(smollm2_hf, ids, target=12)            # bare HF module: ids
    via_tl = toolkit.detached_jacobian(smollm2_tl, PROMPT, target="blocks.11.hook_resid_post")
    assert via_backend.settings["backend"] == "nnsight" and via_tl.settings["backend"] == "transformer_lens"
    assert "backend" not in via_hf.settings
    for r in (via_backend, via_hf, via_tl):
        assert r.settings["target"] == "resid.12"
        assert r.reconstruction_error < 1e-5, r
    scale = via_hf.jacobian.abs().max()
    assert (via_backend.jacobian - via_hf.jacobian).abs().max() < 1e-4 * scale
    assert (via_tl.jacobian - via_hf.jacobian).abs().max() < 1e-4 * scale
    with pytest.raises(ValueError, match="needs a tokenizer"):
        toolkit.detached_jacobian(smollm2_hf, PROMPT)
    with pytest.raises(ValueError, match="one non-empty sequence"):
        toolkit.detached_jacobian(smollm2_nnsight, [PROMPT, PROMPT])


def test_jacobian_svd_and_all_layers_take_the_loaded_model(smollm2_nnsight):
    """Was: jacobian_svd(model, ...) said 'model type None is not supported'."""
    top = toolkit.jacobian_svd(smollm2_nnsight, "The capital of France is", k=2, tol=1e-3)
    assert top.singular_values.shape == (2,) and isinstance(top.figure(), go.Figure)
    layers = toolkit.all_layer_jacobians(smollm2_nnsight, "Paris is", components=("resid",), output=False)
    assert layers["resid.3"] is layers[3]
    spectra = layers.spectra(k=2)
    frame = spectra.to_frame()
    assert list(frame["name"])[:2] == ["resid.1", "resid.2"] and len(frame) == smollm2_nnsight.n_layers
    assert isinstance(spectra.figure(), go.Figure)


def test_decoded_tokens_in_one_call(smollm2_nnsight):
    jac = toolkit.detached_jacobian(smollm2_nnsight, PROMPT)
    svd = jac.svd(smollm2_nnsight)
    top = svd.top_tokens(position=-1, k=5)
    assert len(top) == 5 and top == svd.left[-1][0]["tokens"][:5]
    assert svd.top_tokens(position=-1, k=3, vector=1) == svd.left[-1][1]["tokens"][:3]
    with pytest.raises(ValueError, match="top_k"):
        svd.top_tokens(k=50)
    assert isinstance(jac.figure(), go.Figure) and isinstance(svd.figure("spectra"), go.Figure)


def test_steer_default_depth_and_vocabulary():
    model = toolkit.make_backend(tiny_hf_model("llama", n_layers=3))
    r = toolkit.steer(model, [5, 6, 7], [9, 10], lam=0.0, max_new_tokens=2)       # default depth, in the library
    assert [run.layer for run in r.runs] == [2]                                   # round(2 * 3 / 3)
    r2 = toolkit.steer(model, [5, 6, 7], [9, 10], at="blocks.0.hook_resid_post", lam=0.0, max_new_tokens=2)
    assert [run.layer for run in r2.runs] == [1]
    with pytest.raises(ValueError, match="not a residual-stream boundary"):
        toolkit.steer(model, [5, 6, 7], [9, 10], at="mlp.1", max_new_tokens=2)
    assert len(r.to_frame()) == 2  # baseline and the steered run


def _synthetic_result(rows_per_layer: int = 3000) -> DecompositionResult:
    rng = np.random.default_rng(0)
    n = 2 * rows_per_layer
    anchors = {"layer": np.repeat([0, 1], rows_per_layer), "text": np.zeros(n, int), "position": np.zeros(n, int),
               "token": np.array(["a"] * n), "context": np.array(["ctx"] * n), "rel_err": rng.random(n),
               "kl": rng.random(n)}
    return DecompositionResult(settings={}, anchors=anchors)


def test_scatter_samples_across_all_layers():
    """Was: with layer=None the first 4000 rows were kept, i.e. the first layer alone."""
    fig = rel_err_kl_scatter(_synthetic_result(), max_points=4000)
    shown_layers = set(np.asarray(fig.data[0].marker.color).tolist())
    assert shown_layers == {0, 1}
    assert "a random 4000 of 6000 anchors" in fig.layout.title.text
    assert np.array_equal(fig.data[0].x, rel_err_kl_scatter(_synthetic_result(), max_points=4000).data[0].x)
    assert "2000 anchors" in rel_err_kl_scatter(_synthetic_result(1000)).layout.title.text


def test_make_backend_says_it_wraps_in_place():
    hf = tiny_hf_model("llama")
    model = toolkit.make_backend(hf)
    assert model.hf_model is hf and model.wraps_in_place


def test_every_result_reports_and_reloads(smollm2_nnsight, tmp_path):
    """Each result type writes its self-contained report and comes back from toolkit.load by its kind."""
    model = smollm2_nnsight
    jac = toolkit.detached_jacobian(model, "Paris is", chunk_size=192)
    layers = toolkit.all_layer_jacobians(model, "Paris is", components=("resid",), chunk_size=192)
    top = toolkit.jacobian_svd(model, "Paris is", k=2, max_blocks=2)
    results = {"jac": jac, "svd": jac.svd(model), "layers": layers, "spectra": layers.spectra(k=2), "top": top}
    for name, result in results.items():
        page = (jac.report(tmp_path / f"{name}.html", model) if name == "jac"
                else result.report(tmp_path / f"{name}.html"))
        html = page.read_text()
        assert html.startswith("<!DOCTYPE html>") or "<html" in html[:200], name
        assert "plotly" in html.lower(), name
        result.save(tmp_path / name)
        assert type(toolkit.load(tmp_path / name)) is type(result), name
    assert toolkit.load(tmp_path / "jac").reconstruction_error == jac.reconstruction_error


def test_subpackages_import_each_other_one_way():
    """The package layers stay acyclic (models < backends < analyses < cli): a cycle is named."""
    import ast
    import pathlib

    root = pathlib.Path(toolkit.__file__).parent
    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        source = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("toolkit."):
                target = node.module.split(".")[1]
                if target != source:
                    edges.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cycles = sorted(f"{a} -> {b}" for a in edges for b in edges[a] if reaches(b, a, {b}))
    assert not cycles, f"package import cycles: {cycles}"


def test_token_ids_outside_the_vocabulary_are_refused_before_the_model_runs(smollm2_tokenizer):
    from toolkit.models.tiny import tiny_hf_model

    tiny = toolkit.make_backend(tiny_hf_model("llama"), smollm2_tokenizer, backend="nnsight")
    with pytest.raises(ValueError, match="outside .* vocabulary .* another model's tokenizer"):
        tiny.hidden_states("Hello world, this is SmolLM2's tokenizer")  # ids beyond the tiny model's vocabulary
    with pytest.raises(ValueError, match="token id -1 is outside"):
        tiny.logits(torch.tensor([[1, -1]]))
    assert tiny.logits(torch.tensor([[1, 2]])).shape[:2] == (1, 2)
