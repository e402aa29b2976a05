"""Freeze rules for TransformerLens 3's ``HookedTransformer`` components.

A ``HookedTransformer`` (TransformerLens <= 3.x) is built from TransformerLens' own modules, not
HF ones, and the hooked backend (:mod:`toolkit.backends.hooked_backend`) differentiates through it,
so the freeze needs rules for them. Each nonlinear factor of these components passes through one
of the component's own ``HookPoint`` s, so every rule is a forward hook on a hook point that
returns the *detached* factor (recorded once, replayed after; see
:class:`~toolkit.jacobian.factors.FactorStore`), and the component's own ``forward`` runs unchanged:

======================================  ==========================================================
kind (classes)                          frozen form (``[·]`` = detached factor)
======================================  ==========================================================
norm (LayerNorm, LayerNormPre,          ``x / [scale]``: the output of ``hook_scale``
RMSNorm, RMSNormPre)                    (``sqrt(mean(x²) + eps)`` after centring for LN) is the factor
attention (Attention,                   ``[hook_q]``, ``[hook_k]``: queries and keys are constants, so
GroupedQueryAttention)                  rotary, QK-norm, softcap, masks and the softmax pattern are
                                        too; only ``V -> O`` stays in the graph
activation (MLP)                        ``hook_post = pre * [act(pre)/pre]`` (``cfg.act_fn``: gelu,
                                        gelu_new, gelu_fast, gelu_pytorch_tanh, silu, relu)
gated MLP (GatedMLP)                    ``hook_post = [act(pre)] * pre_linear + b_in``
linear (Embed, PosEmbed, Unembed,       embed, add, project, or the identity (a hook point with no
TransformerBlock, HookedTransformer,    hook); containers
HookPoint, TypedModuleList)
======================================  ==========================================================

Anything else (MoE, SoLU's layer-normed activation, 4-bit attention, ...) has no rule and
:func:`toolkit.jacobian.freeze.check_supported` names it. Rules are registered lazily through
:data:`toolkit.jacobian.freeze_rules.RULE_PROVIDERS`, so importing the toolkit never imports
TransformerLens, and only when a ``HookedTransformer``'s classes are seen (TransformerLens 4 has none).

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> register_hooked_rules(tiny_hf_model("llama"))   # no HookedTransformer inside: nothing to do
    []
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.jacobian.factors import FactorStore
from toolkit.jacobian.freeze_rules import RULES, FreezeError, Undo, _phi, _tanh_gelu_gate, register_rule

_COMPONENTS = "transformer_lens.components."

# cfg.act_fn -> the gate g with act(x) = x * g(x), for TransformerLens' activation functions
# (transformer_lens.utilities.activation_functions.SUPPORTED_ACTIVATIONS), written without division.
ACT_GATES: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _phi,
    "gelu_new": _tanh_gelu_gate,
    "gelu_pytorch_tanh": _tanh_gelu_gate,
    "gelu_fast": lambda x: 0.5 * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "silu": torch.sigmoid,
    "relu": lambda x: (x > 0).to(x.dtype),
}


def act_gate(m: nn.Module) -> Callable[[Tensor], Tensor]:
    """The gate of an MLP component's ``cfg.act_fn``, or :class:`FreezeError` naming the fix.

    Example:
        >>> from types import SimpleNamespace
        >>> float(act_gate(SimpleNamespace(cfg=SimpleNamespace(act_fn="silu")))(torch.zeros(1)))
        0.5
    """
    name = getattr(m.cfg, "act_fn", None)
    if name not in ACT_GATES:      # SoLU (layer-normed), xIELU, relu2, ...
        raise FreezeError(f"TransformerLens MLP activation {name!r} has no freeze rule (covered: "
                          f"{', '.join(ACT_GATES)}); add its gate g (act(x) = x * g(x)) to "
                          f"toolkit.jacobian.hooked_rules.ACT_GATES.")
    return ACT_GATES[name]


def _batch_like(factor: Tensor, live: Tensor) -> Tensor:
    """A factor recorded on one sequence, broadcast to a live batch (batched JVPs/VJPs replay it)."""
    return factor if factor.shape == live.shape else factor.expand_as(live)


def _constant_at(hook_point: nn.Module, key: str, store: FactorStore) -> Undo:
    """``hook_point``'s output becomes the detached factor ``key`` (its value at recording)."""
    def hook(_m, _args, out: Tensor) -> Tensor:
        return _batch_like(store.get(key, lambda: out.detach()), out)
    return hook_point.register_forward_hook(hook).remove


def _install_norm(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # LayerNorm / LayerNormPre / RMSNorm / RMSNormPre: x / hook_scale(sqrt(mean(x^2) + eps)) ...
    return [_constant_at(m.hook_scale, f"{path}:scale", store)]


def _install_attention(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # q and k as constants: everything between them and the pattern is then constant too
    return [_constant_at(m.hook_q, f"{path}:q", store), _constant_at(m.hook_k, f"{path}:k", store)]


def _install_mlp(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    gate = act_gate(m)
    live: list[Tensor] = []

    def keep_pre(_m, _args, out: Tensor) -> None:
        live[:] = [out]

    def post(_m, _args, out: Tensor) -> Tensor:
        pre = live.pop()
        return pre * _batch_like(store.get(f"{path}:gate", lambda: gate(pre).detach()), pre)

    return [m.hook_pre.register_forward_hook(keep_pre).remove, m.hook_post.register_forward_hook(post).remove]


def _install_gated_mlp(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    if m.cfg.is_layer_norm_activation():
        raise FreezeError(f"{path}: a gated MLP with a layer-normed activation ({m.cfg.act_fn}) has no freeze rule.")
    live: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_m, _args, out: Tensor) -> None:
            live[name] = out
        return hook

    def post(_m, _args, out: Tensor) -> Tensor:
        pre, pre_linear = live.pop("pre"), live.pop("pre_linear")
        act = _batch_like(store.get(f"{path}:gate", lambda: m.act_fn(pre).detach()), pre_linear)
        return act * pre_linear + m.b_in      # the component's own expression, act(pre) detached

    return [m.hook_pre.register_forward_hook(keep("pre")).remove,
            m.hook_pre_linear.register_forward_hook(keep("pre_linear")).remove,
            m.hook_post.register_forward_hook(post).remove]


def _hooked_classes() -> dict[str, tuple[type, ...]]:
    """Rule kind -> the TransformerLens 3 component classes it covers (imported here, lazily)."""
    from transformer_lens.components import (Attention, Embed, GatedMLP, GroupedQueryAttention, LayerNorm,
                                             LayerNormPre, MLP, PosEmbed, RMSNorm, RMSNormPre, TransformerBlock,
                                             Unembed)
    from transformer_lens.HookedTransformer import HookedTransformer
    from transformer_lens.utilities.typed_module_list import TypedModuleList
    return {"norm": (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre),
            "attention": (Attention, GroupedQueryAttention),
            "activation": (MLP,), "gated_mlp": (GatedMLP,),
            "linear": (Embed, PosEmbed, Unembed, TransformerBlock, HookedTransformer, TypedModuleList)}


_INSTALLS = {"norm": (_install_norm, "x / [hook_scale]"),
             "attention": (_install_attention, "[hook_q], [hook_k]: constant pattern, V->O linear"),
             "activation": (_install_mlp, "hook_post = pre * [act(pre)/pre]"),
             "gated_mlp": (_install_gated_mlp, "hook_post = [act(pre)] * pre_linear + b_in"),
             "linear": (None, "affine given frozen children")}


def _norm_gain(m: nn.Module) -> Tensor | None:
    return getattr(m, "w", None)  # LayerNorm / RMSNorm weight; the Pre forms have none


def register_hooked_rules(model: nn.Module) -> list[str]:
    """Register rules for the ``HookedTransformer`` classes inside ``model``; returns their names.

    Only exact classes of the table (see the module docstring) are registered; ``HookPoint`` is
    declared linear. Other TransformerLens classes (a TransformerBridge's, handled by
    :mod:`toolkit.jacobian.bridge_rules`, or components without a rule) are left alone.

    Example:
        >>> from transformer_lens import HookedTransformer                     # doctest: +SKIP
        >>> register_hooked_rules(hooked)[:1]                                  # doctest: +SKIP
        ['transformer_lens.HookedTransformer.HookedTransformer']
    """
    seen = {type(m) for m in model.modules() if type(m).__module__.startswith("transformer_lens.")}
    if not seen - set(RULES):
        return []
    try:
        classes = _hooked_classes()
    except ImportError:              # TransformerLens 4: no HookedTransformer, nothing of ours to cover
        return []
    from transformer_lens.hook_points import HookPoint
    added = []
    if HookPoint in seen and HookPoint not in RULES:
        register_rule(HookPoint, "linear", None, "TransformerLens hook point: identity unless a hook edits it")
        added.append("transformer_lens.hook_points.HookPoint")
    for kind, group in classes.items():
        install, note = _INSTALLS[kind]
        for cls in group:
            if cls in seen and cls not in RULES:
                register_rule(cls, kind, install, note, _norm_gain if kind == "norm" else None)
                added.append(f"{cls.__module__}.{cls.__qualname__}")
    return added
