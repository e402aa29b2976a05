"""Sharded and offloaded models (accelerate ``device_map``): the same numbers as the plain load.

SmolLM2 is loaded with a ``max_memory`` that sends the upper blocks and the final norm to disk
(accelerate keeps their parameters on ``meta`` and loads them per call); a tiny Llama is placed by a
hand-written ``device_map`` that puts its embedding, second block, final norm and head on disk. Both
must give the plain model's hidden states, patched logits, KL values, collected states, Jacobians
(every target kind), matrix-free SVD and steering, through both backends.
"""
from __future__ import annotations

import pytest
import torch

from toolkit.backends import make_backend
from toolkit.jacobian.compute import detached_jacobian
from toolkit.jacobian.freeze import detached
from toolkit.jacobian.matrix_free import jacobian_svd
from toolkit.jacobian.through_backend import backend_jacobian
from toolkit.loading import load_model, placement_kwargs
from toolkit.models.placement import execution_device, is_offloaded, parameter
from toolkit.models.tiny import tiny_hf_model

BACKENDS = ["nnsight", "transformer_lens"]
TEXT = ("The bridge out of Marin is the Golden Gate. It was the longest suspension bridge in the world "
        "when it opened, and the fog rolls under it most summer mornings while ships pass below.")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----- loading ------------------------------------------------------------------------------------
def test_placement_arguments_are_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="only apply with a device_map"):
        placement_kwargs(None, {"cpu": "1GB"}, None)
    with pytest.raises(ValueError, match="offload_folder"):
        placement_kwargs({"model.layers.0": "disk"}, None, None)
    with pytest.raises(ValueError, match="unknown device_map"):
        placement_kwargs("everywhere", None, None)
    assert placement_kwargs("auto", {"cpu": "1GB"}, tmp_path) == {"device_map": "auto", "max_memory": {"cpu": "1GB"},
                                                                  "offload_folder": str(tmp_path)}


# ----- SmolLM2, part on disk -------------------------------------------------------------------------
@pytest.fixture(scope="module", params=BACKENDS)
def offloaded(request, tmp_path_factory):
    """SmolLM2 with blocks 12.. and the final norm offloaded to disk, through each backend."""
    model = load_model("smollm2-135m", backend=request.param, device_map="auto", max_memory={"cpu": "300MB"},
                       offload_folder=tmp_path_factory.mktemp("offload"))
    return model


@pytest.fixture(scope="module")
def plain(request, smollm2_nnsight, smollm2_tl, offloaded):
    return smollm2_nnsight if offloaded.name == "nnsight" else smollm2_tl


def test_offloaded_smollm2_is_really_offloaded(offloaded):
    placed = offloaded.hf_model.hf_device_map
    assert set(placed.values()) == {"cpu", "disk"} and placed["model.layers.29"] == "disk"
    assert is_offloaded(offloaded.hf_model)
    assert offloaded.hf_model.model.layers[20].mlp.down_proj.weight.device.type == "meta"
    assert offloaded.device == torch.device("cpu") and offloaded.dtype == torch.float32


def test_offloaded_hidden_states_patches_and_collection(offloaded, plain, tmp_path):
    from toolkit.collection.pairs import collect_hidden_states
    ids = plain.to_tokens(TEXT)[:, :24]
    assert _rel(offloaded.hidden_states(ids), plain.hidden_states(ids)) < 1e-6
    values = torch.randn(1, 2, plain.d_model)
    for layer in (5, 20, 30):  # a block in memory, one on disk, the final boundary (before the disk norm)
        a = offloaded.run_with_patch(ids, layer, torch.tensor([[3, 9]]), values)
        b = plain.run_with_patch(ids, layer, torch.tensor([[3, 9]]), values)
        assert _rel(a, b) < 1e-5   # float rounding: the loads may pick different attention kernels
    tokens, positions = ids.reshape(2, 12), torch.tensor([[2, 7], [4, 11]])
    got = collect_hidden_states(offloaded, tokens, positions, layers=[19], cache_dir=tmp_path, progress=False)
    want = collect_hidden_states(plain, tokens, positions, layers=[19], cache_dir=tmp_path, progress=False)
    assert got.directory == want.directory            # same fingerprint: the offloaded weights were read
    x, y = got.pairs(19)
    hs = plain.hidden_states(tokens, [19, 20])
    rows = torch.arange(2)[:, None]
    assert _rel(x, hs[0][rows, positions].reshape(-1, plain.d_model)) < 1e-5
    assert _rel(y, hs[1][rows, positions].reshape(-1, plain.d_model)) < 1e-5


def test_offloaded_kl_values(offloaded, plain):
    from toolkit.decompose.interventions import patched_kl
    ids = plain.to_tokens(TEXT)[:, :24]
    tokens, positions = ids.reshape(2, 12), torch.tensor([[3, 8], [5, 10]])
    hs = plain.hidden_states(tokens, [6, 21])
    rows = torch.arange(2)[:, None]
    gen = torch.Generator().manual_seed(0)
    values = {b: hs[i][rows, positions].reshape(4, -1) + 0.5 * torch.randn(4, plain.d_model, generator=gen)
              for i, b in enumerate((6, 21))}
    got = patched_kl(offloaded, tokens, positions, values, progress=False)
    want = patched_kl(plain, tokens, positions, values, progress=False)
    for b in values:
        assert bool((want[b] > 1e-4).all())
        assert torch.allclose(got[b], want[b], rtol=1e-4, atol=1e-7), (b, got[b], want[b])


_REFERENCE: dict = {}  # plain-model results, computed once for both backends (the same HF model underneath)


def _reference(key, compute):
    if key not in _REFERENCE:
        _REFERENCE[key] = compute()
    return _REFERENCE[key]


def test_offloaded_jacobians_and_svd(offloaded, plain):
    ids = plain.to_tokens(TEXT)[0, :3]
    # The backend's own path (nnsight trace / TransformerLens hooks) and the direct path on the HF model.
    # SmolLM2 here: the output map (through the backend) and one block's own transform on a disk block;
    # the tiny hand-placed model below covers every target kind.
    for target in ("output",):
        got = backend_jacobian(offloaded, ids, target=target)
        want = _reference(("backend", target), lambda: backend_jacobian(plain, ids, target=target))
        assert got.reconstruction_error < 1e-5
        assert _rel(got.jacobian, want.jacobian) < 1e-5, target
    for target in ("layer.20",):
        got = detached_jacobian(offloaded.hf_model, ids, target=target)
        want = _reference(("direct", target), lambda: detached_jacobian(plain.hf_model, ids, target=target))
        assert got.reconstruction_error < 1e-5, target
        assert _rel(got.jacobian, want.jacobian) < 1e-5, target
    got = jacobian_svd(offloaded.hf_model, ids, k=3, tol=1e-6)
    want = _reference("svd", lambda: jacobian_svd(plain.hf_model, ids, k=3, tol=1e-6))
    assert torch.allclose(got.singular_values, want.singular_values, rtol=1e-5)


def test_offloaded_steering(offloaded, plain):
    from toolkit.jacobian.steering import steer
    runs = [steer(m, "The bridge out of Marin is the Golden", "I am going to see the", layer=20, lam=2.0,
                  max_new_tokens=3) for m in (offloaded, plain)]
    assert runs[0].steered.token_ids == runs[1].steered.token_ids
    assert max(abs(a - b) for a, b in zip(runs[0].steered.token_logprobs, runs[1].steered.token_logprobs)) < 1e-4
    assert runs[0].steered.token_ids != runs[0].baseline.token_ids or runs[0].steered.edit_norm > 0


# ----- a tiny model placed by hand: embedding, block 1, final norm and head on disk ---------------------
TINY_MAP = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_hand_placed_on_cpu_and_disk(backend, tiny_folder, tmp_path):
    placed = load_model(str(tiny_folder), backend=backend, device_map=TINY_MAP, offload_folder=tmp_path)
    ref = load_model(str(tiny_folder), backend=backend, device="cpu")
    assert placed.hf_model.get_input_embeddings().weight.device.type == "meta"   # first parameter: on meta
    assert placed.device == torch.device("cpu")                                 # but inputs go to the CPU
    assert torch.equal(placed.W_U, ref.W_U) and torch.equal(placed.W_E, ref.W_E)
    ids = ref.to_tokens(TEXT)[:, :16]
    assert _rel(placed.hidden_states(ids), ref.hidden_states(ids)) < 1e-6
    from toolkit.decompose.interventions import patched_kl
    tokens, positions = ids.reshape(2, 8), torch.tensor([[2, 6], [3, 7]])
    values = {1: torch.randn(4, ref.d_model), 2: torch.randn(4, ref.d_model)}
    got, want = (patched_kl(m, tokens, positions, values, progress=False) for m in (placed, ref))
    for b in values:
        assert torch.allclose(got[b], want[b], rtol=1e-5, atol=1e-8)
    for target in ("output", 2):
        got, want = backend_jacobian(placed, ids[0, :6], target=target), backend_jacobian(ref, ids[0, :6], target=target)
        assert _rel(got.jacobian, want.jacobian) < 1e-6 and got.reconstruction_error < 1e-5
    for target in ("attn.1", "mlp.1", "layer.1"):
        got = detached_jacobian(placed.hf_model, ids[0, :6], target=target)
        want = detached_jacobian(ref.hf_model, ids[0, :6], target=target)
        assert _rel(got.jacobian, want.jacobian) < 1e-6 and got.reconstruction_error < 1e-5
    got, want = (jacobian_svd(m.hf_model, ids[0, :6], target="layer.1", position=None, k=2) for m in (placed, ref))
    assert torch.allclose(got.singular_values, want.singular_values, rtol=1e-4)


def test_freeze_keeps_accelerates_device_hook(tmp_path):
    """Without nnsight, the freeze swaps the forward *inside* accelerate's AlignDevicesHook wrapper:
    the wrapper still loads the offloaded weights, and leaving restores everything."""
    from accelerate import dispatch_model
    fresh = dispatch_model(tiny_hf_model("llama"), device_map=TINY_MAP, offload_dir=str(tmp_path))  # no nnsight
    norm = fresh.model.layers[1].input_layernorm
    wrapper, inner = norm.forward, norm._old_forward
    assert norm.weight.device.type == "meta" and execution_device(norm) == torch.device("cpu")
    with detached(fresh):
        assert norm.forward is wrapper and norm._old_forward is not inner
        out = fresh(torch.tensor([[1, 2, 3]])).logits
    assert norm.forward is wrapper and norm._old_forward == inner
    ref = tiny_hf_model("llama")  # same seed: same weights, in memory
    assert torch.allclose(out, ref(torch.tensor([[1, 2, 3]])).logits, atol=1e-5)
    got = detached_jacobian(fresh, torch.tensor([1, 2, 3, 4]))
    want = detached_jacobian(ref, torch.tensor([1, 2, 3, 4]))
    assert got.reconstruction_error < 1e-5 and _rel(got.jacobian, want.jacobian) < 1e-6
    assert torch.equal(parameter(norm), ref.model.layers[1].input_layernorm.weight)


def test_a_max_memory_that_holds_no_module_is_refused(tiny_folder, tmp_path):
    # accelerate's "auto" map then sends everything to disk ({"": "disk"}) and writes no offload
    # index: the first forward failed with KeyError 'model.embed_tokens.weight' (Gemma-3-270m at half its weights)
    with pytest.raises(ValueError, match="whole model was placed on disk"):
        load_model(str(tiny_folder), backend="nnsight", device_map="auto", max_memory={"cpu": 1000},
                   offload_folder=tmp_path)
