"""benchmarks.marin's row on tiny random models: exact reconstruction, and c's share where there are biases."""
from __future__ import annotations

import pytest
import torch

from benchmarks.marin import measure
from toolkit.backends import make_backend
from toolkit.models.tiny import tiny_hf_model


@pytest.mark.parametrize("arch, affine", [("llama", False), ("qwen2", True)])
def test_marin_row(arch, affine, smollm2_tokenizer):
    model = make_backend(tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size), smollm2_tokenizer,
                         backend="nnsight")
    row = measure(model, arch)
    assert (row["dtype"], row["d_model"], row["tokens"]) == ("float32", 64, 7)
    assert row["rec err"] < 1e-5
    # Qwen 2's q/k/v biases make the map affine: c is a part of y and the sum without it is off
    # by about c's share; without biases c is zero and the two errors agree.
    if affine:
        assert row["|c|/|y|"] > 1e-2 and row["rec err w/o c"] > 1e-2
    else:
        assert row["|c|/|y|"] == 0 and row["rec err w/o c"] < 1e-5
    assert 1 <= row["stable rank"] <= 64
    assert len(row["u1 tokens"]) == 5 and isinstance(row["Paris top-5"], bool)
