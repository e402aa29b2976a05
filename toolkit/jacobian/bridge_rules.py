"""Freeze rules for TransformerLens' ``TransformerBridge`` components.

``TransformerBridge.boot_transformers(..., hf_model=model)`` wraps the HF model *in place*:
``model.model.layers[0]`` becomes a ``BlockBridge`` holding the original decoder layer as
``_original_component``, the final norm an ``RMSNormalizationBridge``, every projection a
``LinearBridge``, and so on. The original modules are still there (and are frozen by their
own rules in :mod:`toolkit.jacobian.freeze_rules`), but some bridges *re-implement* their
module instead of calling it (the attention bridges recompute the softmax pattern; a
normalisation bridge may compute the norm in Python). Such a re-implementation would bypass
the freeze.

So, while frozen, every bridge component is made a *transparent wrapper*:

``bridge(x, ...) = hook_out(original(hook_in(x), ...))``

Values are the HF module's own (the bridge keeps HF numerics anyway), the frozen original
decides what is detached, and the two hook points TransformerLens users read or write at
this level (``hook_in``/``hook_out``, which carry the aliases ``blocks.{l}.hook_resid_pre``,
``blocks.{l}.hook_resid_post``, ``ln_final.hook_out``) still fire. Hooks *inside* a bridge's
own re-implementation (``hook_pattern``, ``hook_scale``, ...) do not fire while frozen.
``HookPoint`` is the identity unless a hook edits it: declared linear.

Rules are registered lazily, the first time a model holding bridge classes is frozen, so
importing this toolkit never imports TransformerLens.

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> register_bridge_rules(tiny_hf_model("llama"))   # no bridge inside: nothing to do
    []
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from toolkit.jacobian.factors import FactorStore
from toolkit.jacobian.freeze_rules import RULES, Undo, register_rule, swap_forward

_TL_PREFIX = "transformer_lens."


def _install_transparent_bridge(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    original = m.original_component
    if original is None:
        return []

    def forward(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], Tensor):
            args = (m.hook_in(args[0]),) + tuple(args[1:])
        elif isinstance(kwargs.get("hidden_states"), Tensor):
            kwargs["hidden_states"] = m.hook_in(kwargs["hidden_states"])
        out = original(*args, **kwargs)
        if isinstance(out, Tensor):
            return m.hook_out(out)
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            return (m.hook_out(out[0]),) + out[1:]
        return out
    return [_swap_bridge_forward(m, forward)]


def _swap_bridge_forward(m: nn.Module, new_forward) -> Undo:
    # A bridge forwards attribute *assignment* to its original component, so ``m.forward = f``
    # would patch the original (and recurse). Write the bridge's own ``__dict__`` instead.
    if getattr(vars(m).get("forward"), "state", None) is not None:  # nnsight Controller on the bridge
        return swap_forward(m, new_forward)
    had_own, old = "forward" in vars(m), vars(m).get("forward")
    vars(m)["forward"] = new_forward

    def undo() -> None:
        if had_own:
            vars(m)["forward"] = old
        else:
            vars(m).pop("forward", None)
    return undo


def register_bridge_rules(hf_model: nn.Module) -> list[str]:
    """Register rules for the TransformerLens bridge classes inside ``hf_model``; returns their names.

    Every ``GeneralizedComponent`` subclass found gets the transparent-wrapper rule (see the
    module docstring); ``HookPoint`` is declared linear. Classes already in the table are kept.

    Example:
        >>> from transformer_lens.hook_points import HookPoint
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> hf = tiny_hf_model("llama")
        >>> _ = make_backend(hf, model.tokenizer, backend="tl")     # TransformerBridge wraps hf in place
        >>> _ = register_bridge_rules(hf)                           # (empty when an earlier model registered them)
        >>> RULES[HookPoint].kind, RULES[type(hf.model.layers[0])].kind
        ('linear', 'bridge')
    """
    classes = {type(m) for m in hf_model.modules() if type(m).__module__.startswith(_TL_PREFIX)}
    new = [c for c in classes if c not in RULES]
    if not new:
        return []
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    added = []
    for cls in sorted(new, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        if cls is HookPoint:
            register_rule(cls, "linear", None, "TransformerLens hook point: identity unless a hook edits it")
        elif issubclass(cls, GeneralizedComponent):
            register_rule(cls, "bridge", _install_transparent_bridge,
                          "TransformerBridge component: hook_out(frozen original(hook_in(x)))")
        else:
            continue  # left uncovered: check_supported names it
        added.append(f"{cls.__module__}.{cls.__qualname__}")
    return added
