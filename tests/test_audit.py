"""The freeze audit: coverage of every module, one message for every uncovered class, checks that can fail."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.cli import main
from toolkit.jacobian.audit import FreezeAudit, check_freeze
from toolkit.jacobian.freeze import UnsupportedModuleError
from toolkit.jacobian.freeze_rules import ACTIVATION_GATES, RULES, install_activation, register_rule
from toolkit.models.tiny import TINY_ARCHITECTURES, tiny_hf_model

CHECKS = ["forward unchanged", "reconstruction output", "reconstruction resid.1", "affine at x'",
          "invariance at x'", "restored"]


class Swish2(nn.Module):
    """A user's activation the tables do not know: x * sigmoid(2x)."""

    def forward(self, x):
        return x * torch.sigmoid(2 * x)


class Wobble(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.sin(x)


@pytest.fixture
def custom_rules():
    """Register rules in a test and leave the global tables as they were."""
    before_rules, before_gates = dict(RULES), dict(ACTIVATION_GATES)
    yield
    RULES.clear(); RULES.update(before_rules)
    ACTIVATION_GATES.clear(); ACTIVATION_GATES.update(before_gates)


def with_act(act_of_block) -> nn.Module:
    model = tiny_hf_model("gpt2", n_layers=2)
    for i, block in enumerate(model.transformer.h):
        block.mlp.act = act_of_block(i)
    return model


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_audit_passes_on_every_tiny_architecture(arch):
    audit = check_freeze(tiny_hf_model(arch))
    assert audit.passed, str(audit)
    assert [c.name for c in audit.checks] == CHECKS
    model = tiny_hf_model(arch)
    assert [m.path for m in audit.modules] == [p for p, _ in model.named_modules()]  # every module, in order
    frame = audit.to_frame()
    assert frame["passed"].all() and list(frame["check"]) == CHECKS
    assert len(audit.to_frame("modules")) == len(audit.modules)


def test_audit_on_smollm2(smollm2_nnsight):
    audit = check_freeze(smollm2_nnsight)
    assert audit.passed, str(audit)
    assert len(audit.prompt_ids) == 7 and audit.dtype == "float32"
    assert audit.kind_of("model.layers.0.mlp") == "gated_mlp" and audit.kind_of("model.norm") == "norm"
    assert audit.kind_of("model.layers.3.self_attn") == "attention"
    recon = {c.name: c.value for c in audit.checks}
    assert recon["reconstruction output"] < 1e-5 and recon["reconstruction resid.15"] < 1e-5
    text = str(audit)
    assert text.startswith("Freeze audit of LlamaForCausalLM (float32, probe of 7 tokens): PASS")
    for cls in ("LlamaRMSNorm", "LlamaMLP", "LlamaAttention", "SiLUActivation", "pass  restored"):
        assert cls in text


def test_every_uncovered_class_in_one_message():
    model = with_act(lambda i: Swish2() if i == 0 else Wobble())
    model.transformer.h[1].attn.resid_dropout = nn.Mish()
    with pytest.raises(UnsupportedModuleError) as err:
        check_freeze(model)
    message = str(err.value)
    for name, path in (("Swish2", "transformer.h.0.mlp.act"), ("Wobble", "transformer.h.1.mlp.act"),
                       ("Mish", "transformer.h.1.attn.resid_dropout")):
        assert name in message and path in message, message
    assert "register_rule" in message  # and the fix
    assert not any("forward" in vars(m) for m in model.modules())  # refused before patching anything


def test_register_rule_makes_the_audit_pass(custom_rules):
    model = with_act(lambda i: Swish2())
    with pytest.raises(UnsupportedModuleError, match="Swish2"):
        check_freeze(model)
    ACTIVATION_GATES[Swish2] = lambda m: (lambda x: torch.sigmoid(2 * x))
    register_rule(Swish2, "activation", install_activation, "x * [sigmoid(2x)]")
    audit = check_freeze(model)
    assert audit.passed, str(audit)
    assert audit.kind_of("transformer.h.0.mlp.act") == "activation"
    assert "Swish2" in str(audit) and "x * [sigmoid(2x)]" in str(audit)


def test_a_wrong_rule_fails_the_audit(custom_rules):
    """Declaring a nonlinear activation linear breaks exactness; a wrong gate changes the forward values."""
    model = with_act(lambda i: Swish2())
    register_rule(Swish2, "linear", None, "wrongly declared linear")
    audit = check_freeze(model)
    failed = {c.name for c in audit.checks if not c.passed}
    assert not audit.passed and "reconstruction output" in failed and "forward unchanged" not in failed
    assert "FAIL  reconstruction output" in str(audit) and ": FAIL" in str(audit).splitlines()[0]

    ACTIVATION_GATES[Swish2] = lambda m: torch.sigmoid  # SiLU's gate, not this activation's
    register_rule(Swish2, "activation", install_activation, "wrong gate")
    failed = {c.name for c in check_freeze(model).checks if not c.passed}
    assert "forward unchanged" in failed


def test_bad_audit_input():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        check_freeze(tiny_hf_model("llama"), prompt="text without a tokenizer")
    with pytest.raises(ValueError, match="at least 2 token ids"):
        check_freeze(tiny_hf_model("llama"), prompt=[10_000, 3])
    model = tiny_hf_model("llama").train()
    with pytest.raises(ValueError, match="training mode"):
        check_freeze(model)


def test_cli_check_freeze(capsys):
    assert main(["check-freeze", "smollm2-135m", "--device", "cpu", "--prompt", "Hello there"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out.splitlines()[0] and "pass  reconstruction output" in out
