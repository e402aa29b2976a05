"""Where the detached nonlinear factors of one forward pass live.

A frozen module never computes its nonlinear factor (a norm's ``1/sqrt(var + eps)``, an
activation's gate, an attention pattern's queries and keys, Mamba's ``Δ, B, C``) inside
autograd: it asks the :class:`FactorStore` for it. The store has three modes:

* ``live``   — compute the factor from the current input, detached (the default);
* ``record`` — the same, and keep it under its site key (``"model.layers.0.mlp:gate"``);
* ``replay`` — ignore the current input and hand back the recorded factor.

Replay makes the frozen model an honest linear (affine) map of its input: the factors
captured at ``x*`` stay fixed while the input changes, which is how the constant term
``c = F(0)`` and the freeze-invariance tests are computed.

Example:
    >>> import torch
    >>> store = FactorStore()
    >>> x = torch.tensor([1.0, -2.0])
    >>> with store.mode_as("record"):
    ...     s = store.get("norm:scale", lambda: x.abs().max())
    >>> with store.mode_as("replay"):
    ...     store.get("norm:scale", lambda: torch.tensor(99.0)).item()
    2.0
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor

Mode = Literal["live", "record", "replay"]


class FactorReplayError(RuntimeError):
    """A replayed forward asked for a factor that was not recorded, or of another shape."""


class FactorStore:
    """Detached factors keyed by site; see the module docstring for the three modes."""

    def __init__(self) -> None:
        self.mode: Mode = "live"
        self.factors: dict[str, Tensor] = {}

    def get(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """The detached factor for ``key``: computed now (live/record) or recorded (replay).

        Example:
            >>> FactorStore().get("act:gate", lambda: torch.ones(2)).requires_grad
            False
        """
        if self.mode == "replay":
            if key not in self.factors:
                raise FactorReplayError(f"no recorded factor for site {key!r}: record a forward pass with the "
                                        f"same modules and sequence length before replaying.")
            return self.factors[key]
        with torch.no_grad():  # a factor is a constant of the linear map: never part of the graph
            value = compute().detach()
        if self.mode == "record":
            self.factors[key] = value
        return value

    @contextmanager
    def mode_as(self, mode: Mode) -> Iterator["FactorStore"]:
        """Switch mode for the duration of a block, restoring the previous mode after.

        Example:
            >>> store = FactorStore()
            >>> with store.mode_as("record"):
            ...     store.mode
            'record'
        """
        if mode not in ("live", "record", "replay"):
            raise ValueError(f"unknown factor mode {mode!r}; use 'live', 'record' or 'replay'.")
        if mode == "record":
            self.factors = {}  # a recording describes exactly one forward pass
        previous, self.mode = self.mode, mode
        try:
            yield self
        finally:
            self.mode = previous
