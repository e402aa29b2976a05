"""Every model family the toolkit knows, with its status: freeze rules, TransformerLens bridge, tests, weights.

One row per :data:`toolkit.models.architectures.SPECS` entry (the families the toolkit serves),
plus the families it knows of but does not serve yet (:data:`NOT_YET`). Each status is looked
up, not declared:

- ``freeze_rules``: every module of the family's tiny random model (:mod:`toolkit.models.tiny`)
  has a rule in :mod:`toolkit.jacobian.freeze_rules` (for a family without a tiny model, its
  CausalLM class has one);
- ``tl_bridge``: the installed TransformerLens has a ``TransformerBridge`` adapter for the
  family's transformers class (otherwise only the nnsight backend serves it);
- ``tiny_tested``: the family is in :data:`toolkit.models.tiny.TINY_ARCHITECTURES`, over which
  the freeze, reconstruction, invariance, backend and decomposition tests are parametrised;
- ``real_weights``: registry entries of the family whose weights are on this machine.

Example:
    >>> rows = {r.family: r for r in family_status(check_tl=False)}
    >>> rows["phi3"].hf_class, rows["phi3"].freeze_rules, rows["phi3"].tiny_tested
    ('Phi3ForCausalLM', True, True)
    >>> rows["mamba2"].freeze_rules
    False
"""
from __future__ import annotations

from dataclasses import dataclass

from toolkit.backends.transformer_lens_backend import tl_bridge_supports

# Families of the Golden paper's model list / issue 12 that the toolkit does not serve yet: model_type -> why.
NOT_YET: dict[str, str] = {
    "mamba2": "no freeze rule for Mamba2Mixer (chunked SSD scan, gated RMSNorm)",
    "llama4_text": "no freeze rule for the MoE router and chunked attention",
    "gemma4_text": "no freeze rules for its per-layer inputs and MoE blocks",
}


@dataclass(frozen=True)
class FamilyStatus:
    """One row of :func:`family_status`."""

    family: str                     # the toolkit's name (ArchitectureSpec.family), or the model_type if not served
    model_types: tuple[str, ...]    # HF config.model_type values
    hf_class: str                   # the transformers CausalLM class
    served: bool                    # the backends know where its blocks and norms are
    freeze_rules: bool              # the detached Jacobian can freeze it
    tl_bridge: bool | None          # TransformerBridge has an adapter (None: not checked)
    tiny_tested: bool               # tests run on its tiny random model
    real_weights: tuple[str, ...]   # registry names whose weights are here
    note: str = ""


def hf_causal_lm_class(model_type: str) -> str:
    """The transformers CausalLM class name for a ``config.model_type`` (``""`` if transformers has none).

    Example:
        >>> hf_causal_lm_class("olmo2")
        'Olmo2ForCausalLM'
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")


def family_hf_class(family: str) -> str:
    """The transformers CausalLM class of one of the toolkit's families (its spec's first model type).

    Example:
        >>> family_hf_class("gemma3")
        'Gemma3ForCausalLM'
    """
    from toolkit.models.architectures import SPECS
    spec = next((s for s in SPECS if s.family == family), None)
    if spec is None:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(s.family for s in SPECS)}.")
    return hf_causal_lm_class(spec.model_types[0])


def _freeze_rules_cover(family: str, hf_class: str) -> bool:
    from toolkit.jacobian.freeze import UnsupportedModuleError, check_supported
    from toolkit.jacobian.freeze_rules import RULES
    from toolkit.models.tiny import TINY_ARCHITECTURES, tiny_hf_model
    if family not in TINY_ARCHITECTURES:
        return any(cls.__name__ == hf_class for cls in RULES)
    try:
        check_supported(tiny_hf_model(family, vocab_size=64, width=32))
        return True
    except UnsupportedModuleError:
        return False


def family_status(check_tl: bool = True) -> list[FamilyStatus]:
    """Status rows of every family, served ones first (``check_tl=False`` skips importing TransformerLens).

    Example:
        >>> [r.family for r in family_status(check_tl=False)][:3]
        ['llama', 'qwen3', 'qwen2']
    """
    from toolkit.models.architectures import SPECS
    from toolkit.models.registry import REGISTRY
    from toolkit.models.tiny import TINY_ARCHITECTURES

    rows = []
    for spec in SPECS:
        hf_class = family_hf_class(spec.family)
        weights = tuple(e.name for e in REGISTRY if e.family == spec.family and e.weights_available())
        rows.append(FamilyStatus(spec.family, spec.model_types, hf_class, True,
                                 _freeze_rules_cover(spec.family, hf_class),
                                 tl_bridge_supports(hf_class) if check_tl else None,
                                 spec.family in TINY_ARCHITECTURES, weights))
    for model_type, why in NOT_YET.items():
        hf_class = hf_causal_lm_class(model_type)
        rows.append(FamilyStatus(model_type, (model_type,), hf_class, False, False,
                                 tl_bridge_supports(hf_class) if check_tl else None, False, (), why))
    return rows


def format_family_table(rows: list[FamilyStatus]) -> str:
    """The rows as an aligned text table (what ``python -m toolkit models`` prints under the models).

    Example:
        >>> format_family_table(family_status(check_tl=False)).splitlines()[0].split()[:3]
        ['family', 'model', 'types']
    """
    def yes(flag: bool | None) -> str:
        return "?" if flag is None else ("yes" if flag else "no")

    header = ("family", "model types", "transformers class", "freeze rules", "TL bridge", "tiny tested",
              "weights here", "note")
    table = [(r.family, ",".join(r.model_types), r.hf_class, yes(r.freeze_rules), yes(r.tl_bridge),
              yes(r.tiny_tested), ",".join(r.real_weights) or "-", r.note) for r in rows]
    widths = [max(len(row[i]) for row in table + [header]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + table)
