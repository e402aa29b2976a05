"""Component Jacobians: attention / MLP outputs and one layer's own transform, exact and checked independently."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.jacobian.compute import detached_jacobian, ordinary_jacobian
from toolkit.jacobian.freeze import detached
from toolkit.jacobian.operator import batched_jvp
from toolkit.jacobian.targets import (input_embeddings, resolve_target, run_reading, states_function, target_input)
from toolkit.models.architectures import spec_for
from toolkit.models.tiny import TINY_ARCHITECTURES, tiny_hf_model

IDS = torch.tensor([3, 17, 42, 7, 99, 5])
WITH_SUBLAYERS = [a for a in TINY_ARCHITECTURES if a != "mamba"]


def tiny(arch: str, **config) -> nn.Module:
    """3 layers, width 32, biases and norm weights perturbed (a dropped affine term shows)."""
    model = tiny_hf_model(arch, n_layers=3, width=32)
    for key, value in config.items():
        setattr(model.config, key, value)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "layernorm" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def block_call(model: nn.Module, ids: torch.Tensor, layer: int):
    """An independent ``h_l -> h_{l+1}[-1]``: block ``layer`` called directly, with the positional and
    keyword arguments the base model gave it (captured once, under the freeze)."""
    block = spec_for(model).blocks(model)[layer]
    captured = {}

    def grab(_m, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_reading(model, [block], input_ids=ids)
    finally:
        handle.remove()
    args, kwargs = captured["args"], captured["kwargs"]

    def g(h: torch.Tensor) -> torch.Tensor:
        call_args = (h[None],) + tuple(args[1:]) if args else ()
        call_kwargs = kwargs if args else {**kwargs, "hidden_states": h[None]}
        out = block(*call_args, **call_kwargs)
        return (out if isinstance(out, torch.Tensor) else out[0])[0, -1]
    return g


@pytest.mark.parametrize("arch", WITH_SUBLAYERS + ["gpt_neox_sequential"])
def test_sublayers_reconstruct_exactly_and_add_up_to_the_block(arch):
    model = tiny("gpt_neox", use_parallel_residual=False) if arch == "gpt_neox_sequential" else tiny(arch)
    r = {t: detached_jacobian(model, IDS, target=t) for t in (1, 2, "attn.1", "mlp.1")}
    for t, res in r.items():
        assert res.reconstruction_error < 1e-5, (t, res)
        assert res.jacobian.shape == (len(IDS), 32, 32)
    # h_2 = h_1 + attn_1 + mlp_1 (Gemma 3: after its post-sublayer norms), so the Jacobians add up too
    summed = r[1].jacobian + r["attn.1"].jacobian + r["mlp.1"].jacobian
    assert (summed - r[2].jacobian).abs().max() < 1e-5 * r[2].jacobian.abs().max()
    assert torch.allclose(r[1].y + r["attn.1"].y + r["mlp.1"].y, r[2].y, atol=1e-5)
    assert r["attn.1"].settings["target"] == "attn.1" and r["attn.1"].settings["input"] == "h_0"
    # the sublayer Jacobians are not trivially zero / equal to each other
    assert r["attn.1"].jacobian.abs().max() > 1e-3 and r["mlp.1"].jacobian.abs().max() > 1e-3
    # the ordinary Jacobian does not reconstruct (GPT-2 at random init is nearly linear: ~8e-4)
    assert ordinary_jacobian(model, IDS, target="mlp.1").reconstruction_error > 1e-4


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_layer_transform_matches_a_direct_block_call(arch):
    model = tiny(arch)
    r = detached_jacobian(model, IDS, target="layer.1")
    assert r.settings["input"] == "h_1" and r.reconstruction_error < 1e-5, r
    h1 = target_input(model, IDS, "layer.1")
    with torch.no_grad():
        (h1_ref,) = run_reading(model, [spec_for(model).blocks(model)[0]], input_ids=IDS)
    assert torch.equal(r.x, h1) and torch.allclose(h1, h1_ref[0])
    # independent: autograd.functional.jacobian of the block called directly, under the freeze
    with detached(model) as freeze:
        g = block_call(model, IDS, 1)
        with freeze.recording():
            y = g(h1)
        reference = torch.autograd.functional.jacobian(g, h1, vectorize=True)  # [d_out, T, d_in]
    assert torch.allclose(y, r.y, atol=1e-5)
    assert (reference.movedim(0, 1) - r.jacobian).abs().max() < 1e-5 * r.jacobian.abs().max()
    # cross-token blocks: earlier positions reach the last one through attention (Mamba: the scan;
    # sliding-window layers only from inside their window, see test_sliding_window_layers_see_only_their_window)
    assert r.jacobian[-2].abs().max() > 1e-4 * r.jacobian[-1].abs().max()


@pytest.mark.parametrize("arch, windows", [("mistral", [4, 4, 4]), ("ministral", [4, None, 4]),
                                           ("gemma2", [4, None, 4]), ("gpt_neo", [None, 4, None])])
def test_sliding_window_layers_see_only_their_window(arch, windows):
    """A sliding-window block's own transform reaches the last position from its last ``window`` positions only."""
    model = tiny(arch)
    for layer, window in enumerate(windows):
        r = detached_jacobian(model, IDS, target=f"block.{layer}")
        assert r.reconstruction_error < 1e-5, r
        reach = r.jacobian.abs().amax(dim=(1, 2))  # [T]: how much each input position moves y
        first = 0 if window is None else len(IDS) - window
        assert (reach[:first] == 0).all() and (reach[first:] > 1e-4 * reach[-1]).all(), (layer, reach)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_transform_chains_to_the_boundary_jacobian(arch):
    """d h_2[-1]/d h_0 = sum_j d h_2[-1]/d h_1[j] · d h_1[j]/d h_0 (all from the same freeze point)."""
    model = tiny(arch)
    layer = detached_jacobian(model, IDS, target="layer.1").jacobian          # [T(j), d, d]
    inner = torch.stack([detached_jacobian(model, IDS, target=1, position=j).jacobian
                         for j in range(len(IDS))])                           # [T(j), T(i), d, d]
    chained = torch.einsum("jab,jibc->iac", layer, inner)
    direct = detached_jacobian(model, IDS, target=2).jacobian
    assert (chained - direct).abs().max() < 1e-5 * direct.abs().max()


def test_forward_mode_matches_reverse_for_components():
    model = tiny("qwen3")
    for target in ("attn.2", "layer.0"):
        rev = detached_jacobian(model, IDS, target=target)
        fwd = detached_jacobian(model, IDS, target=target, mode="forward", chunk_size=50)
        assert (fwd.jacobian - rev.jacobian).abs().max() < 1e-5 * rev.jacobian.abs().max()


def test_target_spellings_and_errors():
    model = tiny("llama")
    assert resolve_target(model, ("attn", 2)).name == "attn.2"
    assert resolve_target(model, "layer.0").input_name == "h_0"
    assert resolve_target(model, 3).name == "resid.3" and resolve_target(model, "output").name == "output"
    # one vocabulary: names that read as what they are, TransformerLens hook names as aliases
    assert [resolve_target(model, t).name for t in ("resid.3", "block.1", "layer.1", "blocks.2.hook_resid_post",
                                                    "blocks.0.hook_resid_pre", "blocks.1.hook_attn_out",
                                                    "blocks.1.hook_mlp_out", "ln_final.hook_normalized")] == \
        ["resid.3", "block.1", "block.1", "resid.3", "resid.0", "attn.1", "mlp.1", "output"]
    assert resolve_target(model, "block.1").input_name == "h_1"
    for bad, match in [("attn.3", "block 3 is out of range"), ("ffn.1", "not understood"), (("mlp", "1"), "not understood"),
                       (4, "out of range"), ("attn", "not understood"), (True, "not understood")]:
        with pytest.raises(ValueError, match=match) as err:
            detached_jacobian(model, IDS, target=bad)
        assert "'attn.l'" in str(err.value)  # the message lists the valid spellings
    with pytest.raises(ValueError, match="no attention sublayer"):
        detached_jacobian(tiny("mamba"), IDS, target="attn.0")
    with pytest.raises(ValueError, match="no MLP sublayer"):
        resolve_target(tiny("mamba"), ("mlp", 1))
    with pytest.raises(ValueError, match="takes h_1 as input"):
        states_function(model, [1, "layer.1"])


def test_early_stop_does_not_run_later_blocks():
    model = tiny("llama")
    calls = []
    handle = model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        f = states_function(model, ["attn.0", 1])
        f(input_embeddings(model, IDS))
    finally:
        handle.remove()
    assert calls == []


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 on its own copy (the session fixture may be wrapped in place by a TransformerBridge)."""
    from transformers import AutoModelForCausalLM
    from toolkit.models.weights import SMOLLM2, converted_folder
    return AutoModelForCausalLM.from_pretrained(str(converted_folder(SMOLLM2)), dtype=torch.float32).eval()


def test_smollm2_middle_layer_components(smollm2, smollm2_tokenizer):
    ids = smollm2_tokenizer("Paris is the capital of", return_tensors="pt").input_ids[0][:3]
    l = 15  # of 30
    r = {t: detached_jacobian(smollm2, ids, target=t, chunk_size=192) for t in (f"attn.{l}", f"mlp.{l}", f"layer.{l}")}
    for t, res in r.items():
        assert res.reconstruction_error < 1e-5, (t, res)
        assert res.jacobian.shape == (3, 576, 576)
    # the formed Jacobians (reverse mode) agree with forward-mode JVPs, and the block adds them up
    x = input_embeddings(smollm2, ids)
    v = torch.randn(4, *x.shape)
    f = states_function(smollm2, [l, f"attn.{l}", f"mlp.{l}", l + 1])
    with detached(smollm2) as freeze:
        with freeze.recording(), torch.no_grad():
            ys = f(x)
        with freeze.replaying():
            j_l, j_attn, j_mlp, j_next = batched_jvp(f, x, v)
    for t, jv in ((f"attn.{l}", j_attn), (f"mlp.{l}", j_mlp)):
        formed = torch.einsum("toi,bti->bo", r[t].jacobian, v)
        assert (formed - jv).norm() / jv.norm() < 1e-5, t
    assert (j_l + j_attn + j_mlp - j_next).norm() / j_next.norm() < 1e-5
    assert torch.allclose(ys[1], r[f"attn.{l}"].y, atol=1e-4) and torch.allclose(ys[2], r[f"mlp.{l}"].y, atol=1e-4)
    # one layer's transform: y is h_{l+1} at the last position, the model's own value
    with torch.no_grad():
        h = smollm2.model(ids[None], output_hidden_states=True).hidden_states
    assert torch.allclose(r[f"layer.{l}"].x, h[l][0], atol=1e-4)
    assert torch.allclose(r[f"layer.{l}"].y, h[l + 1][0, -1], atol=1e-3)
