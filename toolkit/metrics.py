"""Shared numeric checks: the relative error (one argument order everywhere) and the eval-mode check.

Example:
    >>> import torch
    >>> relative_error(torch.tensor([3.0, 3.0]), torch.tensor([3.0, 4.0]))   # estimate, reference
    0.2
    >>> relative_error(torch.tensor([[3.0, 3.0], [1.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.0, 0.0]]), dim=-1)
    tensor([0.2000,    nan])
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["relative_error", "require_eval_mode"]


def relative_error(estimate: Tensor, reference: Tensor, *, dim: int | None = None) -> float | Tensor:
    """``||estimate - reference|| / ||reference||``.

    ``dim=None``: one number over the whole tensors, computed in float64 (a Python float; a zero
    reference gives ``inf`` unless the estimate matches it). ``dim=-1``: one value per row, in the
    inputs' dtype, ``NaN`` where the reference row is zero.

    Example:
        >>> relative_error(torch.zeros(2), torch.zeros(2))
        0.0
    """
    if dim is None:
        ref = reference.detach().double()
        err = (estimate.detach().double() - ref).norm()
        if float(err) == 0.0:
            return 0.0
        return float(err / ref.norm()) if float(ref.norm()) > 0 else float("inf")
    err, denom = (estimate - reference).norm(dim=dim), reference.norm(dim=dim)
    return torch.where(denom > 0, err / torch.where(denom > 0, denom, 1), torch.full_like(err, float("nan")))


def require_eval_mode(model: nn.Module) -> None:
    """Refuse a model in training mode: dropout would make every forward pass (and Jacobian) random.

    Example:
        >>> require_eval_mode(nn.Linear(2, 2).train())
        Traceback (most recent call last):
        ...
        ValueError: the model is in training mode (dropout active); call model.eval() first.
    """
    if model.training:
        raise ValueError("the model is in training mode (dropout active); call model.eval() first.")
