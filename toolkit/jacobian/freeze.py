"""The reversible freeze: a context manager that makes a HF model locally linear.

Inside ``with detached(model) as freeze:`` every nonlinear factor (see
:mod:`toolkit.jacobian.freeze_rules`) is computed as a detached constant, so forward
values are unchanged while autograd sees an affine map of the input embeddings. On exit
(normal or by exception) every patched ``forward`` and every hook is removed.

Before patching anything, every module of the model is checked against the rule table:
a module kind without a rule stops with :class:`UnsupportedModuleError` naming its
class and path, so nothing is silently left nonlinear.

While frozen, attention runs through the model's own *eager* kernel (``softmax(QK^T) V`` with
an explicit pattern; the configuration's ``_attn_implementation`` is switched for the block
and restored after, as TransformerLens' bridge does permanently). Values are those of the
fused kernels to float rounding, and with the pattern a plain constant: the backward pass
only touches ``V`` (no wasted ``dQ``/``dK``), batched VJPs run without per-sample fallbacks
(SDPA's backward has no vmap rule), and forward-mode AD (``torch.func.jvp``, which SDPA and
flash attention do not support) works, so Jacobian columns and matrix-free SVDs are possible.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = tiny_hf_model("llama")
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with detached(model) as freeze:
    ...     frozen = model(ids).logits
    >>> torch.allclose(frozen, model(ids).logits, atol=1e-5)
    True
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from toolkit.jacobian.factors import FactorStore, Mode
from toolkit.jacobian.freeze_rules import FreezeError, Undo, provide_rules, rule_for
from toolkit.jacobian.guards import Checks, inspect_model

_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models frozen right now (no nesting)


class UnsupportedModuleError(FreezeError):
    """The model holds module kinds the freeze rules do not cover."""


@dataclass
class FreezeSession:
    """Handle of an active freeze: the factor store and what was patched.

    ``recording()`` captures the factors of the next forward pass; ``replaying()`` makes
    later passes reuse them, so the model is a fixed affine map of its input.
    """

    store: FactorStore
    kinds: dict[str, str] = field(default_factory=dict)  # module path -> rule kind it was frozen with

    def recording(self):
        """Capture the detached factors of the forward passes in this block.

        Example:
            >>> import torch
            >>> with detached(tiny) as freeze, freeze.recording():
            ...     _ = tiny(torch.tensor([[4, 5]]))
            >>> len(freeze.store.factors) > 0                 # one factor per norm, gate and attention site
            True
        """
        return self.store.mode_as("record")

    def replaying(self):
        """Reuse the recorded factors, whatever the input (the frozen linear map at fixed factors).

        Example:
            >>> import torch
            >>> with detached(tiny) as freeze:
            ...     with freeze.recording():
            ...         live = tiny.model(inputs_embeds=tiny_x[None]).last_hidden_state
            ...     with freeze.replaying():                          # the same factors at another input
            ...         c = tiny.model(inputs_embeds=torch.zeros_like(tiny_x)[None]).last_hidden_state
            >>> c.shape == live.shape
            True
        """
        return self.store.mode_as("replay")

    @property
    def mode(self) -> Mode:
        return self.store.mode


def check_supported(hf_model: nn.Module) -> dict[str, str]:
    """Map every module path to its rule kind, or raise naming each uncovered module kind.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> kinds = check_supported(tiny_hf_model("gpt2"))
        >>> kinds["transformer.h.0.mlp.act"]
        'activation'
    """
    provide_rules(hf_model)  # library module kinds (a TransformerBridge wraps the HF modules in place)
    kinds: dict[str, str] = {}
    missing: dict[str, list[str]] = {}
    for path, module in hf_model.named_modules():
        rule = rule_for(module)
        if rule is None:
            cls = type(module)
            missing.setdefault(f"{cls.__module__}.{cls.__qualname__}", []).append(path or "<root>")
        else:
            kinds[path] = rule.kind
    if missing:
        listed = "; ".join(f"{name} (at {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
                           for name, paths in missing.items())
        raise UnsupportedModuleError(f"cannot freeze {type(hf_model).__name__}: no freeze rule for module kind(s) "
                                     f"{listed}. Each may hold a nonlinearity; add a rule with "
                                     f"toolkit.jacobian.freeze_rules.register_rule (kind 'linear' if it is affine).")
    return kinds


def eager_attention(hf_model: nn.Module) -> list[Undo]:
    """Switch every configuration in ``hf_model`` to the eager attention kernel; returns the undos.

    The base model builds its masks and each attention module picks its kernel from
    ``config._attn_implementation`` at call time, so the switch holds for every forward
    pass until undone (see the module docstring for why the freeze wants it).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> undo = eager_attention(model)
        >>> model.config._attn_implementation
        'eager'
        >>> for u in undo: u()
        >>> model.config._attn_implementation
        'sdpa'
    """
    configs = {id(c): c for c in (getattr(m, "config", None) for m in hf_model.modules())
               if c is not None and hasattr(c, "_attn_implementation")}
    undos: list[Undo] = []
    for config in configs.values():
        old = config._attn_implementation
        if old != "eager":
            config._attn_implementation = "eager"
            undos.append(lambda config=config, old=old: setattr(config, "_attn_implementation", old))
    return undos


@contextmanager
def detached(hf_model: nn.Module, store: FactorStore | None = None, *,
             checks: Checks | None = None) -> Iterator[FreezeSession]:
    """Freeze ``hf_model``'s nonlinear factors for the duration of the block (reversible).

    Forward values stay those of the original model (to float rounding); gradients flow
    only through the linear paths. ``store`` lets callers share recorded factors.

    A model that runs something the rules cannot see (an instance-level ``forward``, a hook;
    see :func:`toolkit.jacobian.guards.inspect_model`) is refused with
    :class:`~toolkit.jacobian.guards.LiveModelError` naming the module, what it runs and the fix;
    ``checks=Checks(strict=False)`` records a warning instead.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("qwen3")
        >>> x = model.get_input_embeddings()(torch.tensor([[5, 6, 7]])).detach().requires_grad_()
        >>> with detached(model):
        ...     y = model.model(inputs_embeds=x).last_hidden_state[0, -1]
        >>> y.shape
        torch.Size([64])
    """
    if hf_model in _ACTIVE:
        raise FreezeError(f"{type(hf_model).__name__} is already frozen: nested detached() blocks are not supported.")
    kinds = check_supported(hf_model)
    (checks if checks is not None else Checks()).refuse(inspect_model(hf_model), type(hf_model).__name__)
    session = FreezeSession(store if store is not None else FactorStore(), kinds)
    undos: list[Undo] = []
    _ACTIVE.add(hf_model)
    try:
        undos.extend(eager_attention(hf_model))
        for path, module in hf_model.named_modules():
            rule = rule_for(module)
            if rule.install is not None:
                undos.extend(rule.install(module, path, session.store))
        yield session
    finally:
        for undo in reversed(undos):  # also runs when an install failed half-way
            undo()
        _ACTIVE.discard(hf_model)
