"""A freeze audit any user can run first on a model: is every module covered, and does the freeze hold?

:func:`check_freeze` answers, for any HF causal LM (or a loaded :class:`~toolkit.backends.base.Backend`,
or a registry name):

1. **Coverage.** Every module, by path, with the rule that freezes it (its kind and the frozen
   form) or the reason it needs none (``linear``: affine once its children are frozen). Module
   classes without a rule stop the audit with *one* :class:`~toolkit.jacobian.freeze.UnsupportedModuleError`
   listing all of them, before anything runs.
2. **Checks on a probe prompt**, each against the tolerance of the model's dtype (:data:`TOLERANCES`):

   - ``forward unchanged``: the logits with the freeze on equal those without it;
   - ``reconstruction output`` / ``reconstruction resid.m``: ``||sum_i J_i x_i + c - y|| / ||y||`` of the
     detached Jacobian at the output and at the middle boundary ``m = L // 2``;
   - ``affine at x'``: with the factors recorded at the prompt ``x*``, the frozen map at another
     input ``x'`` is ``sum_i J_i x'_i + c`` (the same ``J`` and ``c``);
   - ``invariance at x'``: one vector-Jacobian product at ``x'`` equals ``u^T J`` at ``x*``;
   - ``restored``: after the freeze the model computes exactly what it did before.

The result is a :class:`FreezeAudit`: ``.passed``, ``.to_frame()`` (pandas), and a readable ``str``.

Teaching the freeze a new module kind: :func:`~toolkit.jacobian.freeze_rules.register_rule`.
A custom activation ``act(x) = x * g(x)`` needs only its gate ``g`` in
:data:`~toolkit.jacobian.freeze_rules.ACTIVATION_GATES` and the ``activation`` rule:

Example:
    >>> import torch
    >>> from torch import nn
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> from toolkit.jacobian.freeze import UnsupportedModuleError
    >>> from toolkit.jacobian.freeze_rules import ACTIVATION_GATES, RULES, install_activation, register_rule
    >>> class Swish2(nn.Module):                      # a user's activation: x * sigmoid(2x)
    ...     def forward(self, x):
    ...         return x * torch.sigmoid(2 * x)
    >>> model = tiny_hf_model("gpt2")
    >>> for block in model.transformer.h:
    ...     block.mlp.act = Swish2()
    >>> try:
    ...     check_freeze(model)
    ... except UnsupportedModuleError as err:
    ...     print("refused:", "Swish2" in str(err))
    refused: True
    >>> ACTIVATION_GATES[Swish2] = lambda m: (lambda x: torch.sigmoid(2 * x))   # act(x) = x * [gate(x)]
    >>> register_rule(Swish2, "activation", install_activation, "x * [sigmoid(2x)]")
    >>> audit = check_freeze(model)
    >>> audit.passed, audit.kind_of("transformer.h.0.mlp.act")
    (True, 'activation')
    >>> del RULES[Swish2], ACTIVATION_GATES[Swish2]   # leave the global tables as they were
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from toolkit.jacobian.compute import detached_jacobian, input_embeddings, linear_map
from toolkit.jacobian.guards import FreezeWarning
from toolkit.jacobian.freeze import check_supported, detached
from toolkit.jacobian.freeze_rules import rule_for
from toolkit.metrics import relative_error, require_eval_mode
from toolkit.models.architectures import spec_for
from toolkit.prompts import single_sequence

PROBE_PROMPT = "The bridge out of Marin is the"
# Relative-error tolerances per parameter dtype: float32 is the paper's exactness claim (~1e-6 seen).
TOLERANCES: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-5,
                                        torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class ModuleCoverage:
    """One module of the model and how the freeze treats it."""

    path: str        # dotted path in the model ("" is the model itself)
    cls: str         # class name
    kind: str        # the rule's kind: norm, activation, gated_mlp, attention, ssm_mixer, linear, ...
    rule: str        # the frozen form, or why it needs none


@dataclass(frozen=True)
class Check:
    """One check on the probe prompt: ``value`` (a relative error) against ``tolerance``."""

    name: str
    value: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.value <= self.tolerance)


@dataclass
class FreezeAudit:
    """What :func:`check_freeze` found: module coverage and the checks on the probe prompt."""

    model: str
    dtype: str
    prompt_ids: list[int]
    modules: list[ModuleCoverage]
    checks: list[Check]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every check passed (coverage is complete by construction)."""
        return all(c.passed for c in self.checks)

    def kind_of(self, path: str) -> str:
        """The rule kind the module at ``path`` is frozen with."""
        for m in self.modules:
            if m.path == path:
                return m.kind
        raise KeyError(f"no module {path!r} in {self.model}")

    def to_frame(self, what: str = "checks"):
        """A pandas DataFrame of the ``"checks"`` (name, value, tolerance, passed) or the ``"modules"``.

        Example:
            >>> audit.to_frame().columns.tolist()
            ['check', 'value', 'tolerance', 'passed', 'detail']
        """
        import pandas as pd  # a dependency of transformer-lens
        if what == "checks":
            return pd.DataFrame([{"check": c.name, "value": c.value, "tolerance": c.tolerance, "passed": c.passed,
                                  "detail": c.detail} for c in self.checks])
        if what == "modules":
            return pd.DataFrame([vars(m) for m in self.modules])
        raise ValueError(f"what={what!r}: choose 'checks' or 'modules'.")

    def module_summary(self) -> list[tuple[str, int, str, str, str]]:
        """``(class, count, kind, rule, first path)`` per module class, in model order."""
        by_cls: dict[str, list[ModuleCoverage]] = {}
        for m in self.modules:
            by_cls.setdefault(m.cls, []).append(m)
        return [(cls, len(ms), ms[0].kind, ms[0].rule, ms[0].path or "<root>") for cls, ms in by_cls.items()]

    def __str__(self) -> str:
        rows = self.module_summary()
        w = [max(len(str(r[i])) for r in rows + [("class", "n", "kind", "rule", "e.g. at")]) for i in range(5)]
        lines = [f"Freeze audit of {self.model} ({self.dtype}, probe of {len(self.prompt_ids)} tokens): "
                 f"{'PASS' if self.passed else 'FAIL'}",
                 f"{len(self.modules)} modules, {len(rows)} classes, every one covered:",
                 ("  " + "  ".join(h.ljust(w[i]) for i, h in enumerate(("class", "n", "kind", "rule", "e.g. at")))).rstrip()]
        lines += [("  " + "  ".join(str(v).ljust(w[i]) for i, v in enumerate(r))).rstrip() for r in rows]
        lines.append("checks:")
        wn = max(len(c.name) for c in self.checks)
        lines += [f"  {'pass' if c.passed else 'FAIL'}  {c.name.ljust(wn)}  {c.value:.2e} <= {c.tolerance:.0e}"
                  + (f"  ({c.detail})" if c.detail else "") for c in self.checks]
        return "\n".join(lines)

    def __repr__(self) -> str:
        failed = [c.name for c in self.checks if not c.passed]
        return (f"FreezeAudit({self.model!r}, {self.dtype}, modules={len(self.modules)}, "
                f"{'passed' if self.passed else f'failed={failed}'})")


def _unwrap(model) -> tuple[nn.Module, Any]:
    """(HF causal LM, tokenizer or None) from a registry name, a Backend, a TransformerBridge, nnsight or HF."""
    if isinstance(model, str):
        from toolkit.loading import load_model
        model = load_model(model)
    if hasattr(model, "hf_model"):                                        # a toolkit Backend
        return model.hf_model, getattr(model, "tokenizer", None)
    if hasattr(model, "original_model") and hasattr(model, "run_with_hooks"):   # TransformerBridge
        return model.original_model, getattr(model, "tokenizer", None)
    if hasattr(model, "_module") and hasattr(model, "trace"):             # nnsight wrapper
        return model._module, getattr(model, "tokenizer", None)
    if isinstance(model, nn.Module):
        return model, None
    raise TypeError(f"check_freeze takes a model name, a toolkit Backend or a HF causal LM, not {type(model).__name__}.")


def _probe_ids(prompt, tokenizer, vocab_size: int) -> Tensor:
    if prompt is None:
        prompt = PROBE_PROMPT if tokenizer is not None else list(range(1, 9))
    ids = single_sequence(None, prompt, tokenizer=tokenizer)
    if ids.numel() < 2 or int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise ValueError(f"the probe prompt needs at least 2 token ids in [0, {vocab_size}); got {ids.tolist()}.")
    return ids.long()


def coverage(hf_model: nn.Module) -> list[ModuleCoverage]:
    """Every module with its rule; raises one error naming every uncovered class (see module docstring).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> [m.kind for m in coverage(tiny_hf_model("llama")) if m.path == "model.layers.0.mlp"]
        ['gated_mlp']
    """
    check_supported(hf_model)  # the one message listing every uncovered class
    return [ModuleCoverage(path, type(m).__name__, rule_for(m).kind, rule_for(m).note)
            for path, m in hf_model.named_modules()]


def check_freeze(model, prompt: str | Sequence[int] | Tensor | None = None, *, chunk_size: int = 128,
                 seed: int = 0) -> FreezeAudit:
    """Audit the freeze on ``model``: coverage of every module, then the checks on a probe prompt.

    Args:
        model: a HF causal LM, a :class:`~toolkit.backends.base.Backend`, a TransformerBridge or nnsight
            wrapper, or a registry name (``"smollm2-135m"``).
        prompt: text (needs a tokenizer) or token ids; default ``"The bridge out of Marin is the"``
            (token ids 1..8 for a model without a tokenizer).
        chunk_size: output rows per backward pass of the Jacobians.
        seed: picks the second input ``x'`` of the invariance checks.

    Raises:
        UnsupportedModuleError: module classes without a freeze rule, all of them in one message.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> audit = check_freeze(tiny_hf_model("qwen2"))
        >>> audit.passed, [c.name for c in audit.checks][:2]
        (True, ['forward unchanged', 'reconstruction output'])
    """
    hf_model, tokenizer = _unwrap(model)
    require_eval_mode(hf_model)
    modules = coverage(hf_model)
    ids = _probe_ids(prompt, tokenizer, hf_model.config.vocab_size).to(next(hf_model.parameters()).device)
    dtype = next(hf_model.parameters()).dtype
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for parameters of dtype {dtype}; use float32 (or one of "
                         f"{', '.join(map(str, TOLERANCES))}).")
    tol = TOLERANCES[dtype]
    middle = len(spec_for(hf_model).blocks(hf_model)) // 2
    checks: list[Check] = []

    with torch.no_grad():
        before = hf_model(ids[None], use_cache=False).logits
        with detached(hf_model):
            during = hf_model(ids[None], use_cache=False).logits
    checks.append(Check("forward unchanged", relative_error(during, before), tol, "logits, frozen vs not"))

    results = {}
    for target in ("output", middle):
        with warnings.catch_warnings():  # the audit reports a failed check in its own table, not as a warning
            warnings.simplefilter("ignore", FreezeWarning)
            r = detached_jacobian(hf_model, ids, target=target, chunk_size=chunk_size, strict=False)
        results[target] = r
        c_share = float(r.c.norm() / r.y.norm().clamp_min(1e-30))
        checks.append(Check(f"reconstruction {target if target == 'output' else f'resid.{target}'}",
                            float(r.reconstruction_error), tol, f"||c||/||y|| = {c_share:.1e}"))

    # Invariance: the map with factors recorded at x* is affine with the same J and c at another x'.
    r = results["output"]
    generator = torch.Generator().manual_seed(seed)
    other = torch.randint(0, hf_model.config.vocab_size, ids.shape, generator=generator).to(ids.device)
    x_star, x_prime = input_embeddings(hf_model, ids), input_embeddings(hf_model, other)
    u = torch.randn(r.y.shape[0], generator=generator).to(r.y)
    with linear_map(hf_model, x_star, target="output") as F:
        xg = x_prime.detach().clone().requires_grad_(True)
        y_prime = F(xg)
        (vjp,) = torch.autograd.grad(y_prime @ u, xg)
    predicted = torch.einsum("toi,ti->o", r.jacobian.double(), x_prime.double()) + r.c.double()
    checks.append(Check("affine at x'", relative_error(predicted, y_prime.detach()), tol,
                        "F(x') = sum J x' + c, factors of x*"))
    checks.append(Check("invariance at x'", relative_error(vjp, torch.einsum("toi,o->ti", r.jacobian, u)), tol,
                        "u^T dF/dx at x' = u^T J(x*)"))

    with torch.no_grad():
        after = hf_model(ids[None], use_cache=False).logits
    checks.append(Check("restored", float((after - before).abs().max()), 0.0, "logits after the freeze, max |diff|"))
    return FreezeAudit(model=type(hf_model).__name__, dtype=str(dtype).removeprefix("torch."),
                       prompt_ids=ids.tolist(), modules=modules, checks=checks,
                       settings={"middle_boundary": middle, "chunk_size": chunk_size, "seed": seed})
