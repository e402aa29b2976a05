"""KL divergences of next-token distributions, accurate for small KLs and cheap for many variants.

:func:`kl_many` takes logits; :func:`kl_from_normed` takes final-normed hidden states and the
unembedding and never forms the variants' logits (the interventions' hot path: for SmolLM2 a
patched row's logits are 49152 floats, its hidden state 576).

Example:
    >>> import torch
    >>> p, q = torch.randn(2, 50), torch.randn(2, 3, 50)
    >>> kl_many(p, q).shape
    torch.Size([2, 3])
    >>> W = torch.randn(50, 8); n_p, n_q = torch.randn(2, 8), torch.randn(2, 3, 8)
    >>> bool(torch.allclose(kl_from_normed(n_p, n_q, W), kl_many(n_p @ W.T, n_q @ W.T), rtol=1e-4))
    True
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["kl_divergence", "kl_many", "kl_from_normed", "linear_unembedding"]

# Logit differences past this use the float64 log-softmax: e^d would lose float32 headroom.
_FAR = 30.0


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(P || Q)`` over the last dimension from logits (broadcasting), as float64; see :func:`kl_many`."""
    logits_p, logits_q = torch.broadcast_tensors(logits_p, logits_q)
    shape = logits_p.shape
    return kl_many(logits_p.reshape(-1, shape[-1]), logits_q.reshape(-1, 1, shape[-1])).reshape(shape[:-1])


def kl_many(logits_p: Tensor, logits_q: Tensor, p: Tensor | None = None) -> Tensor:
    """``KL(P_r || Q_rc)``, float64 ``[R, C]``, for ``logits_p [R, V]`` and ``logits_q [R, C, V]`` (C variants per P).

    With ``d = logits_q - logits_p`` shifted by about its P-mean, ``KL = log(sum p e^d) - sum p d``
    (any shift of ``d`` cancels between the two terms), evaluated as ``log1p(s1 + s2) - s1`` with
    ``s1 = sum p d`` and ``s2 = sum p (e^d - 1 - d)``, a sum of nonnegative terms: float32 passes
    over the vocabulary and no log-softmax, yet small KLs keep their digits (``s1`` cancels exactly).
    Rows where ``d`` exceeds 30 somewhere (``expm1`` would overflow) are recomputed by log-softmax in
    float64. ``p`` is ``softmax(logits_p)``, passed when it is already at hand.
    """
    logits_p, logits_q = logits_p.float(), logits_q.float()
    p = torch.softmax(logits_p, dim=-1) if p is None else p
    col = p[:, :, None]                                                          # [R, V, 1]
    shift = (logits_q @ col)[..., 0] - (logits_p[:, None] @ col)[..., 0]          # ~ E_p[d], [R, C]
    d = logits_q - logits_p[:, None]
    d -= shift[..., None]
    first = (d @ col)[..., 0].double()                                           # ~0, not exactly
    rest = torch.expm1(d)
    rest -= d                                                                    # e^d - 1 - d >= 0: no cancellation
    rest = (rest * p[:, None]).sum(-1).double()          # cascade sum: more accurate than a BLAS dot here
    kl = torch.log1p(first + rest) - first                # first enters at second order only
    far = d.amax(dim=-1) > _FAR
    if far.any():
        kl = torch.where(far, _far_rows_exact(logits_p, logits_q), kl)
    return kl


def linear_unembedding(hf_model: nn.Module) -> nn.Linear | None:
    """The output head when logits are affine in the final-normed state (a linear head, biased or
    not, and no logit soft-cap), else ``None``."""
    head = hf_model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or getattr(hf_model.config, "final_logit_softcapping", None):
        return None
    return head


def _far_rows_exact(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    logp = torch.log_softmax(logits_p.double(), -1)[:, None]
    logq = torch.log_softmax(logits_q.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_from_normed(normed_p: Tensor, normed_q: Tensor, weight: Tensor, bias: Tensor | None = None,
                   p: Tensor | None = None, p_weight: Tensor | None = None, chunk: int = 4096) -> Tensor:
    """:func:`kl_many` for logits ``normed @ weight.T + bias``: ``normed_p [R, d]``, ``normed_q [R, C, d]``.

    The logit differences are ``d = (normed_q - normed_p) @ weight.T`` (a bias cancels), taken a
    vocabulary chunk at a time and reduced at once, so no ``[R, C, vocab]`` tensor is formed; the shift
    by ``E_p[d]`` comes from the hidden side, ``(normed_q - normed_p) . (p @ weight)``. Same formula
    and accuracy as :func:`kl_many` (and the differences have no cancellation between two sets of
    logits). ``p`` is ``softmax(logits_p)`` and ``p_weight`` is ``p @ weight``, if at hand (callers
    that score many batches of variants against the same ``P`` pass them). Returns float64 ``[R, C]``.
    """
    weight = weight.float()
    normed_p, normed_q = normed_p.float(), normed_q.float()
    n_rows, n_var, width = normed_q.shape
    bias = None if bias is None else bias.float()

    def logits(normed: Tensor) -> Tensor:
        return normed @ weight.T if bias is None else torch.addmm(bias, normed, weight.T)

    if p is None:
        p = torch.softmax(logits(normed_p), dim=-1)
    p = p.float()
    delta = (normed_q - normed_p[:, None]).reshape(n_rows * n_var, width)
    p_weight = p @ weight if p_weight is None else p_weight.float()
    shift = (delta.view(n_rows, n_var, width) * p_weight[:, None]).sum(-1)          # ~ E_p[d], [R, C]
    neg_shift = -shift.reshape(-1, 1)
    first = torch.zeros(n_rows, n_var, dtype=torch.float64, device=p.device)
    rest = torch.zeros_like(first)
    top = torch.full((n_rows, n_var), -float("inf"), device=p.device)
    for v0 in range(0, weight.shape[0], chunk):
        pc = p[:, v0:v0 + chunk]
        d = torch.addmm(neg_shift, delta, weight[v0:v0 + chunk].T).view(n_rows, n_var, -1)
        first += (d @ pc[:, :, None])[..., 0]
        top = torch.maximum(top, d.amax(dim=-1))
        e = torch.expm1(d)
        e -= d                                                                   # e^d - 1 - d >= 0
        rest += (e * pc[:, None]).sum(-1)
    kl = torch.log1p(first + rest) - first
    far = top > _FAR
    if far.any():
        r, c = far.nonzero(as_tuple=True)
        kl[r, c] = _far_rows_exact(logits(normed_p[r]), logits(normed_q[r, c])[:, None])[:, 0]
    return kl
