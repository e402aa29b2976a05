"""All-layer Jacobians (forward sweep vs per-layer VJPs) and the layerwise analysis behind Figure 6."""
from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest
import torch

from toolkit.jacobian.all_layers import all_layer_jacobians, choose_mode, layer_targets
from toolkit.jacobian.compute import detached_jacobian
from toolkit.jacobian.layerwise import energy_rank, layerwise_spectra, prompt_matrix, subspace_overlap
from toolkit.models.tiny import MECHANISM_ARCHITECTURES, tiny_hf_model
from toolkit.plots.jacobian import layerwise_figure

IDS = torch.tensor([3, 17, 42, 7, 99])


@pytest.mark.parametrize("arch", MECHANISM_ARCHITECTURES)
def test_forward_sweep_and_per_layer_vjps_agree_and_reconstruct(arch):
    model = tiny_hf_model(arch, n_layers=3, width=32)
    components = ("resid",) if arch == "mamba" else ("resid", "attn", "mlp")
    fwd = all_layer_jacobians(model, IDS, components=components, mode="forward")
    rev = all_layer_jacobians(model, IDS, components=components, mode="reverse", chunk_size=20)
    assert fwd.mode == "forward" and rev.mode == "reverse"
    assert fwd.names == rev.names == layer_targets(model, components)
    for name in fwd.names:
        a, b = fwd[name], rev[name]
        scale = b.jacobian.abs().max()
        assert (a.jacobian - b.jacobian).abs().max() < 1e-5 * scale, name
        assert a.reconstruction_error < 1e-5 and b.reconstruction_error < 1e-5, name
        assert torch.equal(a.y, b.y) and a.settings["target"] == name
    # and both agree with the single-target path
    single = detached_jacobian(model, IDS, target=2)
    assert (fwd[2].jacobian - single.jacobian).abs().max() < 1e-5 * single.jacobian.abs().max()


def test_auto_mode_follows_the_count():
    model = tiny_hf_model("llama", n_layers=3, width=32)
    short = all_layer_jacobians(model, IDS[:1], components=("resid", "attn", "mlp"))
    long = all_layer_jacobians(model, torch.arange(1, 41), components=("resid",))
    assert short.mode == "forward" and long.mode == "reverse"
    assert short.settings["forward_cost"] < short.settings["reverse_cost"]
    assert choose_mode(2, [1.0, 2.0, 30.0], jvp_cost=1.0)[0] == "reverse"
    with pytest.raises(ValueError, match="no \\['attn'\\] sublayer"):
        all_layer_jacobians(tiny_hf_model("mamba"), IDS, components=("attn",))
    with pytest.raises(ValueError, match="unknown component"):
        layer_targets(model, ("ffn",))


def test_layerwise_spectra_against_direct_computation():
    model = tiny_hf_model("qwen3", n_layers=3, width=32)
    layers = all_layer_jacobians(model, IDS, components=("resid", "attn", "mlp"))
    spectra = layerwise_spectra(layers, k=4, energy=0.9)
    assert spectra.names == layers.names
    assert spectra.kinds == ["resid"] * 3 + ["attn"] * 3 + ["mlp"] * 3 + ["output"]
    for i, name in enumerate(spectra.names):
        M = prompt_matrix(layers[name]).double()
        S = torch.linalg.svdvals(M)
        assert torch.allclose(spectra.singular_values[i], S[:spectra.singular_values.shape[1]])
        assert spectra.stable_rank[i] == pytest.approx(float(M.norm() ** 2 / S[0] ** 2))
        energy = (S ** 2).cumsum(0) / (S ** 2).sum()
        assert int(spectra.energy_rank[i]) == int((energy < 0.9).sum()) + 1
    # overlap: 1 with itself, and equal to a direct projection for another layer
    ref = spectra.names.index("output")
    assert float(spectra.overlap_left[ref]) == pytest.approx(1.0)
    U_out = torch.linalg.svd(prompt_matrix(layers["output"]).double())[0][:, :4]
    U_1 = torch.linalg.svd(prompt_matrix(layers[1]).double())[0][:, :4]
    assert float(spectra.overlap_left[0]) == pytest.approx(float((U_out.T @ U_1).pow(2).sum() / 4))
    assert 0 <= float(spectra.overlap_right.min()) and float(spectra.overlap_right.max()) <= 1 + 1e-9
    # one position's block instead of the whole prompt
    last = layerwise_spectra(layers, block=-1, k=4)
    assert last.singular_values.shape[1] == 32 and last.settings["block"] == -1
    json.dumps(spectra.to_dict())
    layers_, values = spectra.curve("mlp", "stable_rank")
    assert layers_ == [0, 1, 2] and len(values) == 3
    fig = layerwise_figure(spectra)
    assert isinstance(fig, go.Figure) and len(fig.layout.annotations) == 4
    assert {t.name for t in fig.data if t.showlegend} >= {"attention output", "MLP output", "residual stream h_l"}
    with pytest.raises(ValueError, match="no targets of kind"):
        layerwise_spectra({1: layers[1], 2: layers[2]}).curve("mlp", "stable_rank")


def test_summary_helpers():
    assert energy_rank(torch.tensor([2.0, 1.0, 0.0]), 0.8).item() == 1
    assert energy_rank(torch.zeros(3)).item() == 0
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    assert subspace_overlap(q[:, :5], q[:, :5]) == pytest.approx(1.0)
    assert subspace_overlap(q[:, :5], q[:, 5:10]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="energy"):
        energy_rank(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="block"):
        prompt_matrix(detached_jacobian(tiny_hf_model("gpt2", width=32), IDS[:2]), block=5)
