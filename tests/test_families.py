"""The family status table: looked up from the rule table, TransformerLens and the registry, and printed by the CLI."""
from __future__ import annotations

from transformers.models.phi3 import modeling_phi3

from toolkit.cli import main
from toolkit.jacobian.freeze_rules import RULES
from toolkit.families import family_status, format_family_table

REQUIRED = ("mistral", "ministral", "ministral3", "phi3", "olmo2", "gemma2")  # issue 12


def test_every_required_family_is_covered_and_tested():
    rows = {r.family: r for r in family_status()}
    for family in REQUIRED + ("llama", "qwen3", "gemma3", "gpt2", "gpt_neox", "mamba", "smollm3", "gptj", "gpt_neo", "gemma"):
        assert rows[family].served and rows[family].freeze_rules and rows[family].tiny_tested, rows[family]
    assert rows["gemma2"].hf_class == "Gemma2ForCausalLM" and rows["gemma2"].model_types == ("gemma2",)
    # TransformerLens' bridge has no Ministral (v1) adapter; it has one for the others
    assert rows["ministral"].tl_bridge is False
    assert all(rows[f].tl_bridge for f in REQUIRED if f != "ministral")
    assert "smollm2-135m" in rows["llama"].real_weights
    # known, not served: listed with the reason
    assert not rows["mamba2"].served and not rows["mamba2"].freeze_rules and "Mamba2Mixer" in rows["mamba2"].note


def test_freeze_rules_status_is_looked_up(monkeypatch):
    monkeypatch.delitem(RULES, modeling_phi3.Phi3MLP)  # a family whose MLP had no rule would show "no"
    rows = {r.family: r for r in family_status(check_tl=False)}
    assert rows["phi3"].freeze_rules is False and rows["olmo2"].freeze_rules is True
    assert rows["phi3"].tl_bridge is None  # not checked


def test_models_command_prints_the_family_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.split("families:")[1]
    line = next(l for l in out.splitlines() if l.startswith("ministral "))
    assert line.split()[2:6] == ["MinistralForCausalLM", "yes", "no", "yes"]
    for family in REQUIRED:
        assert any(l.startswith(family + " ") for l in out.splitlines()), family
    assert format_family_table(family_status(check_tl=False)).count("\n") == len(family_status(check_tl=False))
