"""Shared fixtures. Real-model fixtures are session-scoped: SmolLM2 loads once per run."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer
    from toolkit.models.weights import SMOLLM2, converted_folder
    return AutoTokenizer.from_pretrained(str(converted_folder(SMOLLM2)))


@pytest.fixture(scope="session")
def smollm2_hf():
    """The real SmolLM2-135M-Instruct as a plain HF model, float32, eval mode."""
    from transformers import AutoModelForCausalLM
    from toolkit.models.weights import SMOLLM2, converted_folder
    return AutoModelForCausalLM.from_pretrained(str(converted_folder(SMOLLM2)), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_nnsight(smollm2_hf, smollm2_tokenizer):
    from toolkit.backends import make_backend
    return make_backend(smollm2_hf, smollm2_tokenizer, backend="nnsight", model_id="smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tl(smollm2_hf, smollm2_tokenizer):
    from toolkit.backends import make_backend
    return make_backend(smollm2_hf, smollm2_tokenizer, backend="transformer_lens", model_id="smollm2-135m")
