"""The result of a Jacobian computation: a plain dataclass, saved and loaded as a checked folder
(:mod:`toolkit.persist`: ``result.json`` with the settings and versions, ``tensors.safetensors``).

Example:
    >>> import torch
    >>> r = DetachedJacobian(jacobian=torch.eye(2)[None], y=torch.ones(2), x=torch.ones(1, 2),
    ...                      c=torch.zeros(2), token_ids=torch.tensor([7]), settings={"detached": True})
    >>> r.reconstruction_error
    0.0
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from toolkit.metrics import relative_error
from toolkit.persist import Parts, SavedResult

if TYPE_CHECKING:
    from toolkit.jacobian.analysis import JacobianSVD

KIND = "toolkit.jacobian.DetachedJacobian"
_TENSORS = ("jacobian", "y", "x", "c", "token_ids")


@dataclass
class DetachedJacobian(SavedResult):
    """``y = sum_i J_i x_i + c`` for one prompt.

    Fields:
        jacobian: ``[T, d_out, d_in]``, ``J_i = dy/dx_i`` for each input position ``i``.
        y: ``[d_out]`` the target state at one position (final-norm state, residual stream at a
           boundary, a block's attention or MLP output, or ``h_{l+1}``; see
           :mod:`toolkit.jacobian.targets`).
        x: ``[T, d_in]`` the input: the embeddings ``h_0`` (first block's input), or ``h_l`` for a
           block's own transform (target ``"block.l"``; ``settings["input"]`` says which).
        c: ``[d_out]`` the constant term: the map at zero input (detached: with the factors of ``x``
           held fixed), so that the reconstruction is exact for affine frozen models (GPT-2, Pythia)
           and ``c ~ 0`` for bias-free ones (Llama-style).
        token_ids: ``[T]``.
        settings: how it was made (model type, target, position, detached, chunk size, dtype, notes).
        reconstruction_error: ``||sum_i J_i x_i + c - y|| / ||y||`` (computed if not given).
    """

    jacobian: Float[Tensor, "T d_out d_in"]
    y: Float[Tensor, "d_out"]
    x: Float[Tensor, "T d_in"]
    c: Float[Tensor, "d_out"]
    token_ids: Int[Tensor, "T"]
    settings: dict[str, Any] = field(default_factory=dict)
    reconstruction_error: float | None = None

    def __post_init__(self) -> None:
        T, d_out, d_in = self.jacobian.shape
        if self.x.shape != (T, d_in) or self.y.shape != (d_out,) or self.c.shape != (d_out,):
            raise ValueError(f"inconsistent shapes: jacobian {tuple(self.jacobian.shape)}, x {tuple(self.x.shape)}, "
                             f"y {tuple(self.y.shape)}, c {tuple(self.c.shape)}; expected x [T, d_in], y and c [d_out].")
        if self.reconstruction_error is None:
            self.reconstruction_error = relative_error(self.reconstruction(), self.y)

    @classmethod
    def random(cls, T: int = 2, d_out: int = 4, d_in: int | None = None, *, seed: int = 0,
               settings: dict[str, Any] | None = None) -> "DetachedJacobian":
        """A result of the right shapes filled with seeded random numbers (no model): for examples and
        for testing code that consumes results. ``c`` is zero, ``token_ids`` are ``1..T``.

        Example:
            >>> r = DetachedJacobian.random(T=3, d_out=4, d_in=5)
            >>> tuple(r.jacobian.shape), tuple(r.x.shape)
            ((3, 4, 5), (3, 5))
        """
        d_in = d_out if d_in is None else d_in
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(T, d_out, d_in, generator=g), torch.randn(d_out, generator=g),
                   torch.randn(T, d_in, generator=g), torch.zeros(d_out), torch.arange(1, T + 1),
                   settings=dict(settings or {}))

    @property
    def detached(self) -> bool:
        """Whether the nonlinear factors were detached (False: the ordinary Jacobian)."""
        return bool(self.settings.get("detached", True))

    def reconstruction(self) -> Tensor:
        """``sum_i J_i x_i + c`` in float64: ``[d_out]``.

        Example:
            >>> r = DetachedJacobian(torch.eye(2)[None], torch.ones(2), torch.ones(1, 2), torch.zeros(2),
            ...                      torch.tensor([3]))
            >>> r.reconstruction().tolist()
            [1.0, 1.0]
        """
        return torch.einsum("toi,ti->o", self.jacobian.double(), self.x.double()) + self.c.double()

    def contributions(self) -> Tensor:
        """Per-position terms ``J_i x_i``: ``[T, d_out]`` (they sum to ``y - c``).

        Example:
            >>> r = DetachedJacobian(torch.eye(2)[None], torch.ones(2), torch.ones(1, 2), torch.zeros(2),
            ...                      torch.tensor([3]))
            >>> r.contributions().shape
            torch.Size([1, 2])
        """
        return torch.einsum("toi,ti->to", self.jacobian, self.x)

    # ----- persistence (toolkit.persist: .save(path), DetachedJacobian.load(path)) -------------
    KIND = KIND
    NOUN = "DetachedJacobian"

    def _to_parts(self) -> Parts:
        return Parts(fields={"reconstruction_error": self.reconstruction_error},
                     tensors={name: getattr(self, name) for name in _TENSORS})

    @classmethod
    def _from_parts(cls, parts: Parts) -> "DetachedJacobian":
        return cls(**{name: parts.tensors[name] for name in _TENSORS}, settings=parts.fields["settings"],
                   reconstruction_error=parts.fields["reconstruction_error"])

    def svd(self, model: Any, *, top_k: int = 5, n_vectors: int = 3, n_rows: int = 3) -> "JacobianSVD":
        """SVD of each ``J_i`` decoded to tokens with ``model``'s vocabulary (:mod:`toolkit.jacobian.analysis`).

        ``model`` is the loaded model the Jacobian came from (any backend; a bare HF model needs
        :func:`toolkit.make_backend` with its tokenizer for the token strings).

        Example:
            >>> import toolkit
            >>> jac = toolkit.detached_jacobian(model, "The bridge out of Marin is the")
            >>> jac.svd(model).top_tokens(position=1, k=5)       # u_1 of J at " bridge", through W_U
            [' Highway', ' bridge', ' Link', ' Pipeline', ' connecting']
        """
        from toolkit.backends import as_backend
        from toolkit.jacobian.analysis import analyze_with_model
        return analyze_with_model(self, as_backend(model), top_k=top_k, n_vectors=n_vectors, n_rows=n_rows)

    def report(self, path: str | Path, model: Any, *, ordinary: "DetachedJacobian | None" = None,
               title: str | None = None) -> Path:
        """The self-contained HTML report (reconstruction, spectra, decoded singular vectors); ``model``
        decodes the vectors to tokens (:meth:`svd`).

        Example:
            >>> jac.report(tmp / "report.html", model).name
            'report.html'
        """
        from toolkit.jacobian.report import write_jacobian_report
        title = title or f"Detached Jacobian of {self.settings.get('target', 'output')} " \
                         f"({self.settings.get('model_id', '')})"
        return write_jacobian_report(path, title, self, ordinary, self.svd(model))

    def figure(self, ordinary: "DetachedJacobian | None" = None, max_points: int = 5000):
        """``y`` against ``sum_i J_i x_i + c`` (exact on the diagonal), with an ordinary Jacobian for contrast.

        Example:
            >>> jac.figure().layout.xaxis.title.text is not None
            True
        """
        from toolkit.plots.jacobian import reconstruction_scatter
        return reconstruction_scatter(self, ordinary, max_points=max_points)

    def __repr__(self) -> str:
        T, d_out, d_in = self.jacobian.shape
        what = "detached" if self.detached else "ordinary"
        return (f"DetachedJacobian({what}, target={self.settings.get('target')!r}, T={T}, d_out={d_out}, "
                f"d_in={d_in}, rel_err={self.reconstruction_error:.2e})")
