"""Long prompts (issue 15): the dense Jacobian's cost is estimated before any work, refused with the
alternative when it would not fit, shown with a progress bar, and the CLI takes the matrix-free route."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.modules.module as torch_module

from toolkit.backends import make_backend
from toolkit.jacobian.all_layers import all_layer_jacobians
from toolkit.jacobian.budget import GIB, JacobianTooLargeError, check_fits, estimate_jacobian, longest_prompt
from toolkit.jacobian.compute import detached_jacobian
from toolkit.jacobian.long_prompt import choose_route
from toolkit.models.tiny import tiny_hf_model

IDS = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])


def test_estimate_scales_with_tokens_dtype_chunk_and_targets():
    model = tiny_hf_model("llama")  # d = 64
    e1, e2 = estimate_jacobian(model, 100), estimate_jacobian(model, 200)
    assert e1.jacobian_bytes == 100 * 64 * 64 * 4 and e2.jacobian_bytes == 2 * e1.jacobian_bytes
    assert e2.chunk_bytes == 2 * e1.chunk_bytes
    assert 2 * e1.graph_bytes < e2.graph_bytes < 4 * e1.graph_bytes  # linear activations + quadratic patterns
    assert e2.flops > 2 * e1.flops and e2.seconds > e1.seconds
    half = estimate_jacobian(model, 100, dtype=torch.bfloat16)
    assert 2 * half.peak_bytes == e1.peak_bytes
    chunks = [estimate_jacobian(model, 100, chunk_size=c).chunk_bytes for c in (8, 32)]
    assert 4 * chunks[0] == chunks[1]
    assert estimate_jacobian(model, 100, n_targets=3).jacobian_bytes == 3 * e1.jacobian_bytes
    with pytest.raises(ValueError, match="n_tokens"):
        estimate_jacobian(model, 0)


def test_smollm2_long_prompt_estimate_matches_the_reported_blowup(smollm2_hf):
    # The case: 1,500 tokens passed 8 GB. The estimate says so before running anything.
    est = estimate_jacobian(smollm2_hf, 1500)
    assert est.jacobian_bytes == 1500 * 576 * 576 * 4
    assert est.peak_bytes > 8 * GIB
    with pytest.raises(JacobianTooLargeError, match=r"at most \d+ tokens fit") as err:
        check_fits(smollm2_hf, 1500, memory_budget=8 * GIB)
    longest = int(str(err.value).split("at most ")[1].split()[0])
    assert 100 < longest < 1500
    peaks = [estimate_jacobian(smollm2_hf, n).peak_bytes for n in (longest, longest + 1)]
    assert peaks[0] <= 8 * GIB < peaks[1]


def test_too_large_is_refused_before_any_work_naming_estimate_and_alternative(smollm2_tokenizer):
    model = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size)
    budget = estimate_jacobian(model, len(IDS)).peak_bytes - 1  # just too small
    calls = []
    counter = torch_module.register_module_forward_pre_hook(lambda m, args: calls.append(type(m).__name__))
    try:
        for compute in (lambda: detached_jacobian(model, IDS, memory_budget=budget),
                        lambda: detached_jacobian(model, IDS, target="layer.1", memory_budget=budget),
                        lambda: all_layer_jacobians(model, IDS, memory_budget=budget)):
            with pytest.raises(JacobianTooLargeError) as err:
                compute()
            message = str(err.value)
            assert "GiB peak" in message and "jacobian_svd" in message and "--matrix-free" in message
            assert "shorter prompt" in message
    finally:
        counter.remove()
    assert calls == []  # not one module ran
    nn_model = make_backend(model, smollm2_tokenizer, backend="nnsight")
    with pytest.raises(JacobianTooLargeError, match="matrix-free"):
        detached_jacobian(nn_model, IDS, memory_budget=budget)
    assert detached_jacobian(model, IDS, memory_budget=budget + 1).reconstruction_error < 1e-5  # fits: runs


def test_longest_prompt_is_the_boundary():
    model = tiny_hf_model("gpt2")
    T = longest_prompt(model, 50 * 2**20)
    assert check_fits(model, T, memory_budget=50 * 2**20).fits
    with pytest.raises(JacobianTooLargeError):
        check_fits(model, T + 1, memory_budget=50 * 2**20)


def test_progress_bar_over_row_chunks(capsys):
    model = tiny_hf_model("llama")
    detached_jacobian(model, IDS, chunk_size=16, progress=True)
    err = capsys.readouterr().err
    assert "Jacobian rows" in err and "/64 [" in err  # rows done / d_out, on stderr
    detached_jacobian(model, IDS, chunk_size=16, progress=False)
    detached_jacobian(model, IDS, chunk_size=16)  # default: only when the estimate exceeds a few seconds
    assert "Jacobian rows" not in capsys.readouterr().err


def test_route_choice_and_cli_matrix_free(tmp_path, smollm2_tokenizer, capsys):
    import argparse

    from toolkit.cli.jacobian import add_parser as add_jacobian_parser
    from toolkit.jacobian.run import run_jacobian

    model = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size)
    assert choose_route(model, 8, memory_budget=GIB).route == "full"
    long = choose_route(model, 8, memory_budget=estimate_jacobian(model, 8).peak_bytes - 1)
    assert long.route == "matrix-free" and "would not fit" in long.reason
    assert choose_route(model, 8, route="full", memory_budget=1).route == "full"
    with pytest.raises(ValueError, match="route must be"):
        choose_route(model, 8, route="dense")

    parser = argparse.ArgumentParser()
    add_jacobian_parser(parser.add_subparsers())
    assert parser.parse_args(["jacobian"]).route == "auto"
    assert parser.parse_args(["jacobian", "--matrix-free"]).route == "matrix-free"
    assert parser.parse_args(["jacobian", "--full"]).route == "full"
    with pytest.raises(SystemExit):
        parser.parse_args(["jacobian", "--full", "--matrix-free"])

    backend = make_backend(model, smollm2_tokenizer, backend="nnsight")
    summary = run_jacobian(backend, "The bridge out of Marin is the", n_vectors=2, out=tmp_path, route="matrix-free")
    assert "matrix-free route" in capsys.readouterr().err
    saved = json.loads((tmp_path / "jacobian.json").read_text())
    assert saved["route"] == "matrix-free" == summary["route"]
    assert len(saved["singular_values"]) == 2 and saved["estimate"]["n_tokens"] == saved["n_tokens"]
    assert saved["vectors"][0]["top_positions"] and saved["warnings"] == []
