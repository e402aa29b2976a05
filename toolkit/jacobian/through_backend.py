"""Deprecated names for the Jacobian through a backend's own hooking (kept for one release).

The path choice now lives in the library: :func:`toolkit.detached_jacobian` takes the loaded
model (any backend) and runs ``f: h_0 -> y`` through the backend's own hooking
(:meth:`toolkit.backends.base.Backend.target_function`: an nnsight trace, TransformerLens hooks)
wherever it has one, the HF model directly otherwise (:func:`toolkit.jacobian.compute.model_target_function`).

Example:
    >>> import warnings, torch
    >>> from toolkit.backends import make_backend
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     r = backend_jacobian(model, torch.tensor([1, 2, 3]))
    >>> r.settings["backend"], r.reconstruction_error < 1e-5
    ('nnsight', True)
"""
from __future__ import annotations

import warnings
from typing import Callable

from torch import Tensor

from toolkit.backends.base import Backend
from toolkit.jacobian.compute import detached_jacobian
from toolkit.jacobian.result import DetachedJacobian
from toolkit.jacobian.targets import Target, resolve_target
from toolkit.metrics import require_eval_mode
from toolkit.prompts import single_sequence

__all__ = ["backend_jacobian", "backend_target_function"]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new} (the same result, path chosen by target).",
                  DeprecationWarning, stacklevel=3)


def _backend_target(model: Backend, target: Target):
    spec = resolve_target(model.hf_model, target) if not isinstance(target, int) or \
        0 <= target <= model.n_layers else None
    if spec is None or spec.kind not in ("output", "resid"):
        raise ValueError(f"target {target!r} is not 'output' or a layer boundary 0..{model.n_layers} "
                         f"(0 = embeddings, {model.n_layers} = last block output before the final norm); "
                         f"toolkit.detached_jacobian takes every target.")
    return spec


def backend_target_function(model: Backend, input_ids: Tensor, target: Target = "output",
                            position: int = -1) -> Callable[[Tensor], Tensor]:
    """Deprecated: :meth:`Backend.target_function` (``f: h_0 -> y`` through the backend's hooks)."""
    _deprecated("backend_target_function", "model.target_function")
    spec = _backend_target(model, target)
    return model.target_function(single_sequence(model, input_ids), spec.kind, spec.layer, position)


def backend_jacobian(model: Backend, input_ids: Tensor, target: Target = "output", position: int = -1,
                     detached: bool = True, chunk_size: int = 64, **kwargs) -> DetachedJacobian:
    """Deprecated: :func:`toolkit.detached_jacobian` with the loaded model (``"output"`` / boundaries only)."""
    _deprecated("backend_jacobian", "toolkit.detached_jacobian(model, prompt, ...)")
    require_eval_mode(model.hf_model)
    _backend_target(model, target)
    return detached_jacobian(model, input_ids, target=target, position=position, detached=detached,
                             chunk_size=chunk_size, **kwargs)  # strict, progress, memory_budget
