"""The detached Jacobian computed through a backend's own hooking (nnsight or TransformerLens).

:func:`toolkit.jacobian.compute.detached_jacobian` drives the HF model directly
(``inputs_embeds`` plus a forward hook). Here the same map ``y = F(h_0)`` is run through the
interpretability library a user already works with:

* **nnsight** — inside ``traced.trace(ids)`` the first block's input is *replaced* by a
  gradient-requiring ``x`` and the target (the base model's final-norm output, or block
  ``l-1``'s output for boundary ``l``) is saved; gradients flow through the trace;
* **TransformerLens** — ``bridge.run_with_hooks`` with a hook at ``blocks.0.hook_resid_pre``
  that returns ``x`` and one that captures ``ln_final.hook_out`` (target ``"output"``) or the
  boundary's hook (``blocks.{l}.hook_resid_pre``, ``blocks.{L-1}.hook_resid_post``).

Either way the freeze (:func:`toolkit.jacobian.freeze.detached` on ``model.hf_model``) is
active, and the rows, the constant term and the result come from the shared
:func:`~toolkit.jacobian.compute.jacobian_terms` / :func:`~toolkit.jacobian.compute.build_result`,
so the three paths can only differ in how ``F`` reaches the model. They agree to float
rounding (``tests/test_jacobian_backends.py``).

``x = h_0`` is read through the backend too (``model.hidden_states(ids, [0])``), so GPT-2's
learned positions are inside ``x``, exactly as in the direct path.

Example:
    >>> import toolkit
    >>> model = toolkit.load_model("smollm2-135m", backend="nnsight")            # doctest: +SKIP
    >>> ids = model.to_tokens("The bridge out of Marin is the")                  # doctest: +SKIP
    >>> r = backend_jacobian(model, ids)                                         # doctest: +SKIP
    >>> r.reconstruction_error < 1e-5                                            # doctest: +SKIP
    True
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from toolkit.backends.base import Backend
from toolkit.jacobian.budget import check_fits
from toolkit.jacobian.compute import Target, _as_ids, _check_target, build_result, jacobian_terms
from toolkit.jacobian.result import DetachedJacobian
from toolkit.models.architectures import spec_for


def _envoy(traced, dotted: str):
    node = traced
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _first(out):
    """The hidden-state tensor of a module output (tensor, tuple or ``ModelOutput``)."""
    if isinstance(out, Tensor):
        return out
    return out[0]


def nnsight_target_function(model: Backend, input_ids: Tensor, target: Target = "output",
                            position: int = -1) -> Callable[[Tensor], Tensor]:
    """``f(x) -> y`` run inside an nnsight trace: ``x`` replaces block 0's input, ``y`` is saved.

    Example:
        >>> import torch
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
        >>> f = nnsight_target_function(model, torch.tensor([1, 2, 3]))
        >>> f(torch.randn(3, 64)).shape
        torch.Size([64])
    """
    spec = spec_for(model.hf_model)
    target = _check_target(model.hf_model, target)
    ids = _as_ids(input_ids)[None].to(model.device)
    traced = model.traced
    blocks = _envoy(traced, spec.blocks_path())
    base = _envoy(traced, spec.base_attr)

    def f(x: Tensor) -> Tensor:
        if target == 0:
            return x[position]
        # use_cache=False: a Mamba cache would carry state outside the frozen map.
        with traced.trace(ids, use_cache=False):
            blocks[0].input = x[None]
            # Base model output = final norm applied; a block's output (transformers 5: a tensor).
            h = base.output[0] if target == "output" else blocks[target - 1].output
            y = _first(h)[0, position].save()
        return y
    return f


def transformer_lens_target_function(model: Backend, input_ids: Tensor, target: Target = "output",
                                     position: int = -1) -> Callable[[Tensor], Tensor]:
    """``f(x) -> y`` through ``bridge.run_with_hooks``: ``blocks.0.hook_resid_pre`` returns ``x``.

    Example:
        >>> f = transformer_lens_target_function(tl_model, ids, target=3)          # doctest: +SKIP
    """
    target = _check_target(model.hf_model, target)
    ids = _as_ids(input_ids)[None].to(model.device)
    read_hook = "ln_final.hook_out" if target == "output" else model.hook_name(target) if target else None

    def f(x: Tensor) -> Tensor:
        if target == 0:
            return x[position]
        captured: list[Tensor] = []

        def put_x(resid: Tensor, hook) -> Tensor:
            return x[None].to(resid.dtype)

        def grab(resid: Tensor, hook) -> None:
            captured.append(resid)

        model.bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", put_x), (read_hook, grab)])
        return captured[-1][0, position]
    return f


def backend_target_function(model: Backend, input_ids: Tensor, target: Target = "output",
                            position: int = -1) -> Callable[[Tensor], Tensor]:
    """The backend's own ``f: h_0 -> y`` (nnsight trace or TransformerLens hooks).

    Example:
        >>> f = backend_target_function(model, ids)                                # doctest: +SKIP
    """
    if model.name == "nnsight":
        return nnsight_target_function(model, input_ids, target, position)
    if model.name == "transformer_lens":
        return transformer_lens_target_function(model, input_ids, target, position)
    raise ValueError(f"no Jacobian path for backend {model.name!r}; use 'nnsight' or 'transformer_lens', "
                     f"or toolkit.jacobian.detached_jacobian on the HF model.")


def backend_jacobian(model: Backend, input_ids: Tensor, target: Target = "output", position: int = -1,
                     detached: bool = True, chunk_size: int = 64, strict: bool = True, progress: bool | None = None,
                     memory_budget: int | None = None) -> DetachedJacobian:
    """``J_i = dy/dx_i`` computed through the backend's hooking, with the freeze on ``model.hf_model``.

    Args:
        model: a :class:`~toolkit.backends.base.Backend` (nnsight or TransformerLens).
        input_ids: one sequence, ``[T]`` or ``[1, T]``.
        target: ``"output"`` (final-norm state) or a boundary ``l`` in ``0..n_layers``.
        position: which position's ``y`` (default the last).
        detached: ``False`` for the ordinary Jacobian of the same map.
        chunk_size: output rows per batched backward pass.
        strict: refuse (``True``) or record a warning (``False``) when the freeze cannot see
            through the model or the result misses the dtype's tolerance (:mod:`toolkit.jacobian.guards`).
        progress / memory_budget: as in :func:`toolkit.jacobian.compute.jacobian_terms` (a bar over the
            row chunks; a prompt whose Jacobian would not fit is refused before any work).

    Returns:
        a :class:`DetachedJacobian` whose ``settings["backend"]`` names the path taken.

    Example:
        >>> import torch
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
        >>> r = backend_jacobian(model, torch.tensor([1, 2, 3]))
        >>> r.settings["backend"], r.reconstruction_error < 1e-5
        ('nnsight', True)
    """
    hf_model = model.hf_model
    if hf_model.training:
        raise ValueError("the model is in training mode (dropout active); call hf_model.eval() first.")
    ids = _as_ids(input_ids).to(model.device)
    model.check_tokens(ids)
    check_fits(hf_model, ids.numel(), chunk_size=chunk_size, memory_budget=memory_budget)  # before any model run
    x = model.hidden_states(ids[None], layers=[0])[0, 0].detach()  # h_0 through the backend: [T, d]
    f = backend_target_function(model, ids, target, position)
    terms = jacobian_terms(hf_model, f, x, detached=detached, chunk_size=chunk_size, strict=strict,
                           progress=progress, memory_budget=memory_budget)
    return build_result(hf_model, ids, x, *terms, target=target, position=position, detached=detached,
                        chunk_size=chunk_size, model_id=model.info.model_id, checks=terms.checks, backend=model.name)
