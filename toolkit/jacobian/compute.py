"""Detached (and ordinary) Jacobians of a HF causal LM: ``J_i = dy/dx_i`` with ``y``, ``x`` and ``c``.

``x = h_0`` is the input of the first block (token embeddings, plus GPT-2's learned
position embeddings, times Gemma's embedding scale), one row per position, and ``y`` is
by default the final-norm hidden state at the last position (the paper's output
embedding), the residual stream ``h_l`` at a boundary ``l`` (see
:mod:`toolkit.backends.base`), a block's attention or MLP output (``"attn.l"``,
``"mlp.l"``), or ``h_{l+1}`` as a function of ``h_l`` for one layer's own transform
(``"layer.l"``, where ``x = h_l``); see :mod:`toolkit.jacobian.targets`. The model is run
from ``x`` through ``inputs_embeds`` (or by replacing block ``l``'s input); for GPT-2 the
position embedding is already inside ``x``, so the model's own ``wpe`` is zeroed for the call.

Rows of ``J = dy/dx`` are batched vector-Jacobian products, ``chunk_size`` output
dimensions per backward pass (``autograd.grad(..., is_grads_batched=True)``), so memory
stays bounded by one chunk; ``mode="forward"`` builds the columns from batched JVPs instead
(cheaper when ``T * d_in < d_out``). With the freeze on, the map is affine: the constant
``c = F(0)`` is evaluated with the factors recorded at ``x`` held fixed, and
``y = sum_i J_i x_i + c`` holds to float rounding.

Precision: ``J``, ``y``, ``x`` and ``c`` come in the model's dtype; the reconstruction error is
evaluated in float64, so it measures the dtype's own rounding (SmolLM2: ~5e-7 float32, ~1e-3
float16, ~1e-2 bfloat16). On a model split across devices (accelerate ``device_map``) ``J`` is
built on the input's device, and ``y`` and ``c`` are brought there.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = tiny_hf_model("llama")
    >>> result = detached_jacobian(model, torch.tensor([1, 2, 3, 4]))
    >>> result.jacobian.shape, result.reconstruction_error < 1e-5
    (torch.Size([4, 64, 64]), True)
    >>> detached_jacobian(model, torch.tensor([1, 2, 3]), target="mlp.1").reconstruction_error < 1e-5
    True
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from toolkit.metrics import require_eval_mode
from toolkit.backends import hf_model_of, library_wrapper
from toolkit.jacobian.freeze import detached as frozen
from toolkit.jacobian.budget import JacobianEstimate, check_fits
from toolkit.jacobian.guards import Checks
from toolkit.jacobian.operator import Mode, batched_vjp, frozen_operator, jacobian_by_rows
from toolkit.jacobian.result import DetachedJacobian
from toolkit.jacobian.targets import (Target, TargetSpec, _as_ids, input_embeddings, resolve_target,
                                      state_function, target_input)
from toolkit.models.architectures import spec_for
from toolkit.prompts import Prompt, single_sequence

PROGRESS_AFTER_S = 5.0  # show a progress bar by default when the estimate exceeds this

__all__ = ["Target", "input_embeddings", "target_function", "model_target_function", "target_path", "jacobian_rows", "linear_map",
           "detached_jacobian", "jacobian_terms", "JacobianTerms", "build_result", "ordinary_jacobian"]


def target_function(hf_model: nn.Module, target: Target = "output", position: int = -1, *,
                    input_ids: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``f(x) -> y``: from the target's input ``x`` (``[T, d]``) to the target state at ``position`` (``[d]``).

    Runs the base model on ``x`` and reads the target with a forward hook (the final norm for
    ``"output"``, block ``l-1`` for boundary ``l``, the sublayer for ``"attn.l"``/``"mlp.l"``),
    stopping once it is read; ``"layer.l"`` needs ``input_ids`` (see
    :func:`toolkit.jacobian.targets.state_function`). Frozen or not depends on whether it is
    called inside :func:`toolkit.jacobian.freeze.detached`.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> f = target_function(model, target=1)
        >>> f(input_embeddings(model, torch.tensor([1, 2, 3]))).shape
        torch.Size([64])
    """
    return state_function(hf_model, target, input_ids=input_ids, position=position)


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
    return jacobian_by_rows(lambda u: batched_vjp(y, x, u, chunk_size), y.shape[0], tuple(x.shape), chunk_size,
                            dtype=y.dtype, device=y.device)


@contextmanager
def linear_map(hf_model: nn.Module, x_star: Tensor, target: Target = "output", position: int = -1, *,
               input_ids: Tensor | None = None) -> Iterator[Callable[[Tensor], Tensor]]:
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
    f = target_function(hf_model, target, position, input_ids=input_ids)
    with frozen(hf_model) as freeze:
        with freeze.recording(), torch.no_grad():
            f(x_star)
        with freeze.replaying():
            yield f


def model_target_function(model: Any, ids: Tensor, spec: TargetSpec, position: int = -1,
                          ) -> tuple[Callable[[Tensor], Tensor], Tensor, dict]:
    """``(f, x, settings)`` for a target: the path is chosen here, never by the caller.

    A model seen through a library (a toolkit backend, an nnsight wrapper, a TransformerBridge)
    runs ``f`` through that library's own hooking where it has a path for the target
    (:meth:`~toolkit.backends.base.Backend.target_function`: ``"output"`` and ``"resid.l"``), with
    ``x = h_0`` read through it too; every other target, and a bare HF model, is driven directly
    (:func:`~toolkit.jacobian.targets.state_function`). ``settings`` names the path taken.

    Example:
        >>> import torch
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
        >>> spec = resolve_target(model.hf_model, "output")
        >>> f, x, settings = model_target_function(model, torch.tensor([1, 2, 3]), spec)
        >>> settings, f(x).shape
        ({'backend': 'nnsight'}, torch.Size([64]))
    """
    f, x, settings, _ = target_path(model, ids, spec, position)
    return f, x, settings


def target_path(model: Any, ids: Tensor, spec: TargetSpec, position: int = -1,
                ) -> tuple[Callable[[Tensor], Tensor], Tensor, dict, nn.Module]:
    """:func:`model_target_function` plus the module tree ``f`` runs, which a detached Jacobian freezes:
    the backend's :attr:`~toolkit.backends.base.Backend.frozen_module` on its own path (a
    ``HookedTransformer`` holds its own weights), the HF model when driven directly.

    Example:
        >>> import torch
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
        >>> f, x, settings, owner = target_path(model, torch.tensor([1, 2]), resolve_target(model.hf_model, "output"))
        >>> owner is model.hf_model
        True
    """
    backend = library_wrapper(model)
    hf_model = hf_model_of(model)
    if backend is not None:
        f = backend.target_function(ids, spec.kind, spec.layer, position)
        if f is not None:
            x = backend.hidden_states(ids[None], layers=[0])[0, 0].detach()  # h_0 through the library: [T, d]
            return f, x, {"backend": backend.name}, backend.frozen_module
    return (state_function(hf_model, spec, input_ids=ids, position=position), target_input(hf_model, ids, spec), {},
            hf_model)


def detached_jacobian(model: Any, prompt: Prompt, *, target: Target = "output", position: int = -1,
                      detached: bool = True, chunk_size: int = 64, mode: Mode = "reverse",
                      model_id: str | None = None, strict: bool = True, progress: bool | None = None,
                      memory_budget: int | None = None) -> DetachedJacobian:
    """The detached Jacobian ``J_i = dy/dx_i`` for every input position, with ``y``, ``x`` and ``c``.

    Args:
        model: the loaded model (:func:`toolkit.load_model`, any backend), a plain HF causal LM,
            an nnsight wrapper or a TransformerBridge, in eval mode. The computation path is
            chosen by target (:func:`model_target_function`); the results agree to float rounding.
        prompt: one sequence: text (needs a tokenizer: a loaded model has one), token ids
            ``[T]`` / ``[1, T]`` or a list of ints (:func:`toolkit.prompts.ensure_tokens`).
        target: ``"output"`` (final-norm state, the paper's output embedding), ``"resid.l"``
            (boundary ``l``; or the int ``l``), ``"attn.l"`` / ``"mlp.l"`` (block ``l``'s sublayer
            outputs), or ``"block.l"`` (block ``l``'s own transform: ``x = h_l``); TransformerLens
            hook names work too (:mod:`toolkit.jacobian.targets`).
        position: which position's ``y`` (default the last).
        detached: ``False`` gives the ordinary Jacobian of the same map (for contrast); its
            ``c`` is the unfrozen model at zero input, so its reconstruction is not exact.
        chunk_size: rows (reverse) or columns (forward) per batched pass (memory bound).
        mode: ``"reverse"`` (``d_out`` VJPs, the default) or ``"forward"`` (``T * d_in`` JVPs).
        strict: a model the freeze cannot see through (hooks, instance ``forward`` overrides), or
            a result whose frozen output or reconstruction misses the dtype's tolerance, raises
            (see :mod:`toolkit.jacobian.guards`); ``False`` returns it with a warning recorded in
            ``result.settings["warnings"]``.
        progress: a ``tqdm`` bar over the row chunks (default: when the estimate exceeds a few seconds).
        memory_budget: bytes the computation may use (default: the memory available now); a
            prompt whose Jacobian would not fit is refused before any work
            (:func:`toolkit.jacobian.budget.check_fits`), naming the matrix-free route.

    Returns:
        a :class:`~toolkit.jacobian.result.DetachedJacobian`: ``jacobian`` ``[T, d_out, d_in]``,
        ``x``, ``y``, ``c`` and ``reconstruction_error``.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> r = detached_jacobian(tiny_hf_model("gpt2"), [4, 8, 15], target="resid.1")
        >>> r.reconstruction_error < 1e-5, r.jacobian.shape   # GPT-2 is affine: c carries the biases
        (True, torch.Size([3, 64, 64]))
        >>> r = detached_jacobian(tiny_hf_model("llama"), torch.tensor([4, 8, 15]), target="block.1")
        >>> r.settings["input"], r.reconstruction_error < 1e-5   # x = h_1, y = h_2 at the last position
        ('h_1', True)
    """
    hf_model = hf_model_of(model)
    require_eval_mode(hf_model)
    ids = single_sequence(model, prompt)
    spec = resolve_target(hf_model, target)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    check_fits(hf_model, ids.numel(), chunk_size=chunk_size, memory_budget=memory_budget)  # before any model run
    f, x, path, owner = target_path(model, ids, spec, position)
    terms = jacobian_terms(hf_model, f, x, freeze=owner, detached=detached, chunk_size=chunk_size, mode=mode, strict=strict,
                           progress=progress, memory_budget=memory_budget)
    model_id = model_id or getattr(getattr(library_wrapper(model), "info", None), "model_id", None)
    return build_result(hf_model, ids, x, *terms, target=spec.name, position=position, detached=detached,
                        chunk_size=chunk_size, model_id=model_id, checks=terms.checks, input=spec.input_name,
                        mode=mode, **path)


@dataclass
class JacobianTerms:
    """``(y, J, c)`` (unpacks as that triple) and the :class:`~toolkit.jacobian.guards.Checks` they passed."""

    y: Tensor
    jacobian: Tensor
    c: Tensor
    checks: Checks = field(default_factory=Checks)
    estimate: JacobianEstimate | None = None

    def __iter__(self):
        return iter((self.y, self.jacobian, self.c))


def jacobian_terms(hf_model: nn.Module, f: Callable[[Tensor], Tensor], x: Tensor, *, detached: bool = True,
                   chunk_size: int = 64, mode: Mode = "reverse", strict: bool = True, progress: bool | None = None,
                   memory_budget: int | None = None, freeze: nn.Module | None = None) -> JacobianTerms:
    """``(y, J, c)`` of any ``f: x [T, d] -> y [d_out]`` that runs ``hf_model``, frozen or not.

    ``freeze``: the module tree ``f`` really runs, when it is not ``hf_model`` (a ``HookedTransformer``
    holds its own weights; see :func:`target_path`); ``hf_model`` still sizes the estimate.

    This is the one place where the freeze, the chunked rows (or columns) and the constant
    term meet, through :func:`toolkit.jacobian.operator.frozen_operator`; the direct path
    and the backend paths (:func:`model_target_function`) only differ in ``f``. Detached: the factors are
    recorded at ``x`` and ``c = F(0)`` replays them; ordinary: ``c`` is the plain model at zero. ``J`` is
    ``[T, d_out, d_in]``. The operator's checks (live output, affinity; see
    :func:`~toolkit.jacobian.operator.frozen_operator`) come back in ``.checks`` for :func:`build_result`,
    which adds the dense reconstruction check.

    Before any model run, the time and memory are estimated (:func:`toolkit.jacobian.budget.check_fits`):
    a Jacobian that would not fit in ``memory_budget`` bytes (default: the memory available now)
    is refused with :class:`~toolkit.jacobian.budget.JacobianTooLargeError`, naming the estimate and
    the matrix-free route. ``progress``: a ``tqdm`` bar over the row chunks (default: when the
    estimate exceeds a few seconds). The estimate comes back in ``.estimate``.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> x = input_embeddings(model, torch.tensor([1, 2, 3]))
        >>> y, J, c = jacobian_terms(model, target_function(model), x)
        >>> J.shape, float(c.norm())   # bias-free Llama: no constant term
        (torch.Size([3, 64, 64]), 0.0)
    """
    estimate = check_fits(hf_model, x.shape[0], chunk_size=chunk_size, memory_budget=memory_budget)
    progress = estimate.seconds > PROGRESS_AFTER_S if progress is None else progress
    with frozen_operator(hf_model if freeze is None else freeze, f, x, detached=detached, chunk_size=chunk_size,
                         strict=strict) as op:
        y = op.y
        if y.ndim != 1:
            raise ValueError(f"y must be a vector [d_out], got shape {tuple(y.shape)}.")
        d_out = y.shape[0]
        if mode == "reverse":  # rows written in place: peak memory = J + one chunk
            jac = jacobian_by_rows(op.vjp, d_out, tuple(x.shape), chunk_size, dtype=y.dtype, device=x.device,
                                   progress=progress)
        else:
            jac = op.dense(mode, progress=progress).reshape(d_out, *x.shape).movedim(0, -2).contiguous()
        c = op.constant()
    return JacobianTerms(y.detach(), jac.detach(), c.detach(), op.checks, estimate)


def build_result(hf_model: nn.Module, ids: Tensor, x: Tensor, y: Tensor, jac: Tensor, c: Tensor, *,
                 target: Target, position: int, detached: bool, chunk_size: int, model_id: str | None = None,
                 checks: Checks | None = None, strict: bool = True, **extra_settings) -> DetachedJacobian:
    """Wrap ``(x, y, J, c)`` in a :class:`DetachedJacobian` with the settings that made it, once checked.

    ``extra_settings`` (e.g. ``backend="nnsight"``) are added to ``settings``. Every route ends
    here, so this is where a detached result's reconstruction error is held to the dtype's bound
    (:data:`toolkit.jacobian.guards.TOLERANCES`): above it, :class:`~toolkit.jacobian.guards.FreezeCheckError`
    (``strict``, or the strictness of ``checks``, the earlier checks' record), else a warning in
    ``settings["warnings"]``. ``settings["checks"]`` holds the measured errors and the bounds.

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
    # On a model split across devices y and c come out where the target is read, x where it goes in.
    device = jac.device
    result = DetachedJacobian(jacobian=jac.detach(), y=y.detach().to(device), x=x.detach().to(device),
                              c=c.detach().to(device), token_ids=ids.cpu(), settings=settings)
    checks = checks if checks is not None else Checks(strict=strict, dtype=x.dtype)
    if detached:  # the ordinary Jacobian's reconstruction is not exact by design
        checks.check("reconstruction", result.reconstruction_error)
    settings.update(checks.as_settings())
    return result


def ordinary_jacobian(hf_model: nn.Module, input_ids: Tensor, **kwargs) -> DetachedJacobian:
    """The ordinary (not detached) Jacobian of the same map: :func:`detached_jacobian` with the freeze off.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> ordinary_jacobian(tiny_hf_model("llama"), torch.tensor([1, 2, 3])).reconstruction_error > 1e-3
        True
    """
    return detached_jacobian(hf_model, input_ids, detached=False, **kwargs)
