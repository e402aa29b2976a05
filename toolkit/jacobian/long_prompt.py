"""The route for a prompt's Jacobian: dense (every ``J_i``) or matrix-free top-``k``, chosen before any work.

A dense Jacobian grows as ``T * d^2`` and its autograd graph as ``T^2`` (see
:mod:`toolkit.jacobian.budget`); the matrix-free top-``k`` SVD of the whole-prompt map
``[J_1 ... J_T]`` (:func:`toolkit.jacobian.matrix_free.jacobian_svd`) needs ``O(k T d)`` memory
and a few dozen products. :func:`choose_route` takes the dense route unless the estimate says it
would not fit or would take long (``"auto"``), or obeys the caller (``"full"``,
``"matrix-free"``); :func:`matrix_free_summary` is what the matrix-free route reports.

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> choose_route(tiny_hf_model("llama"), 8, memory_budget=2**30).route
    'full'
    >>> choice = choose_route(tiny_hf_model("llama"), 8, memory_budget=2**10)
    >>> choice.route, choice.reason[:25]
    ('matrix-free', 'it would not fit: dense J')
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from toolkit.jacobian.budget import JacobianEstimate, estimate_jacobian, prefer_matrix_free

Route = Literal["auto", "full", "matrix-free"]
ROUTES: tuple[str, ...] = ("auto", "full", "matrix-free")


@dataclass(frozen=True)
class RouteChoice:
    """``route`` (``"full"`` or ``"matrix-free"``), why (``reason``), and the dense ``estimate`` behind it."""

    route: str
    reason: str
    estimate: JacobianEstimate


def choose_route(hf_model: nn.Module, n_tokens: int, *, route: Route = "auto", chunk_size: int = 64,
                 memory_budget: int | None = None, max_seconds: float = 120.0) -> RouteChoice:
    """Dense or matrix-free for an ``n_tokens`` prompt: ``"auto"`` goes matrix-free when the dense
    Jacobian would not fit in ``memory_budget`` (default: available now) or take over ``max_seconds``.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> choose_route(tiny_hf_model("llama"), 8, route="matrix-free").reason
        'asked for (--matrix-free)'
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}.")
    est = estimate_jacobian(hf_model, n_tokens, chunk_size=chunk_size, available_bytes=memory_budget,
                            measure_available=memory_budget is None)
    if route == "full":
        return RouteChoice("full", "asked for (--full)", est)
    if route == "matrix-free":
        return RouteChoice("matrix-free", "asked for (--matrix-free)", est)
    why = prefer_matrix_free(est, max_seconds=max_seconds)
    if why is None:
        return RouteChoice("full", f"the dense Jacobian fits: {est.describe()}", est)
    return RouteChoice("matrix-free", why, est)


def matrix_free_summary(model, input_ids: Tensor, *, target: Any = "output", k: int = 3, top_k: int = 5,
                        chunk_size: int = 64) -> dict[str, Any]:
    """Top-``k`` singular triplets of ``[J_1 ... J_T]`` for a backend ``model``, decoded, as plain data.

    Per singular vector: its value, the output tokens its left vector promotes (through ``W_U``,
    or the final norm's readout for non-output targets) and the input positions carrying most of
    its right vector (share of ``||V||^2`` per position).

    Example:
        >>> s = matrix_free_summary(model, ids, k=2)
        >>> len(s["singular_values"]), s["vectors"][0]["top_positions"][0]["token"] in model.to_str_tokens(ids)
        (2, True)
    """
    from toolkit.jacobian.analysis import decode_output_directions, residual_readout
    from toolkit.jacobian.matrix_free import jacobian_svd

    ids = torch.as_tensor(input_ids).reshape(-1)
    top = jacobian_svd(model.hf_model, ids, target=target, k=k, chunk_size=chunk_size)
    with torch.no_grad():
        W_U = model.W_U if top.settings["target"] == "output" else residual_readout(model.final_norm, model.W_U)
        decoded = decode_output_directions(top.U.T, W_U.detach(), lambda i: model.to_str_tokens([i])[0], k=top_k)
    share = top.V.double().pow(2).sum(1)  # [T, k]: how much of each right vector sits at each position
    str_tokens = model.to_str_tokens(ids)
    vectors = []
    for j, (tokens, token_ids, scores) in enumerate(decoded):
        order = share[:, j].argsort(descending=True)[: min(5, len(ids))].tolist()
        vectors.append({"sigma": float(top.singular_values[j]), "output_tokens": tokens, "output_scores": scores,
                        "top_positions": [{"position": t, "token": str_tokens[t], "share": float(share[t, j])}
                                          for t in order]})
    return {"route": "matrix-free", "target": top.settings["target"], "n_tokens": len(ids),
            "singular_values": [float(s) for s in top.singular_values], "vectors": vectors,
            "products": {"jvp": top.n_jvp, "vjp": top.n_vjp, "converged": top.converged},
            "checks": top.settings.get("checks"), "warnings": top.settings.get("warnings", [])}
