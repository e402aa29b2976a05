"""Steering with the detached Jacobian (eq. 16): logic on tiny models, both backends, SmolLM2, the CLI."""
from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch

from toolkit.backends import make_backend
from toolkit.jacobian.compute import detached_jacobian, input_embeddings
from toolkit.jacobian.steer_command import add_steer_parser, format_summary, parse_floats, parse_ints
from toolkit.jacobian.steering import ConceptOperator, steer, steering_sweep
from toolkit.jacobian.steering_result import SteeringResult, SteeringRun
from toolkit.models.tiny import tiny_hf_model
from toolkit.plots.jacobian import steering_comparison

CONCEPT = "The bridge out of Marin is the Golden"
PROMPT = "I'm going to Arizona to see the"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these are many small forward passes, and on a shared 2-core machine a
    second spinning thread costs ~10x the CPU time of the work itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    """A 3-layer random Llama with SmolLM2's vocabulary, through nnsight, plus an untouched copy."""
    hf = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size, n_layers=3)
    return make_backend(hf, smollm2_tokenizer, backend="nnsight"), copy.deepcopy(hf)


def test_zero_lam_is_plain_greedy_and_cache_equals_recompute(tiny, smollm2_tokenizer):
    model, reference = tiny
    kw = dict(max_new_tokens=6, concept_tokens=[" Golden", " Gate"])
    cached = steering_sweep(model, "Golden Gate", "I like the", [1, 3], [0.0, 8.0], **kw)
    full = steering_sweep(model, "Golden Gate", "I like the", [1, 3], [0.0, 8.0], use_cache=False, **kw)
    ids = torch.tensor([smollm2_tokenizer("I like the").input_ids])
    greedy = reference.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert cached.baseline.token_ids == greedy[0, ids.shape[1]:].tolist()
    for layer in (1, 3):
        zero = cached.run(layer, 0.0)
        assert zero.token_ids == cached.baseline.token_ids and zero.edit_norm == 0.0
        assert flat(zero.tracked_logprobs) == pytest.approx(flat(cached.baseline.tracked_logprobs), abs=1e-5)
    # the cached prefill + per-token edits are exactly the paper's loop (whole sequence edited every step)
    for a, b in zip([cached.baseline, *cached.runs], [full.baseline, *full.runs]):
        assert a.token_ids == b.token_ids and (a.layer, a.lam) == (b.layer, b.lam)
        assert flat(a.tracked_logprobs) == pytest.approx(flat(b.tracked_logprobs), abs=1e-4)
        assert a.edit_norm == pytest.approx(b.edit_norm, rel=1e-5)
    strong = cached.run(3, 8.0)
    assert strong.token_ids != cached.baseline.token_ids and strong.edit_ratio > 0.1  # the edit does act
    assert len(strong.token_ids) == len(strong.tracked_logprobs) == 6 and len(strong.tracked_logprobs[0]) == 2
    assert cached.settings["use_cache"] and not full.settings["use_cache"]
    assert cached.tracked_tokens == [" Golden", " Gate"] and strong.text == smollm2_tokenizer.decode(strong.token_ids)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_operator_is_the_detached_jacobian(arch, smollm2_tokenizer):
    """Replayed J X equals the explicit detached Jacobian's blocks, for each operator (GPT-2: biases, positions)."""
    hf = tiny_hf_model(arch, vocab_size=smollm2_tokenizer.vocab_size, n_layers=2)
    model = make_backend(hf, smollm2_tokenizer, backend="nnsight")
    concept, new = torch.tensor([11, 12, 13, 14]), torch.tensor([21, 22, 23, 24, 25, 26])
    J = detached_jacobian(hf, concept, target=2).jacobian  # [N, d, d]
    x = input_embeddings(hf, new)
    N, T = len(concept), len(new)
    want = {"sum": x @ J.sum(0).T, "last": x @ J[-1].T,
            "window": torch.stack([sum(J[N - 1 - k] @ x[t - k] for k in range(min(N - 1, t) + 1)) for t in range(T)])}
    for operator, expected in want.items():
        op = ConceptOperator(model, concept, layer=2, operator=operator)
        assert op.replay_error < 1e-5
        assert rel(op.apply(x, range(T)), expected) < 1e-5, operator
    with pytest.raises(ValueError, match="concept position 4"):
        ConceptOperator(model, concept, layer=2, position=4)


def test_backends_give_the_same_continuation(smollm2_tokenizer):
    hf = tiny_hf_model("llama", vocab_size=smollm2_tokenizer.vocab_size, n_layers=3, seed=1)
    args = ("Golden Gate Bridge", "Here is a painting of the", [2], [0.0, 6.0])
    via_nn = steering_sweep(make_backend(hf, smollm2_tokenizer, backend="nnsight"), *args, max_new_tokens=5)
    via_tl = steering_sweep(make_backend(hf, smollm2_tokenizer, backend="tl"), *args, max_new_tokens=5)
    assert (via_nn.settings["backend"], via_tl.settings["backend"]) == ("nnsight", "transformer_lens")
    assert via_tl.run(2, 6.0).token_ids != via_tl.baseline.token_ids
    for a, b in zip([via_nn.baseline, *via_nn.runs], [via_tl.baseline, *via_tl.runs]):
        assert a.token_ids == b.token_ids
        assert flat(a.tracked_logprobs) == pytest.approx(flat(b.tracked_logprobs), abs=1e-4)


def test_clear_errors(tiny):
    model, _ = tiny
    ok = dict(concept_prompt="Golden Gate", prompt="I like the", layer=1, lam=1.0, max_new_tokens=2)
    for layer in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="not a boundary 1..3"):
            steer(model, **{**ok, "layer": layer})
    for lam in (math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="lam must be a finite number"):
            steer(model, **{**ok, "lam": lam})
    for key in ("prompt", "concept_prompt"):
        with pytest.raises(ValueError, match=f"{key} is empty"):
            steer(model, **{**ok, key: "  "})
    with pytest.raises(ValueError, match="longer than the context"):
        steer(model, **{**ok, "prompt": torch.arange(250), "max_new_tokens": 10})  # tiny n_ctx = 256
    with pytest.raises(ValueError, match="max_new_tokens"):
        steer(model, **{**ok, "max_new_tokens": 0})
    with pytest.raises(ValueError, match="unknown operator"):
        steer(model, **ok, operator="diag")
    with pytest.raises(ValueError, match="steering_sweep"):
        steer(model, **{**ok, "layer": [1, 2]})


def test_result_roundtrip_and_figure(tmp_path):
    base = SteeringRun(None, 0.0, [1, 2], " a<b>\n", [" a", "<b>\n"], [[-3.0], [-2.0]], [-0.1, -0.2])
    runs = [SteeringRun(l, lam, [3, 4], " Gate&", [" Gate", "&"], [[-3.0 + lam], [-1.0]], [-0.3, -0.4],
                        hits=1, edit_norm=lam, edit_ratio=lam / 10) for l in (20, 25) for lam in (0.5, 1.0)]
    result = SteeringResult("<concept>", "prompt", [7], [8], [3], [" Gate"], base, runs, {"operator": "sum"})
    path = result.save(tmp_path / "steering.json")
    loaded = SteeringResult.load(path)
    assert loaded.to_dict() == result.to_dict() and loaded.run(25, 1.0).edit_ratio == 0.1
    assert result.delta_concept_logprob(result.run(20, 1.0)) == pytest.approx(1.0)
    assert result.layers == [20, 25] and result.lams == [0.5, 1.0] and result.rows()[0]["layer"] == "-"
    with pytest.raises(KeyError, match="no run at layer 30"):
        result.run(30, 1.0)
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="not a saved SteeringResult"):
        SteeringResult.load(tmp_path / "other.json")
    fig = steering_comparison(result)
    table, heat = fig.data
    assert (table.type, heat.type) == ("table", "heatmap") and heat.z.shape == (2, 2)
    assert heat.z[1][1] == pytest.approx(1.0) and heat.zmid == 0
    cells = json.dumps(fig.to_plotly_json(), ensure_ascii=False)
    assert "a&lt;b&gt;⏎" in cells and "Gate&amp;" in cells and "<b>" not in cells  # tokens escaped, never markup
    assert "&lt;b&gt;" in heat.customdata[0][0] and "&lt;concept&gt;" in fig.layout.title.text


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    """SmolLM2 through nnsight on its own copy of the weights (the session's may be wrapped by a bridge)."""
    from transformers import AutoModelForCausalLM
    from toolkit.models.weights import SMOLLM2, converted_folder
    hf = AutoModelForCausalLM.from_pretrained(str(converted_folder(SMOLLM2)), dtype=torch.float32).eval()
    return make_backend(hf, smollm2_tokenizer, backend="nnsight", model_id="smollm2-135m")


def test_smollm2_steering_raises_the_concept(smollm2):
    """The concept prompt predicts ' Gate'; its layer-25 operator raises ' Gate' in an unrelated prompt,
    monotonically in λ, and changes the greedy continuation."""
    r = steering_sweep(smollm2, CONCEPT, PROMPT, [25], [0.5, 1.0], max_new_tokens=3)
    assert r.tracked_tokens[-1] == " Gate"  # the concept's own next token, tracked by default
    assert all(err < 1e-4 for err in r.settings["operator_replay_error"].values())
    gate = [run.tracked_logprobs[0][-1] for run in (r.baseline, r.run(25, 0.5), r.run(25, 1.0))]
    assert gate[0] < gate[1] < gate[2] and gate[2] - gate[0] > 1.0, gate  # log p(' Gate') at the first step
    assert r.delta_concept_logprob(r.run(25, 1.0)) > 0.3  # all concept tokens together
    assert r.run(25, 1.0).token_ids != r.baseline.token_ids
    assert 0.1 < r.run(25, 1.0).edit_ratio < 2.0  # λ=1 is a moderate edit of the residual stream


def test_steer_command_end_to_end(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_steer_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["steer", "--concept", "The Golden", "--prompt", "Hi there", "--layer", "25",
                              "--lam", "0", "1.5", "--max-new-tokens", "2", "--out", str(tmp_path)])
    assert (args.model, parse_ints(args.layer), parse_floats(args.lam)) == ("smollm2-135m", [25], [0.0, 1.5])
    assert args.func(args) == 0  # toolkit.load_model, baseline, operator, two runs, files, summary
    result = SteeringResult.load(tmp_path / "steering")
    assert result.settings["model_id"] == "smollm2-135m" and result.settings["operator"] == "sum"
    assert [(r.layer, r.lam) for r in result.runs] == [(25, 0.0), (25, 1.5)]
    assert result.run(25, 0.0).token_ids == result.baseline.token_ids and len(result.baseline.token_ids) == 2
    html = (tmp_path / "report.html").read_text()
    assert "<script src=" not in html and html.count("plotly-graph-div") >= 1 and "Hi there" in html
    printed = capsys.readouterr().out
    assert "unsteered" in printed and format_summary(result).splitlines()[0] in printed
    with pytest.raises(ValueError, match="--lam must be numbers"):
        parse_floats(["1", "big"])
    with pytest.raises(ValueError, match="--layer must be"):
        parse_ints("middle")
