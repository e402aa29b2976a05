"""SVD and token decoding of the detached Jacobian, its figures and the ``jacobian`` command."""
from __future__ import annotations

import argparse
import json

import plotly.graph_objects as go
import pytest
import torch

from toolkit.jacobian.analysis import (align_signs, analyze_jacobian, analyze_with_model, stable_rank,
                                       svd_per_position)
from toolkit.jacobian.cli_command import add_jacobian_parser, format_summary, parse_target
from toolkit.jacobian.result import DetachedJacobian
from toolkit import detached_jacobian as backend_jacobian  # the loaded model: its own hooking path
from toolkit.plots.jacobian import decoded_tokens_table, reconstruction_scatter, singular_spectra

PROMPT = "The bridge out of Marin is the"


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    """SmolLM2 through nnsight on its own copy of the weights: the session's ``smollm2_hf`` may be
    wrapped in place by a TransformerBridge (same values, but each backward pass ~3x slower)."""
    from transformers import AutoModelForCausalLM
    from toolkit.backends import make_backend
    from toolkit.models.weights import SMOLLM2, converted_folder
    hf = AutoModelForCausalLM.from_pretrained(str(converted_folder(SMOLLM2)), dtype=torch.float32).eval()
    return make_backend(hf, smollm2_tokenizer, backend="nnsight", model_id="smollm2-135m")


@pytest.fixture(scope="module")
def marin(smollm2):
    """Detached and ordinary Jacobians of the paper's prompt on SmolLM2, with their analysis."""
    ids = smollm2.to_tokens(PROMPT)[0]
    det = backend_jacobian(smollm2, ids)
    ordinary = backend_jacobian(smollm2, ids, detached=False)
    return det, ordinary, analyze_with_model(det, smollm2, top_k=5, n_vectors=3)


def test_svd_reconstructs_each_block_and_signs_follow_y():
    torch.manual_seed(0)
    J, y = torch.randn(4, 12, 9), torch.randn(12)
    U, S, V = svd_per_position(J)
    assert torch.allclose(U @ torch.diag_embed(S) @ V.mT, J.double(), atol=1e-10)
    Ua, Va = align_signs(U, V, y)
    assert torch.allclose(Ua @ torch.diag_embed(S) @ Va.mT, J.double(), atol=1e-10)
    assert (torch.einsum("tdr,d->tr", Ua, y.double()) >= 0).all()
    sr = stable_rank(J)
    assert ((sr >= 1) & (sr <= 9)).all()
    assert torch.allclose(stable_rank(torch.eye(5)[None]), torch.tensor([5.0], dtype=torch.float64))


def test_decoding_on_a_toy_vocabulary():
    # J maps e_0 -> e_1: the left vector decodes (through W_U = I) to token 1, the right one to token 0.
    J = torch.zeros(1, 3, 3)
    J[0, 1, 0] = 2.0
    r = DetachedJacobian(J, y=torch.tensor([0.0, 1.0, 0.0]), x=torch.tensor([[0.5, 0.0, 0.0]]), c=torch.zeros(3),
                         token_ids=torch.tensor([0]))
    a = analyze_jacobian(r, W_U=torch.eye(3), W_E=torch.eye(3), decode=lambda i: f"t{i}", top_k=2, n_vectors=1)
    assert a.left[0][0]["tokens"][0] == "t1" and a.right[0][0]["tokens"][0] == "t0"
    assert a.left[0][0]["value"] == pytest.approx(2.0)
    assert a.rows[0][0]["index"] == 1 and a.cols[0][0]["index"] == 0  # largest row / column of J
    assert float(a.stable_rank[0]) == pytest.approx(1.0)
    json.dumps(a.to_dict())


def test_smollm2_marin_analysis(marin, smollm2):
    det, ordinary, a = marin
    T = len(a.str_tokens)
    assert a.str_tokens[-1] == " the" and det.jacobian.shape == (T, 576, 576)
    assert det.reconstruction_error < 1e-5 and ordinary.reconstruction_error > 1e-2
    # the SVD reconstructs every block J_i (from the full decomposition)
    U, S, V = svd_per_position(det.jacobian)
    assert (U @ torch.diag_embed(S) @ V.mT - det.jacobian.double()).norm() / det.jacobian.norm() < 1e-10
    assert ((a.stable_rank >= 1) & (a.stable_rank <= 576)).all()
    for side in ("left", "right", "rows", "cols"):
        entries = getattr(a, side)
        assert len(entries) == T and all(isinstance(t, str) for e in entries for d in e for t in d["tokens"])
        assert all(len(d["tokens"]) == 5 for e in entries for d in e)
    # the first left singular vector at the last position decodes to a plausible next token
    logits = smollm2.logits(det.token_ids[None])[0, -1]
    top50 = logits.topk(50).indices.tolist()
    first = a.left[-1][0]["token_ids"][0]
    print(f"top decoded token of u_1 at {a.str_tokens[-1]!r}: {a.left[-1][0]['tokens'][0]!r} "
          f"(model rank {top50.index(first) if first in top50 else '>50'})")
    assert first in top50
    json.dumps(a.to_dict())


def test_figures(marin):
    det, ordinary, a = marin
    fig = reconstruction_scatter(det, ordinary)
    assert isinstance(fig, go.Figure) and len(fig.data) == 3
    assert "detached" in fig.data[0].name and "ordinary" in fig.data[1].name
    spectra = singular_spectra(a)
    assert len(spectra.data) == len(a.str_tokens) and spectra.layout.yaxis.type == "log"
    table = decoded_tokens_table(a)
    assert table.data[0].type == "table" and table.data[1].type == "heatmap"
    assert "<br>" in table.data[1].customdata[0][0]  # hover lists the tokens with scores


def test_jacobian_command_end_to_end(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_jacobian_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["jacobian", "--prompt", "Hi there", "--top-k", "3", "--layer", "10",
                              "--out", str(tmp_path)])
    assert (args.model, parse_target(args.layer)) == ("smollm2-135m", 10)  # boundary 10: a third of the cost
    assert args.func(args) == 0  # toolkit.load_model, both Jacobians, analysis, files, summary
    data = json.loads((tmp_path / "jacobian.json").read_text())
    assert data["model"] == "smollm2-135m" and data["target"] == "resid.10"
    assert data["detached"]["reconstruction_error"] < 1e-5 < data["ordinary"]["reconstruction_error"]
    assert len(data["analysis"]["stable_rank"]) == len(data["str_tokens"]) == 2
    assert len(data["analysis"]["left"][-1][0]["tokens"]) == 3
    assert DetachedJacobian.load(tmp_path / "detached_jacobian").reconstruction_error < 1e-5
    html = (tmp_path / "report.html").read_text()
    assert "<script src=" not in html and html.count("plotly-graph-div") >= 3  # self-contained
    printed = capsys.readouterr().out
    assert "stable rank" in printed and "reconstruction error" in printed
    assert format_summary(data).splitlines()[0] in printed


def test_parse_target_errors():
    assert parse_target("0") == 0 and parse_target("output") == "output"
    assert parse_target("mlp.3") == "mlp.3" and parse_target("Layer.12") == "layer.12"
    for bad in ("middle", "mlp", "ffn.3", "attn.x"):
        with pytest.raises(ValueError, match="--layer"):
            parse_target(bad)


def test_jacobian_command_on_a_component(smollm2_nnsight, tmp_path):
    """A component target (one block's MLP output) runs on the HF model under the same freeze."""
    from toolkit.jacobian.cli_command import run_jacobian
    summary = run_jacobian(smollm2_nnsight, "Hi there", target="mlp.3", top_k=2, n_vectors=1, out=tmp_path)
    assert summary["target"] == "mlp.3"
    assert summary["detached"]["reconstruction_error"] < 1e-5 < summary["ordinary"]["reconstruction_error"]
    with pytest.raises(ValueError, match="out of range"):
        run_jacobian(smollm2_nnsight, "Hi there", target="mlp.30", out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything is written


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "mamba", "gemma2", "olmo2", "phi3", "gpt_neo"])
def test_residual_readout_is_the_frozen_final_norm_then_unembedding(arch):
    """u @ residual_readout is parallel to W_U applied to the frozen final norm's derivative in u."""
    from toolkit.jacobian.analysis import residual_readout
    from toolkit.jacobian.freeze import detached
    from toolkit.models.architectures import spec_for
    from toolkit.models.tiny import tiny_hf_model

    model = tiny_hf_model(arch, width=32)
    norm = spec_for(model).final_norm(model)
    with torch.no_grad():  # a non-trivial gain (and bias), so a gain-free readout would fail
        for p in norm.parameters():
            p.add_(0.5 * torch.randn_like(p))
    W_U = model.get_output_embeddings().weight.detach().T  # [d, vocab]
    h, u = torch.randn(32), torch.randn(32)
    with detached(model):
        J = torch.autograd.functional.jacobian(lambda z: norm(z[None])[0], h)  # frozen: the linear part only
    expected = (J @ u) @ W_U
    got = u @ residual_readout(norm, W_U)
    assert torch.nn.functional.cosine_similarity(expected, got, dim=0) > 1 - 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_residual_readout_sees_through_the_transformer_lens_bridge(arch, smollm2_tokenizer):
    # TransformerBridge wraps the final norm in place; the readout must still be the HF norm's
    # (Gemma's 1 + w, GPT-2's centring), whichever backend hands it over.
    from toolkit.backends import make_backend
    from toolkit.jacobian.analysis import residual_readout
    from toolkit.models.architectures import spec_for
    from toolkit.models.tiny import tiny_hf_model

    hf = tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size)
    with torch.no_grad():
        for p in spec_for(hf).final_norm(hf).parameters():
            p.add_(0.5 * torch.randn_like(p))
    expected = residual_readout(spec_for(hf).final_norm(hf), hf.get_output_embeddings().weight.T)
    tl_model = make_backend(hf, smollm2_tokenizer, backend="tl")
    assert type(tl_model.final_norm).__module__.startswith("transformer_lens")      # it is the bridge
    torch.testing.assert_close(residual_readout(tl_model.final_norm, tl_model.W_U), expected)


def test_residual_readout_refuses_a_norm_without_a_rule():
    from toolkit.jacobian.analysis import residual_readout

    class MyNorm(torch.nn.Module):
        weight = torch.nn.Parameter(torch.ones(4))

    with pytest.raises(ValueError, match="no readout for the final norm .*MyNorm.*register_rule"):
        residual_readout(MyNorm(), torch.eye(4))
