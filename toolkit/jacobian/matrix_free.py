"""Top-k SVD of a detached Jacobian without forming it: randomized block Krylov from JVPs and VJPs.

The whole-prompt map ``[J_1 ... J_T]`` (``d_out x T*d``) needs ``d_out`` VJPs to form, and
one layer's full transform ``h_l -> h_{l+1}`` (``T*d x T*d``) needs ``T*d``; its top singular
triplets need far fewer products. :func:`randomized_svd` builds a block Krylov subspace of
``J^T J`` from a random block ``Ω`` (``n x b``, ``b = k + oversample``):

    V_1 = orth(Ω),   V_{j+1} = orth(J^T orth(J V_j)  ⟂ V_1..V_j)

(one block of JVPs and one of VJPs per step), keeps every product it computed, and reads
the singular triplets off them by Rayleigh–Ritz, after every half step: ``J [V_1 ... V_j]``
is ``J`` restricted to the input subspace, ``J^T [U_1 ... U_j]`` (``U_j`` = orthonormalised
``J V_j``) to the output subspace half a step further; an SVD of either gives ``U``, ``S``,
``V``. It stops when the change of the top-``k`` values still to come, extrapolated as a
geometric series at the rate observed over the last two half steps, is below ``tol``
(relative), and the last change itself below ``4 * tol`` (so that a single lucky rate cannot
stop it early).
This is randomized subspace iteration with power steps, but keeping the whole Krylov
basis instead of only the last block, which converges several times faster for the same
number of products (Musco & Musco, NeurIPS 2015).

The products come from :class:`toolkit.jacobian.operator.FrozenOperator`: the freeze is on,
factors recorded at ``x`` and replayed, so the map is the detached Jacobian itself.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = tiny_hf_model("llama")
    >>> ids = torch.tensor([1, 2, 3, 4])
    >>> top = jacobian_svd(model, ids, k=4)                      # [J_1..J_4]: 64 x 256
    >>> from toolkit.jacobian.compute import detached_jacobian
    >>> J = detached_jacobian(model, ids).jacobian               # [T, 64, 64]
    >>> exact = torch.linalg.svdvals(J.permute(1, 0, 2).reshape(64, -1).double())[:4]
    >>> bool(((top.singular_values - exact).abs() / exact).max() < 1e-4)
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from toolkit.backends import hf_model_of
from toolkit.jacobian.operator import FrozenOperator, frozen_operator
from toolkit.jacobian.targets import Target, resolve_target, state_function, target_input
from toolkit.metrics import require_eval_mode
from toolkit.prompts import Prompt, single_sequence
from toolkit.persist import Parts, SavedResult

MatVec = Callable[[Tensor], Tensor]


@dataclass
class TopSVD(SavedResult):
    """Top-``k`` singular triplets of a Jacobian, ``J ≈ U diag(S) V^T`` on its top-``k`` part.

    Fields:
        singular_values: ``[k]`` descending (float64).
        U: ``[*out_shape, k]`` left singular vectors (output space).
        V: ``[*in_shape, k]`` right singular vectors (input space; ``[T, d, k]`` for a prompt).
        n_jvp / n_vjp: how many Jacobian-vector products of each kind were spent.
        n_blocks: Krylov blocks used; converged: whether the ``tol`` test was met.
        settings: the target, position, k, block size, tol, seed.
    """

    singular_values: Tensor
    U: Tensor
    V: Tensor
    n_jvp: int
    n_vjp: int
    n_blocks: int
    converged: bool
    settings: dict[str, Any] = field(default_factory=dict)

    def to_frame(self):
        """One row per singular triplet: index and value (the vectors stay in ``U`` / ``V``).

        Example:
            >>> top.to_frame().columns.tolist()
            ['index', 'singular_value']
        """
        import pandas as pd
        return pd.DataFrame({"index": range(len(self.singular_values)),
                             "singular_value": self.singular_values.tolist()})

    def report(self, path, title: str = "Top-k SVD of the detached Jacobian (matrix-free)"):
        """The singular values, figure and table, as one self-contained HTML page.

        Example:
            >>> top.report(tmp / "top.html").exists()
            True
        """
        from toolkit.jacobian.report import write_figure_report
        return write_figure_report(path, title, f"{self.n_jvp} JVPs and {self.n_vjp} VJPs; converged: "
                                   f"{self.converged}.", self.figure(), self.to_frame().to_dict("records"))

    def figure(self):
        """The top-``k`` singular values.

        Example:
            >>> len(top.figure().data[0].y)
            2
        """
        import plotly.graph_objects as go
        from toolkit.plots.style import finish
        fig = go.Figure(go.Bar(x=list(range(1, len(self.singular_values) + 1)), y=self.singular_values.tolist()))
        target = self.settings.get("target", "")
        return finish(fig, f"Top-{len(self.singular_values)} singular values, matrix-free ({target})",
                      "index", "singular value")

    # ----- persistence (toolkit.persist: .save(path), TopSVD.load(path)) ----------------------
    KIND = "toolkit.jacobian.TopSVD"
    NOUN = "TopSVD"
    _TENSORS = ("singular_values", "U", "V")
    _FIELDS = ("n_jvp", "n_vjp", "n_blocks", "converged")

    def _to_parts(self) -> Parts:
        return Parts(fields={n: getattr(self, n) for n in self._FIELDS},
                     tensors={n: getattr(self, n) for n in self._TENSORS})

    @classmethod
    def _from_parts(cls, parts: Parts) -> "TopSVD":
        return cls(**{n: parts.tensors[n] for n in cls._TENSORS}, **{n: parts.fields[n] for n in cls._FIELDS},
                   settings=parts.fields["settings"])

    def __repr__(self) -> str:
        s = ", ".join(f"{float(v):.4g}" for v in self.singular_values[:4])
        return (f"TopSVD(k={len(self.singular_values)}, S=[{s}{', ...' if len(self.singular_values) > 4 else ''}], "
                f"products={self.n_jvp} JVP + {self.n_vjp} VJP, converged={self.converged})")


def _orth(A: Tensor) -> Tensor:
    return torch.linalg.qr(A, mode="reduced").Q


def _extend(blocks: list[Tensor], new: Tensor, size: int) -> Tensor | None:
    """An orthonormal block spanning ``new`` minus its part in ``blocks`` (two passes of projection).

    Keeps at most ``size - used`` columns and drops directions that the projection removed
    (relative norm below 1e-8): the Krylov space cannot outgrow the ``size``-dim space.
    ``None`` when nothing new is left.
    """
    scale = new.norm(dim=0).clamp_min(1e-300)
    for _ in range(2):
        for B in blocks:
            new = new - B @ (B.T @ new)
    keep = new.norm(dim=0) / scale > 1e-8
    room = size - sum(B.shape[1] for B in blocks)
    new = new[:, keep][:, :max(room, 0)]
    if new.shape[1] == 0:
        return None
    Q = _orth(new)
    for B in blocks:  # one more pass: QR of a nearly dependent block can reintroduce old directions
        Q = _orth(Q - B @ (B.T @ Q))
    return Q


def randomized_svd(matvec: MatVec, rmatvec: MatVec, shape: tuple[int, int], k: int = 8, *,
                   oversample: int = 0, max_blocks: int = 16, tol: float = 1e-5, seed: int = 0,
                   dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Top-``k`` SVD of an ``m x n`` operator from ``matvec`` (``[n, b] -> [m, b]``) and ``rmatvec``.

    Returns ``(S [k], U [m, k], V [n, k], info)``; ``S``, ``U``, ``V`` in float64, ``info`` with
    ``n_matvec``, ``n_rmatvec``, ``n_blocks``, ``converged``. Products are requested in
    ``dtype`` (the operator's), the small dense algebra runs in float64.

    Example:
        >>> A = torch.randn(30, 8, dtype=torch.float64) @ torch.randn(8, 200, dtype=torch.float64)  # rank 8
        >>> S, U, V, info = randomized_svd(lambda X: A @ X, lambda Y: A.T @ Y, A.shape, k=3, dtype=torch.float64)
        >>> torch.allclose(S, torch.linalg.svdvals(A)[:3])
        True
    """
    m, n = shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k must be in 1..min(m, n) = {min(m, n)}, got {k}.")
    if oversample < 0 or max_blocks < 1:
        raise ValueError(f"need oversample >= 0 and max_blocks >= 1, got {oversample} and {max_blocks}.")
    b = min(k + oversample, n, m)
    gen = torch.Generator().manual_seed(seed)
    V = _orth(torch.randn(n, b, generator=gen, dtype=torch.float64))
    Vs: list[Tensor] = []   # input-side Krylov blocks (orthonormal together)
    JVs: list[Tensor] = []  # J V_j  (JVPs)
    Us: list[Tensor] = []   # output-side blocks: orth(J V_j) against the earlier ones
    JtUs: list[Tensor] = []  # J^T U_j  (VJPs)
    n_mv = n_rmv = 0
    previous = None
    converged = False

    changes: list[float] = []

    def settled(S: Tensor) -> bool:
        """Extrapolated remaining change below ``tol`` and the last change below ``4 * tol``."""
        if previous is None or len(S) != len(previous) or len(S) < k:
            return False
        changes.append(float(((S - previous).abs() / S.clamp_min(1e-300)).max()))
        if len(changes) < 2:
            return False
        rate = min(changes[-1] / max(changes[-2], 1e-300), 0.99)
        return changes[-1] < 4 * tol and changes[-1] * rate / (1 - rate) < tol

    for step in range(max_blocks):
        JV = matvec(V.to(dtype=dtype, device=device)).to(torch.float64).cpu()
        n_mv += V.shape[1]
        Vs.append(V)
        JVs.append(JV)
        S = torch.linalg.svdvals(torch.cat(JVs, dim=1))[:k]  # Ritz values on span(V_1..V_j)
        if settled(S):
            converged = True
            break
        previous = S
        U = _extend(Us, JV, m)
        if U is None:  # the output space is exhausted
            break
        JtU = rmatvec(U.to(dtype=dtype, device=device)).to(torch.float64).cpu()
        n_rmv += U.shape[1]
        Us.append(U)
        JtUs.append(JtU)
        S = torch.linalg.svdvals(torch.cat(JtUs, dim=1))[:k]  # on span(U_1..U_j): half a step further
        if settled(S):
            converged = True
            break
        previous = S
        V = None if step == max_blocks - 1 else _extend(Vs, JtU, n)
        if V is None:
            break
    # Both sides give lower bounds of the top-k values (interlacing): keep the larger.
    Uw, S, Wh = torch.linalg.svd(torch.cat(JVs, dim=1), full_matrices=False)  # J [V_1..V_j] = Ũ S W^T
    S, U_out, V_out = S[:k], Uw[:, :k], torch.cat(Vs, dim=1) @ Wh[:k].T
    side = "right"
    if JtUs:
        P, S_left, Qh = torch.linalg.svd(torch.cat(JtUs, dim=1), full_matrices=False)  # J^T [U_1..U_j] = P S Q^T
        if S_left[:k].sum() >= S.sum():
            S, U_out, V_out, side = S_left[:k], torch.cat(Us, dim=1) @ Qh[:k].T, P[:, :k], "left"
    info = {"n_matvec": n_mv, "n_rmatvec": n_rmv, "n_blocks": len(Vs), "converged": converged, "block_size": b,
            "ended_on": side}
    return S, U_out, V_out, info


def operator_svd(op: FrozenOperator, k: int = 8, **kwargs) -> TopSVD:
    """:func:`randomized_svd` of a :class:`~toolkit.jacobian.operator.FrozenOperator` (use inside its block).

    Example:
        >>> with frozen_operator(tiny, tiny_f, tiny_x) as op:
        ...     top = operator_svd(op, k=3)
        ...     S = torch.linalg.svdvals(op.dense())
        >>> torch.allclose(top.singular_values.float(), S[:3], rtol=1e-3)
        True
    """
    S, U, V, info = randomized_svd(op.matvec, op.rmatvec, op.shape, k, dtype=op.x.dtype, device=op.x.device,
                                   **kwargs)
    return TopSVD(singular_values=S, U=U.T.reshape(-1, *op.out_shape).movedim(0, -1),
                  V=V.T.reshape(-1, *op.in_shape).movedim(0, -1), n_jvp=info["n_matvec"],
                  n_vjp=info["n_rmatvec"], n_blocks=info["n_blocks"], converged=info["converged"],
                  settings={"k": k, "block_size": info["block_size"], **kwargs})


def jacobian_svd(model: Any, prompt: Prompt, *, target: Target = "output", position: int | None = -1,
                 k: int = 8, detached: bool = True, chunk_size: int = 64, oversample: int = 0,
                 max_blocks: int = 16, tol: float = 1e-5, seed: int = 0, strict: bool = True) -> TopSVD:
    """Top-``k`` SVD of the whole-prompt Jacobian of ``target``, matrix-free.

    With ``position`` an int the map is ``[J_1 ... J_T]`` (``d_out x T*d``) of ``y`` at that
    position; with ``position=None`` it is the map of ``y`` at *every* position (``T*d x T*d``):
    for ``target="block.l"`` that is block ``l``'s full transform ``h_l -> h_{l+1}``,
    cross-token attention blocks included. Targets as in :mod:`toolkit.jacobian.targets`.

    Args:
        model: the loaded model (any backend) or a plain HF causal LM; computed on its HF module.
        prompt: one sequence, as text or token ids (:func:`toolkit.prompts.ensure_tokens`).
        k: number of singular triplets.
        oversample: extra vectors per Krylov block (block size ``k + oversample``); the Krylov
            basis keeps every block, so small blocks cost the fewest products.
        max_blocks / tol: stop after ``max_blocks`` blocks, or once the extrapolated remaining change
            of the top-``k`` values is below ``tol`` (relative; see the module docstring). SmolLM2,
            64 tokens: error 2.2e-6 for the default 1e-5 (64 JVP + 56 VJP), 5.2e-5 for 1e-4 (56 + 48).
        chunk_size: JVPs / VJPs per batched pass.
        strict: refuse a model the freeze cannot see through, or a frozen map that misses the live
            output or is not affine (:mod:`toolkit.jacobian.guards`); ``False`` records a warning in
            ``settings["warnings"]`` instead.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> top = jacobian_svd(tiny_hf_model("gpt2"), [1, 2, 3], target="block.1", position=None, k=2)
        >>> top.V.shape, top.U.shape                 # T x d input and output spaces
        (torch.Size([3, 64, 2]), torch.Size([3, 64, 2]))
    """
    hf_model = hf_model_of(model)
    require_eval_mode(hf_model)
    ids = single_sequence(model, prompt)
    spec = resolve_target(hf_model, target)
    x = target_input(hf_model, ids, spec)
    f = state_function(hf_model, spec, input_ids=ids, position=position)
    with frozen_operator(hf_model, f, x, detached=detached, chunk_size=chunk_size, strict=strict) as op:
        top = operator_svd(op, k, oversample=oversample, max_blocks=max_blocks, tol=tol, seed=seed)
    top.settings.update(**op.checks.as_settings())
    top.settings.update(target=spec.name, input=spec.input_name, detached=detached,
                        position=None if position is None else (position if position >= 0 else len(ids) + position))
    return top
