"""benchmarks.scaling's offload budget: about half the blocks on disk, also where the embedding is most of the model."""
from __future__ import annotations

import pytest

from benchmarks.scaling import offload_budget
from toolkit.loading import load_model
from toolkit.models.tiny import tiny_hf_model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_offload_budget_puts_half_the_blocks_on_disk(arch, tmp_path):
    # an embedding-heavy tiny model (like Gemma-3-270m: 262k x 640 is 63% of its weights)
    hf = tiny_hf_model(arch, vocab_size=40000, n_layers=8, width=128)
    hf.save_pretrained(tmp_path / "model")
    from transformers import AutoTokenizer
    from toolkit.models.weights import SMOLLM2, converted_folder
    AutoTokenizer.from_pretrained(str(converted_folder(SMOLLM2))).save_pretrained(tmp_path / "model")
    sizes = {n: p.numel() * p.element_size() for n, p in hf.named_parameters()}
    blocks = sum(v for k, v in sizes.items() if ".layers." in k)
    assert sum(sizes.values()) - blocks > sum(sizes.values()) / 2   # half of all weights would not hold the rest
    budget = offload_budget(hf)
    assert offload_budget(hf) < sum(sizes.values())
    model = load_model(str(tmp_path / "model"), backend="nnsight", device_map="auto",
                       max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    placed = model.hf_model.hf_device_map
    on_disk = sum(v == "disk" for k, v in placed.items() if ".layers." in k)
    assert placed.get("") != "disk" and 2 <= on_disk <= 6, placed
    assert model.hf_model.get_input_embeddings().weight.device.type == "cpu"
