"""Detached Jacobian (Golden 2025, "Large Language Models are Locally Linear Mappings").

* :mod:`~toolkit.jacobian.freeze_rules` — per module kind, how its nonlinear factor is detached;
* :mod:`~toolkit.jacobian.freeze` — ``detached(model)``: the reversible freeze;
* :mod:`~toolkit.jacobian.factors` — live / record / replay store of the detached factors;
* :mod:`~toolkit.jacobian.compute` — ``J_i = dy/dx_i`` by chunked batched VJPs, with ``y``, ``x``, ``c``;
* :mod:`~toolkit.jacobian.result` — the :class:`DetachedJacobian` result (save / load);
* :mod:`~toolkit.jacobian.bridge_rules` — TransformerBridge components made transparent while frozen;
* :mod:`~toolkit.jacobian.through_backend` — ``backend_jacobian``: the same Jacobian via nnsight / TransformerLens;
* :mod:`~toolkit.jacobian.analysis` — SVD per position, decoding to tokens, stable rank (``JacobianSVD``);
* :mod:`~toolkit.jacobian.run` — ``run_jacobian``: one prompt end to end (both Jacobians, SVD, files),
  its report and terminal text in :mod:`~toolkit.jacobian.report`;
* :mod:`~toolkit.jacobian.steering` — ``steer`` / ``steering_sweep``: steering with a concept prompt's
  detached Jacobian (eq. 16), results in :mod:`~toolkit.jacobian.steering_result`
  (``SteeringResult.report``: :mod:`~toolkit.jacobian.steering_report`);
* :mod:`~toolkit.jacobian.targets` — what a Jacobian is of: ``"output"``, boundaries, ``"attn.l"``, ``"mlp.l"``,
  ``"layer.l"`` (one block's own transform ``h_l -> h_{l+1}``);
* :mod:`~toolkit.jacobian.operator` — the frozen Jacobian as a matrix-free operator (batched JVPs / VJPs);
* :mod:`~toolkit.jacobian.matrix_free` — top-k SVD without forming ``J`` (``jacobian_svd``);
* :mod:`~toolkit.jacobian.all_layers` — every layer's Jacobian from one forward sweep or per-layer VJPs;
* :mod:`~toolkit.jacobian.layerwise` — per-layer spectra, stable / energy rank, overlap with the last layer;
* :mod:`~toolkit.jacobian.guards` — what the freeze cannot see (overrides, hooks) is refused; live-output and
  reconstruction checks against dtype bounds;
* :mod:`~toolkit.jacobian.budget` — time and memory of a dense Jacobian, estimated and refused before any work;
* :mod:`~toolkit.jacobian.long_prompt` — dense or matrix-free route for a prompt (the CLI's choice).
* :mod:`~toolkit.jacobian.audit` — ``check_freeze(model)``: every module's rule and the exactness checks
  on a probe prompt (``python -m toolkit check-freeze MODEL``).

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> r = detached_jacobian(tiny_hf_model("llama"), torch.tensor([1, 2, 3]))
    >>> r.reconstruction_error < 1e-5
    True
"""
from toolkit.jacobian.compute import (build_result, detached_jacobian, input_embeddings, jacobian_rows,
                                      jacobian_terms, linear_map, ordinary_jacobian, target_function)
from toolkit.jacobian.factors import FactorStore
from toolkit.jacobian.freeze import FreezeSession, UnsupportedModuleError, check_supported, detached
from toolkit.jacobian.freeze_rules import FreezeError, register_rule
from toolkit.jacobian.result import DetachedJacobian

__all__ = ["detached_jacobian", "ordinary_jacobian", "input_embeddings", "target_function", "jacobian_rows",
           "jacobian_terms", "build_result",
           "linear_map", "detached", "check_supported", "FreezeSession", "FactorStore", "UnsupportedModuleError",
           "FreezeError", "register_rule", "DetachedJacobian"]

from toolkit.jacobian.steering import ConceptOperator, steer, steering_sweep  # noqa: E402
from toolkit.jacobian.steering_result import SteeringResult, SteeringRun  # noqa: E402

__all__ += ["steer", "steering_sweep", "ConceptOperator", "SteeringResult", "SteeringRun"]

from toolkit.jacobian.all_layers import LayerJacobians, all_layer_jacobians  # noqa: E402
from toolkit.jacobian.layerwise import LayerwiseSpectra, layerwise_spectra  # noqa: E402
from toolkit.jacobian.matrix_free import TopSVD, jacobian_svd, randomized_svd  # noqa: E402
from toolkit.jacobian.operator import FrozenOperator, frozen_operator  # noqa: E402
from toolkit.jacobian.targets import resolve_target, target_input  # noqa: E402

__all__ += ["all_layer_jacobians", "LayerJacobians", "layerwise_spectra", "LayerwiseSpectra", "jacobian_svd",
            "randomized_svd", "TopSVD", "frozen_operator", "FrozenOperator", "resolve_target", "target_input"]

from toolkit.jacobian.audit import FreezeAudit, check_freeze  # noqa: E402

__all__ += ["check_freeze", "FreezeAudit"]

from toolkit.jacobian.budget import JacobianEstimate, JacobianTooLargeError, check_fits, estimate_jacobian  # noqa: E402
from toolkit.jacobian.guards import (FreezeCheckError, FreezeWarning, LiveModelError, affine_hook,  # noqa: E402
                                     inspect_model)

__all__ += ["estimate_jacobian", "check_fits", "JacobianEstimate", "JacobianTooLargeError", "inspect_model",
            "affine_hook", "LiveModelError", "FreezeCheckError", "FreezeWarning"]
