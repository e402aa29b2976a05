"""Loading: the embedded default, the registry, clear errors; real SmolLM2 through both backends."""
from __future__ import annotations

import pytest
import torch

import toolkit
from toolkit.models.registry import REGISTRY, find_entry


def test_smollm2_knows_paris(smollm2_nnsight, smollm2_tl):
    for model in (smollm2_nnsight, smollm2_tl):
        ids = model.to_tokens("The capital of France is")
        top3 = [model.tokenizer.decode(int(i)) for i in model.logits(ids)[0, -1].topk(3).indices]
        assert " Paris" in top3, top3


def test_smollm2_backend_parity(smollm2_nnsight, smollm2_tl):
    a, b = smollm2_nnsight, smollm2_tl
    assert (a.n_layers, a.d_model) == (30, 576)
    ids = a.to_tokens(["The bridge out of Marin is the", "Interpretability asks how models transform"])[:, :7]
    ha, hb = a.hidden_states(ids), b.hidden_states(ids)
    torch.testing.assert_close(ha, hb, rtol=1e-5, atol=1e-4)
    pos = torch.tensor([3, 6])
    vals = ha[10, torch.arange(2), pos] * 0.5
    la, lb = a.run_with_patch(ids, 10, pos, vals), b.run_with_patch(ids, 10, pos, vals)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(la, a.logits(ids), atol=1e-2)
    torch.testing.assert_close(a.unembed(ha[-1]), a.logits(ids), rtol=1e-4, atol=1e-4)


def test_load_model_default_and_backend_choice():
    model = toolkit.load_model(backend="tl")
    assert model.name == "transformer_lens" and model.info.model_id == "smollm2-135m"
    assert toolkit.load_model("HuggingFaceTB/SmolLM2-135M-Instruct").name == "nnsight"


def test_unknown_model_lists_known_ids():
    with pytest.raises(ValueError, match=r"unknown model id 'not-a-model'.*smollm2-135m.*pythia-70m"):
        toolkit.load_model("not-a-model")


def test_hub_model_without_network_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="hub cannot be reached.*local-dir"):
        toolkit.load_model("EleutherAI/pythia-70m")


def test_local_folder_loads(tmp_path, smollm2_tokenizer):
    from toolkit.models.tiny import tiny_hf_model
    hf = tiny_hf_model("gpt_neox", vocab_size=smollm2_tokenizer.vocab_size)
    hf.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    model = toolkit.load_model(str(tmp_path))
    assert model.name == "transformer_lens" and model.info.architecture == "gpt_neox"
    ids = torch.randint(0, 500, (1, 4))
    torch.testing.assert_close(model.logits(ids), hf(ids).logits.detach())


def test_registry_covers_paper_models():
    for name in ("distilgpt2", "EleutherAI/pythia-70m", "EleutherAI/pythia-1.4b", "state-spaces/mamba-370m-hf"):
        assert find_entry(name) is not None
    assert {e.backend for e in REGISTRY if e.family in ("gpt2", "gpt_neox")} == {"transformer_lens"}
    assert find_entry("smollm2-135m").weights_available()


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        toolkit.load_model(dtype="float8")
