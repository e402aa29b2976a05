"""The Jacobian of a (frozen) map as a matrix-free linear operator: batched JVPs and VJPs.

For ``f: x [*in_shape] -> y [*out_shape]`` around a point ``x``:

* a **VJP** ``u -> u^T J`` is one backward pass; ``B`` of them run as one batched backward
  (``autograd.grad(..., is_grads_batched=True)``) on a graph recorded once and kept;
* a **JVP** ``v -> J v`` is one forward-mode pass (``torch.func.jvp``); ``B`` of them run as one
  ``vmap``-ed forward pass, with no reverse graph at all.

Neither ever forms ``J``. Inside :func:`frozen_operator` the freeze is on, the factors are
recorded once at ``x`` and replayed for every JVP, so rows and columns belong to the same
linear map, and ``c = f(0)`` (replayed) is its constant: ``f(x) = J x + c``.

Dense Jacobians come from either side (:meth:`FrozenOperator.dense`): ``"reverse"`` costs
``prod(out_shape)`` VJPs, ``"forward"`` costs ``prod(in_shape)`` JVPs.

When the frozen map has no constant term (``c == 0`` exactly: bias-free Llama, Qwen 3, Gemma 3)
it is *linear*, and a JVP is the frozen model itself run on the tangent: ``J v = F(v)`` with
the recorded factors replayed. Then :func:`batched_replay` runs ``B`` tangents as a batch of
``B`` sequences, with no forward-mode AD and no primal pass per call; with a constant term
(GPT-2, Pythia, Mamba) ``F(v) - c`` would cancel digits, and forward-mode AD is used.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> from toolkit.jacobian.targets import input_embeddings, state_function
    >>> model = tiny_hf_model("llama")
    >>> x = input_embeddings(model, torch.tensor([1, 2, 3]))
    >>> with frozen_operator(model, state_function(model, "output"), x) as op:
    ...     J = op.dense("reverse")                       # [d_out, T * d_in], from VJPs
    ...     cols = op.matvec(torch.eye(op.shape[1])[:, :5])  # 5 columns, from JVPs
    >>> J.shape, torch.allclose(J[:, :5], cols, atol=1e-4)
    (torch.Size([64, 192]), True)
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from math import prod
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from toolkit.metrics import require_eval_mode
from toolkit.jacobian.freeze import detached as frozen
from toolkit.jacobian.freeze import eager_attention
from toolkit.jacobian.guards import Checks, affine_probe

Mode = Literal["forward", "reverse"]


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")


def batched_vjp(y: Tensor, x: Tensor, cotangents: Tensor, chunk_size: int = 64) -> Tensor:
    """``[B, *y.shape] -> [B, *x.shape]``: ``u^T dy/dx`` for each cotangent, ``chunk_size`` per backward.

    ``y`` must have been computed from ``x`` (``requires_grad``); the graph is kept, so this
    can be called again.

    Example:
        >>> x = torch.randn(3, requires_grad=True)
        >>> W = torch.randn(2, 3)
        >>> torch.allclose(batched_vjp(W @ x, x, torch.eye(2)), W)
        True
    """
    _check_chunk(chunk_size)
    if cotangents.shape[1:] != y.shape:
        raise ValueError(f"cotangents must be [B, *y.shape] = [B, {', '.join(map(str, y.shape))}], "
                         f"got {tuple(cotangents.shape)}.")
    out = []
    for start in range(0, cotangents.shape[0], chunk_size):
        chunk = cotangents[start:start + chunk_size].to(y.device, y.dtype)  # y's device: the last module's
        (grads,) = torch.autograd.grad(y, x, grad_outputs=chunk, retain_graph=True, is_grads_batched=True)
        out.append(grads)
    return torch.cat(out) if out else cotangents.new_zeros(0, *x.shape)


def batched_jvp(f: Callable[[Tensor], Tensor], x: Tensor, tangents: Tensor, chunk_size: int = 64):
    """``[B, *x.shape] -> [B, *f(x).shape]``: ``J v`` for each tangent by forward-mode AD, vmapped.

    ``f`` may return a tensor or a tuple of tensors (then a tuple of ``[B, ...]`` comes back).
    Runs without a reverse graph; ``f`` must support forward AD (the freeze's eager attention does).

    Example:
        >>> W = torch.randn(2, 3)
        >>> torch.allclose(batched_jvp(lambda x: W @ x, torch.randn(3), torch.eye(3)), W.T)
        True
    """
    _check_chunk(chunk_size)
    if tangents.shape[1:] != x.shape:
        raise ValueError(f"tangents must be [B, *x.shape] = [B, {', '.join(map(str, x.shape))}], "
                         f"got {tuple(tangents.shape)}.")
    primal = x.detach()

    def one(v: Tensor):
        return torch.func.jvp(f, (primal,), (v,))[1]

    parts = []
    with torch.no_grad():
        for start in range(0, tangents.shape[0], chunk_size):
            parts.append(torch.func.vmap(one)(tangents[start:start + chunk_size].to(x.device, x.dtype)))
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def batched_replay(f: Callable[[Tensor], Tensor], tangents: Tensor, chunk_size: int = 64):
    """``[B, *x.shape] -> [B, ...]``: ``f`` run on the tangents as a batch of sequences, no grad.

    Equals ``J v`` when ``f`` is a *linear* frozen map replaying its factors (no constant term).

    Example:
        >>> W = torch.randn(2, 3)
        >>> torch.allclose(batched_replay(lambda X: X @ W.T, torch.eye(3)), W.T)
        True
    """
    _check_chunk(chunk_size)
    with torch.no_grad():
        parts = [f(tangents[s:s + chunk_size]) for s in range(0, tangents.shape[0], chunk_size)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def basis(n: int, start: int, stop: int, *, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> Tensor:
    """Rows ``start..stop-1`` of the ``n x n`` identity: ``[stop - start, n]``.

    Example:
        >>> basis(4, 1, 3).tolist()
        [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    """
    e = torch.zeros(stop - start, n, dtype=dtype, device=device)
    e[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    return e


def jacobian_by_rows(vjp: Callable[[Tensor], Tensor], d_out: int, in_shape: tuple[int, ...], chunk_size: int = 64,
                     *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "Jacobian rows") -> Tensor:
    """Every row of a ``d_out``-output Jacobian from a VJP callable: ``[*in_shape[:-1], d_out, in_shape[-1]]``.

    ``vjp`` maps cotangents ``[B, d_out]`` to ``[B, *in_shape]``; rows are asked for
    ``chunk_size`` at a time and written in place, so peak memory is ``J`` plus one chunk.
    ``progress`` shows a ``tqdm`` bar over the rows (on stderr).

    Example:
        >>> W = torch.randn(4, 3)
        >>> torch.allclose(jacobian_by_rows(lambda u: u @ W, 4, (3,), chunk_size=3), W)
        True
    """
    _check_chunk(chunk_size)
    jac = torch.empty(*in_shape[:-1], d_out, in_shape[-1], dtype=dtype, device=device)
    with tqdm(total=d_out, desc=desc, unit="row", disable=not progress, leave=False) as bar:
        for start in range(0, d_out, chunk_size):
            stop = min(start + chunk_size, d_out)
            jac[..., start:stop, :] = vjp(basis(d_out, start, stop, dtype=dtype, device=device)).movedim(0, -2)
            bar.update(stop - start)
    return jac


@dataclass
class FrozenOperator:
    """``J = df/dx`` at ``x`` as an ``m x n`` operator (``m = prod(out_shape)``, ``n = prod(in_shape)``).

    Use it inside :func:`frozen_operator` (the freeze must stay on while it is used).
    ``jvp``/``vjp`` take batches in the natural shapes, ``matvec``/``rmatvec`` flat columns.
    """

    f: Callable[[Tensor], Tensor]
    x: Tensor
    y: Tensor
    chunk_size: int
    _x_graph: Tensor
    _y_graph: Tensor
    _constant: Tensor
    jvp_route: str = "ad"  # "replay": the map is linear, JVPs are batched replays of f
    checks: Checks = field(default_factory=Checks)  # live-output and affinity verdicts (detached only)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.y.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: output and input sizes of the flattened map."""
        return prod(self.out_shape), prod(self.in_shape)

    def jvp(self, tangents: Tensor) -> Tensor:
        """``[B, *in_shape] -> [B, *out_shape]`` (forward mode, or a batched replay for a linear map).

        Example:
            >>> with frozen_operator(tiny, tiny_f, tiny_x) as op:
            ...     op.jvp(torch.zeros(2, *op.in_shape)).shape == (2, *op.out_shape)
            True
        """
        if tangents.shape[1:] != self.x.shape:
            raise ValueError(f"tangents must be [B, *x.shape] = [B, {', '.join(map(str, self.x.shape))}], "
                             f"got {tuple(tangents.shape)}.")
        if self.jvp_route == "replay":
            return batched_replay(self.f, tangents.to(self.x.device, self.x.dtype), self.chunk_size)
        return batched_jvp(self.f, self.x, tangents, self.chunk_size)

    def vjp(self, cotangents: Tensor) -> Tensor:
        """``[B, *out_shape] -> [B, *in_shape]`` (reverse mode, on the recorded graph).

        Example:
            >>> with frozen_operator(tiny, tiny_f, tiny_x) as op:
            ...     op.vjp(torch.zeros(2, *op.out_shape)).shape == (2, *op.in_shape)
            True
        """
        return batched_vjp(self._y_graph, self._x_graph, cotangents, self.chunk_size)

    def matvec(self, V: Tensor) -> Tensor:
        """``J V`` for flat columns ``V`` ``[n, b]`` -> ``[m, b]``.

        Example:
            >>> with frozen_operator(tiny, tiny_f, tiny_x) as op:
            ...     op.matvec(torch.randn(op.shape[1], 3)).shape == (op.shape[0], 3)
            True
        """
        b = V.shape[1]
        return self.jvp(V.T.reshape(b, *self.in_shape)).reshape(b, -1).T

    def rmatvec(self, U: Tensor) -> Tensor:
        """``J^T U`` for flat columns ``U`` ``[m, b]`` -> ``[n, b]``.

        Example:
            >>> with frozen_operator(tiny, tiny_f, tiny_x) as op:
            ...     op.rmatvec(torch.randn(op.shape[0], 3)).shape == (op.shape[1], 3)
            True
        """
        b = U.shape[1]
        return self.vjp(U.T.reshape(b, *self.out_shape)).reshape(b, -1).T

    def dense(self, mode: Mode = "reverse", progress: bool = False) -> Tensor:
        """The formed ``J`` ``[m, n]``: rows by VJPs (``m`` of them) or columns by JVPs (``n``); ``progress``: a bar.

        Example:
            >>> with frozen_operator(tiny, tiny_f, tiny_x) as op:
            ...     torch.allclose(op.dense("forward"), op.dense("reverse"), atol=1e-5)
            True
        """
        m, n = self.shape
        kw = dict(dtype=self.x.dtype, device=self.x.device)
        if mode == "reverse":
            starts = tqdm(range(0, m, self.chunk_size), desc="Jacobian rows", unit="chunk", disable=not progress,
                          leave=False)
            rows = [self.vjp(basis(m, s, min(s + self.chunk_size, m), **kw).reshape(-1, *self.out_shape))
                    for s in starts]
            return torch.cat(rows).reshape(m, n)
        if mode == "forward":
            starts = tqdm(range(0, n, self.chunk_size), desc="Jacobian columns", unit="chunk", disable=not progress,
                          leave=False)
            cols = [self.jvp(basis(n, s, min(s + self.chunk_size, n), **kw).reshape(-1, *self.in_shape))
                    for s in starts]
            return torch.cat(cols).reshape(n, m).T.contiguous()
        raise ValueError(f"mode must be 'forward' (JVP columns) or 'reverse' (VJP rows), got {mode!r}.")

    def constant(self) -> Tensor:
        """``c = f(0)`` with the recorded factors (detached) or the plain model (ordinary).

        Example:
            >>> with frozen_operator(tiny, tiny_f, tiny_x) as op:
            ...     op.constant().shape == op.out_shape
            True
        """
        return self._constant


@contextmanager
def frozen_operator(hf_model: nn.Module, f: Callable[[Tensor], Tensor], x: Tensor, *, detached: bool = True,
                    chunk_size: int = 64, jvp: Literal["auto", "ad", "replay"] = "auto",
                    strict: bool = True) -> Iterator[FrozenOperator]:
    """Freeze ``hf_model``, record ``f(x)``, and yield the :class:`FrozenOperator` of ``df/dx`` at ``x``.

    ``detached=False`` gives the ordinary Jacobian of the same ``f`` (no freeze; attention
    still eager so that JVPs work). Inside the block the store replays the factors recorded
    at ``x``, so JVPs, VJPs and :meth:`~FrozenOperator.constant` describe one affine map.
    ``jvp``: ``"ad"`` (forward-mode AD), ``"replay"`` (batched replay; only for a linear map,
    ``c == 0``), or ``"auto"`` (replay when the detached map's constant is exactly zero).
    ``f`` must accept a batch ``[B, *x.shape]`` for the replay route (the target functions do).

    Every detached operator is checked before it is handed out (see :mod:`toolkit.jacobian.guards`):
    the model must run nothing the freeze cannot see (instance ``forward`` overrides, hooks), the
    frozen ``f(x)`` must equal the live, unfrozen ``f(x)``, and ``J x + c = y`` must hold on a few
    VJP probes, within the dtype's tolerance. A failure raises
    :class:`~toolkit.jacobian.guards.FreezeCheckError`; ``strict=False`` warns and records it in
    ``op.checks``.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> from toolkit.jacobian.targets import input_embeddings, state_function
        >>> model = tiny_hf_model("gpt2")
        >>> _ = model.transformer.h[0].mlp.c_fc.bias.data.fill_(0.1)   # random init leaves biases at 0
        >>> x = input_embeddings(model, torch.tensor([4, 5]))
        >>> with frozen_operator(model, state_function(model, 1), x) as op:
        ...     J, c = op.dense(), op.constant()
        >>> float((J @ x.reshape(-1) + c - op.y).norm() / op.y.norm()) < 1e-5, op.jvp_route   # biases: c != 0
        (True, 'ad')
    """
    require_eval_mode(hf_model)
    if jvp not in ("auto", "ad", "replay"):
        raise ValueError(f"jvp must be 'auto', 'ad' or 'replay', got {jvp!r}.")
    _check_chunk(chunk_size)
    x = x.detach()
    checks = Checks(strict=strict, dtype=x.dtype)
    y_live = None
    if detached:  # the model as the user runs it: unfrozen, its hooks and overrides included
        with torch.no_grad():
            y_live = f(x)
    undo_eager = [] if detached else eager_attention(hf_model)
    try:
        with frozen(hf_model, checks=checks) if detached else nullcontext() as freeze:
            xg = x.clone().requires_grad_(True)
            with freeze.recording() if detached else nullcontext(), torch.enable_grad():
                y_graph = f(xg)
            if not isinstance(y_graph, Tensor):
                raise ValueError(f"f must return one tensor, got {type(y_graph).__name__}.")
            if detached:
                checks.compare_live(y_graph, y_live)
            with freeze.replaying() if detached else nullcontext():
                with torch.no_grad():
                    c = f(torch.zeros_like(x)).detach()
                if detached:
                    checks.check("affine", affine_probe(lambda U: batched_vjp(y_graph, xg, U, chunk_size), x,
                                                        y_graph, c))
                linear = detached and not bool(c.any())
                if jvp == "replay" and not linear:
                    raise ValueError("jvp='replay' needs a linear frozen map (constant term exactly 0, detached=True); "
                                     "this one has a constant term: use jvp='ad'.")
                route = "replay" if (jvp == "replay" or (jvp == "auto" and linear)) else "ad"
                yield FrozenOperator(f=f, x=x, y=y_graph.detach(), chunk_size=chunk_size, _x_graph=xg,
                                     _y_graph=y_graph, _constant=c, jvp_route=route, checks=checks)
    finally:
        for undo in reversed(undo_eager):
            undo()
