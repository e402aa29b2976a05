"""Detached (and ordinary) Jacobians of a HF causal LM with respect to its input embeddings.

``x = h_0`` is the input of the first block (token embeddings, plus GPT-2's learned
position embeddings, times Gemma's embedding scale), one row per position, and ``y`` is
by default the final-norm hidden state at the last position (the paper's output
embedding) or the residual stream ``h_l`` at a boundary ``l`` (see
:mod:`toolkit.backends.base`). The model is run from ``h_0`` through ``inputs_embeds``;
for GPT-2 the position embedding is already inside ``x``, so the model's own ``wpe`` is
zeroed for the call.

Rows of ``J = dy/dx`` are batched vector-Jacobian products, ``chunk_size`` output
dimensions per backward pass (``autograd.grad(..., is_grads_batched=True)``), so memory
stays bounded by one chunk. With the freeze on, the map is affine: the constant
``c = F(0)`` is evaluated with the factors recorded at ``x`` held fixed, and
``y = sum_i J_i x_i + c`` holds to float rounding.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = tiny_hf_model("llama")
    >>> result = detached_jacobian(model, torch.tensor([1, 2, 3, 4]))
    >>> result.jacobian.shape, result.reconstruction_error < 1e-5
    (torch.Size([4, 64, 64]), True)
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Literal, Union

import torch
from torch import Tensor, nn

from toolkit.jacobian.freeze import detached as frozen
from toolkit.jacobian.result import DetachedJacobian
from toolkit.models.architectures import spec_for

Target = Union[int, Literal["output"]]

# Learned absolute position embeddings, attribute of the base model: part of x = h_0, not of the map.
_POSITION_EMBEDDINGS = {"gpt2": "wpe"}


def _check_target(hf_model: nn.Module, target: Target) -> Target:
    n_layers = len(spec_for(hf_model).blocks(hf_model))
    if target == "output" or (isinstance(target, int) and not isinstance(target, bool) and 0 <= target <= n_layers):
        return target
    raise ValueError(f"target {target!r} is not 'output' or a layer boundary 0..{n_layers} "
                     f"(0 = embeddings, {n_layers} = last block output before the final norm).")


def _as_ids(input_ids: Tensor) -> Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be one non-empty sequence ([T] or [1, T]), got shape {tuple(ids.shape)}.")
    return ids.long()


def input_embeddings(hf_model: nn.Module, input_ids: Tensor) -> Tensor:
    """``h_0`` for one sequence: ``[T, d_model]``, detached (the first block's input).

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> input_embeddings(tiny_hf_model("gpt2"), torch.tensor([1, 2])).shape
        torch.Size([2, 64])
    """
    spec = spec_for(hf_model)
    ids = _as_ids(input_ids).to(next(hf_model.parameters()).device)
    with torch.no_grad():
        x = hf_model.get_input_embeddings()(ids)  # Gemma's scaled embedding applies its sqrt(d) here
        pos_attr = _POSITION_EMBEDDINGS.get(spec.family)
        if pos_attr is not None:
            x = x + getattr(spec.base(hf_model), pos_attr)(torch.arange(ids.numel(), device=ids.device))
    return x.detach()


def target_function(hf_model: nn.Module, target: Target = "output", position: int = -1) -> Callable[[Tensor], Tensor]:
    """``f(x) -> y``: from ``h_0`` (``[T, d]``) to the target state at ``position`` (``[d]``).

    Runs the base model on ``inputs_embeds`` and reads the target with a forward hook (the
    final norm for ``"output"``, block ``l-1`` for boundary ``l``). Frozen or not depends on
    whether it is called inside :func:`toolkit.jacobian.freeze.detached`.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> f = target_function(model, target=1)
        >>> f(input_embeddings(model, torch.tensor([1, 2, 3]))).shape
        torch.Size([64])
    """
    spec = spec_for(hf_model)
    target = _check_target(hf_model, target)
    base = spec.base(hf_model)
    pos_attr = _POSITION_EMBEDDINGS.get(spec.family)

    def f(x: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"x must be [T, d_model], got shape {tuple(x.shape)}.")
        if target == 0:
            return x[position]
        read = spec.final_norm(hf_model) if target == "output" else spec.blocks(hf_model)[target - 1]
        captured: list[Tensor] = []
        handles = [read.register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))]
        if pos_attr is not None:  # x already holds the learned positions
            handles.append(getattr(base, pos_attr).register_forward_hook(lambda _m, _a, out: torch.zeros_like(out)))
        try:
            base(inputs_embeds=x[None], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return captured[-1][0, position]
    return f


def jacobian_rows(y: Tensor, x: Tensor, chunk_size: int = 64) -> Tensor:
    """``dy/dx`` as ``[*x.shape[:-1], d_out, d_in]`` from batched VJPs, ``chunk_size`` rows at a time.

    ``y`` ([d_out]) must have been computed from ``x`` ([T, d_in], ``requires_grad``); the graph
    is kept between chunks.

    Example:
        >>> import torch
        >>> x = torch.randn(3, 2, requires_grad=True)
        >>> W = torch.randn(4, 2)
        >>> J = jacobian_rows(W @ x.sum(0), x)
        >>> torch.allclose(J, W.expand(3, 4, 2))
        True
    """
    if y.ndim != 1:
        raise ValueError(f"y must be a vector [d_out], got shape {tuple(y.shape)}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    d_out = y.shape[0]
    rows = []
    for start in range(0, d_out, chunk_size):
        stop = min(start + chunk_size, d_out)
        cotangents = torch.zeros(stop - start, d_out, dtype=y.dtype, device=y.device)
        cotangents[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        (grads,) = torch.autograd.grad(y, x, grad_outputs=cotangents, retain_graph=True, is_grads_batched=True)
        rows.append(grads)  # [chunk, T, d_in]
    return torch.cat(rows).movedim(0, -2).contiguous()


@contextmanager
def linear_map(hf_model: nn.Module, x_star: Tensor, target: Target = "output",
               position: int = -1) -> Iterator[Callable[[Tensor], Tensor]]:
    """The frozen model as a fixed affine map: factors recorded at ``x_star``, any input after.

    Inside the block, ``F(x)`` evaluates the model with every detached factor taken from the
    pass at ``x_star``; ``F`` is exactly affine in ``x`` and ``F(x_star)`` is the model's output.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("gpt2")
        >>> x = input_embeddings(model, torch.tensor([1, 2, 3]))
        >>> with linear_map(model, x) as F:
        ...     c = F(torch.zeros_like(x))      # the constant term
        >>> c.shape
        torch.Size([64])
    """
    f = target_function(hf_model, target, position)
    with frozen(hf_model) as freeze:
        with freeze.recording(), torch.no_grad():
            f(x_star)
        with freeze.replaying():
            yield f


def detached_jacobian(hf_model: nn.Module, input_ids: Tensor, *, target: Target = "output", position: int = -1,
                      detached: bool = True, chunk_size: int = 64, model_id: str | None = None) -> DetachedJacobian:
    """The detached Jacobian ``J_i = dy/dx_i`` for every input position, with ``y``, ``x`` and ``c``.

    Args:
        hf_model: a supported HF causal LM in eval mode.
        input_ids: one sequence, ``[T]`` or ``[1, T]``.
        target: ``"output"`` (final-norm state, the paper's output embedding) or a boundary ``l``.
        position: which position's ``y`` (default the last).
        detached: ``False`` gives the ordinary Jacobian of the same map (for contrast); its
            ``c`` is the unfrozen model at zero input, so its reconstruction is not exact.
        chunk_size: output rows per batched backward pass (memory bound).

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> r = detached_jacobian(tiny_hf_model("gpt2"), torch.tensor([4, 8, 15]), target=1)
        >>> r.reconstruction_error < 1e-5, r.jacobian.shape   # GPT-2 is affine: c carries the biases
        (True, torch.Size([3, 64, 64]))
    """
    if hf_model.training:
        raise ValueError("the model is in training mode (dropout active); call hf_model.eval() first.")
    ids = _as_ids(input_ids)
    x = input_embeddings(hf_model, ids)
    y, jac, c = jacobian_terms(hf_model, target_function(hf_model, target, position), x, detached=detached,
                               chunk_size=chunk_size)
    return build_result(hf_model, ids, x, y, jac, c, target=target, position=position, detached=detached,
                        chunk_size=chunk_size, model_id=model_id)


def jacobian_terms(hf_model: nn.Module, f: Callable[[Tensor], Tensor], x: Tensor, *, detached: bool = True,
                   chunk_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, J, c)`` of any ``f: h_0 [T, d] -> y [d_out]`` that runs ``hf_model``, frozen or not.

    This is the one place where the freeze, the chunked rows and the constant term meet; the
    direct path (:func:`detached_jacobian`) and the backend paths
    (:mod:`toolkit.jacobian.through_backend`) only differ in ``f``. Detached: the factors are
    recorded at ``x`` and ``c = F(0)`` replays them; ordinary: ``c`` is the plain model at zero.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> x = input_embeddings(model, torch.tensor([1, 2, 3]))
        >>> y, J, c = jacobian_terms(model, target_function(model), x)
        >>> J.shape, float(c.norm())   # bias-free Llama: no constant term
        (torch.Size([3, 64, 64]), 0.0)
    """
    xg = x.detach().clone().requires_grad_(True)
    with frozen(hf_model) if detached else nullcontext() as freeze, torch.enable_grad():
        with freeze.recording() if detached else nullcontext():
            y = f(xg)
        jac = jacobian_rows(y, xg, chunk_size)
        with freeze.replaying() if detached else nullcontext(), torch.no_grad():
            c = f(torch.zeros_like(x))
    return y.detach(), jac.detach(), c.detach()


def build_result(hf_model: nn.Module, ids: Tensor, x: Tensor, y: Tensor, jac: Tensor, c: Tensor, *,
                 target: Target, position: int, detached: bool, chunk_size: int, model_id: str | None = None,
                 **extra_settings) -> DetachedJacobian:
    """Wrap ``(x, y, J, c)`` in a :class:`DetachedJacobian` with the settings that made it.

    ``extra_settings`` (e.g. ``backend="nnsight"``) are added to ``settings``.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> x = input_embeddings(model, torch.tensor([1, 2]))
        >>> r = build_result(model, torch.tensor([1, 2]), x, *jacobian_terms(model, target_function(model), x),
        ...                  target="output", position=-1, detached=True, chunk_size=64)
        >>> r.settings["position"], r.reconstruction_error < 1e-5
        (1, True)
    """
    ids = _as_ids(ids)
    spec = spec_for(hf_model)
    config = hf_model.config
    notes = []
    if getattr(config, "final_logit_softcapping", None):
        notes.append(f"final_logit_softcapping={config.final_logit_softcapping} acts on the logits, outside y")
    settings = {"model_id": model_id or getattr(config, "_name_or_path", "") or spec.family,
                "architecture": spec.family, "model_type": config.model_type, "target": target,
                "position": position if position >= 0 else ids.numel() + position, "detached": detached,
                "chunk_size": chunk_size, "dtype": str(x.dtype), "n_layers": len(spec.blocks(hf_model)),
                "notes": notes, **extra_settings}
    return DetachedJacobian(jacobian=jac.detach(), y=y.detach(), x=x.detach(), c=c.detach(), token_ids=ids.cpu(),
                            settings=settings)


def ordinary_jacobian(hf_model: nn.Module, input_ids: Tensor, **kwargs) -> DetachedJacobian:
    """The ordinary (not detached) Jacobian of the same map: :func:`detached_jacobian` with the freeze off.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> ordinary_jacobian(tiny_hf_model("llama"), torch.tensor([1, 2, 3])).reconstruction_error > 1e-3
        True
    """
    return detached_jacobian(hf_model, input_ids, detached=False, **kwargs)
