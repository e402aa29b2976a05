"""Reading a detached Jacobian: SVD per input position, decoding to tokens, stable rank.

For each input position ``i`` the block ``J_i = dy/dx_i`` (``[d_out, d_in]``) is split as
``J_i = U S V^T``:

* a **left** singular vector ``u`` lives in the output space (the final-norm state for target
  ``"output"``), so it is decoded through the unembedding: the tokens with the largest
  ``u @ W_U``. Its sign is free; it is chosen so that ``u · y >= 0`` (the direction that *adds*
  to the output), and ``v`` flips with it so that ``u s v^T`` is unchanged;
* a **right** singular vector ``v`` lives in the input-embedding space, so it is decoded to the
  input tokens whose embedding rows (``W_E``) have the largest cosine with it;
* the largest-norm **rows** of ``J_i`` (``dy_r/dx_i``, input-space vectors) are decoded like
  ``v``, the largest-norm **columns** (``dy/dx_{i,c}``, output-space vectors) like ``u``;
* the **stable rank** ``||J_i||_F^2 / ||J_i||_2^2`` (between 1 and ``min(d_out, d_in)``) says
  how many directions carry the map.

For any other target (a boundary ``y = h_l`` before the final norm, a sublayer output, a
block's own transform) decoding through ``W_U`` is a logit-lens reading: a residual-stream
direction is first passed through the final norm's linear part with its scale frozen
(:func:`residual_readout`: the gain, Gemma's ``1 + w``, LayerNorm's centring), which a
direction's top tokens depend on; the frozen ``1/rms`` is one positive number and does not.

Example:
    >>> import torch
    >>> from toolkit.jacobian.result import DetachedJacobian
    >>> r = DetachedJacobian.random(T=2, d_out=4)
    >>> a = analyze_jacobian(r, W_U=torch.randn(4, 10), W_E=torch.randn(10, 4), decode=str, top_k=3)
    >>> len(a.stable_rank), len(a.left[0][0]["tokens"])
    (2, 3)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from toolkit.checks import positive_int
from toolkit.jacobian.freeze_rules import rule_for
from toolkit.jacobian.result import DetachedJacobian
from toolkit.persist import Parts, SavedResult

Decoded = dict[str, Any]  # {"index", "value", "tokens", "token_ids", "scores"}


def svd_per_position(jacobian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U [T, d_out, r], S [T, r], V [T, d_in, r]`` with ``J_i = U_i diag(S_i) V_i^T`` (float64).

    Example:
        >>> J = torch.randn(3, 5, 4)
        >>> U, S, V = svd_per_position(J)
        >>> torch.allclose(U @ torch.diag_embed(S) @ V.mT, J.double())
        True
    """
    U, S, Vh = torch.linalg.svd(jacobian.double(), full_matrices=False)
    return U, S, Vh.mT


def align_signs(U: Tensor, V: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each pair ``(u_k, v_k)`` so that ``u_k · y >= 0``; ``u s v^T`` is unchanged.

    Example:
        >>> U, V = torch.tensor([[[-1.0], [0.5]]]), torch.tensor([[[2.0]]])
        >>> [t.flatten().tolist() for t in align_signs(U, V, torch.tensor([1.0, 0.0]))]
        [[1.0, -0.5], [-2.0]]
    """
    sign = torch.sign(torch.einsum("tdr,d->tr", U, y.to(U.dtype)))
    sign[sign == 0] = 1.0
    return U * sign[:, None, :], V * sign[:, None, :]


def stable_rank(jacobian: Tensor) -> Tensor:
    """``||J_i||_F^2 / ||J_i||_2^2`` per position: ``[T]`` (0 for an all-zero block).

    Example:
        >>> stable_rank(torch.eye(3)[None]).tolist()
        [3.0]
    """
    J = jacobian.double()
    fro2 = J.pow(2).sum((-2, -1))
    spec2 = torch.linalg.matrix_norm(J, ord=2).pow(2)
    return torch.where(spec2 > 0, fro2 / spec2.clamp_min(1e-300), torch.zeros_like(fro2))


def _top(scores: Tensor, k: int, decode: Callable[[int], str]) -> tuple[list[str], list[int], list[float]]:
    values, ids = scores.topk(k)
    ids_list = ids.tolist()
    return [decode(i) for i in ids_list], ids_list, [float(v) for v in values]


def decode_output_directions(vectors: Tensor, W_U: Tensor, decode: Callable[[int], str],
                             k: int = 5) -> list[tuple[list[str], list[int], list[float]]]:
    """Top-``k`` output tokens of each row of ``vectors`` ``[n, d]`` by logit ``v @ W_U``.

    Example:
        >>> W_U = torch.eye(3)
        >>> decode_output_directions(torch.tensor([[0.0, 2.0, 1.0]]), W_U, str, k=2)[0][1]
        [1, 2]
    """
    logits = vectors.to(W_U.dtype) @ W_U
    return [_top(row, k, decode) for row in logits]


def decode_input_directions(vectors: Tensor, W_E: Tensor, decode: Callable[[int], str], k: int = 5,
                            normalized: bool = False) -> list[tuple[list[str], list[int], list[float]]]:
    """Top-``k`` input tokens of each row of ``vectors`` ``[n, d]`` by cosine with the rows of ``W_E``.

    Example:
        >>> W_E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> decode_input_directions(torch.tensor([[3.0, 0.1]]), W_E, str, k=1)[0][0]
        ['0']
    """
    E = W_E.float() if normalized else torch.nn.functional.normalize(W_E.float(), dim=-1)
    cos = torch.nn.functional.normalize(vectors.float(), dim=-1) @ E.T
    return [_top(row, k, decode) for row in cos]


def _entries(decoded, indices: Sequence[int], values: Sequence[float]) -> list[Decoded]:
    return [{"index": int(i), "value": float(v), "tokens": toks, "token_ids": ids, "scores": scores}
            for i, v, (toks, ids, scores) in zip(indices, values, decoded)]


@dataclass
class JacobianSVD(SavedResult):
    """SVD and token decoding of a :class:`DetachedJacobian`, one entry per input position.

    Fields:
        singular_values: ``[T, r]`` descending, ``r = min(d_out, d_in)``.
        U: ``[T, d_out, n_vectors]`` top left singular vectors (sign: ``u · y >= 0``).
        V: ``[T, d_in, n_vectors]`` the matching right singular vectors.
        stable_rank: ``[T]``.
        str_tokens: the input tokens.
        left / right: per position, per singular vector, ``{"index", "value" (singular value),
            "tokens", "token_ids", "scores" (logits / cosines)}``.
        rows / cols: per position, the largest-norm rows (input space, decoded by ``W_E``
            cosine) and columns (output space, decoded by ``W_U``); ``value`` is the norm.
        settings: the Jacobian's settings plus ``top_k`` and ``n_vectors``.
    """

    singular_values: Tensor
    U: Tensor
    V: Tensor
    stable_rank: Tensor
    str_tokens: list[str]
    left: list[list[Decoded]]
    right: list[list[Decoded]]
    rows: list[list[Decoded]]
    cols: list[list[Decoded]]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no singular vectors): singular values, stable ranks, decoded tokens.

        Example:
            >>> import json; json.dumps(analysis.to_dict())[:1]
            '{'
        """
        return {"settings": dict(self.settings), "str_tokens": list(self.str_tokens),
                "stable_rank": [float(s) for s in self.stable_rank],
                "singular_values": [[float(s) for s in row[: max(1, self.U.shape[-1])]]
                                    for row in self.singular_values],
                "left": self.left, "right": self.right, "rows": self.rows, "cols": self.cols}

    def top_tokens(self, position: int = -1, k: int = 5, *, vector: int = 0, side: str = "left") -> list[str]:
        """The ``k`` top tokens of one decoded singular vector at ``position``.

        ``vector`` 0 is the top singular vector (``u_1``); ``side``: ``"left"`` (output space,
        decoded through the unembedding), ``"right"`` (input space, by embedding cosine), or
        ``"rows"`` / ``"cols"`` (the largest-norm rows / columns of ``J_i``).

        Example:
            >>> import torch
            >>> from toolkit.jacobian.result import DetachedJacobian
            >>> r = DetachedJacobian.random(T=2, d_out=4)
            >>> a = analyze_jacobian(r, W_U=torch.randn(4, 10), W_E=torch.randn(10, 4), decode=str, top_k=3)
            >>> len(a.top_tokens(position=-1, k=2))
            2
        """
        table = {"left": self.left, "right": self.right, "rows": self.rows, "cols": self.cols}
        if side not in table:
            raise ValueError(f"side must be one of {sorted(table)}, got {side!r}.")
        T = len(table[side])
        if not -T <= position < T:
            raise IndexError(f"position {position} is outside the prompt's {T} tokens (use -{T}..{T - 1}).")
        entries = table[side][position]
        if not -len(entries) <= vector < len(entries):
            raise IndexError(f"vector {vector} was not decoded: {len(entries)} kept (n_vectors); re-run the "
                             f"analysis with a larger n_vectors.")
        tokens = entries[vector]["tokens"]
        if k > len(tokens):
            raise ValueError(f"k={k} but only {len(tokens)} tokens were decoded per vector (top_k); re-run the "
                             f"analysis with top_k >= {k}.")
        return list(tokens[:k])

    def report(self, path, title: str = "Detached Jacobian: SVD decoded to tokens"):
        """The singular spectra and the decoded-tokens table as one self-contained HTML page.

        Example:
            >>> svd.report(tmp / "svd.html").exists()
            True
        """
        from toolkit.report import Section, write_report
        return write_report(path, title, [Section("Singular spectra", figure=self.figure("spectra")),
                                          Section("Decoded singular vectors", figure=self.figure("tokens"))])

    def figure(self, kind: str = "tokens", **kwargs):
        """``"tokens"``: the decoded-tokens table; ``"spectra"``: the singular values of each ``J_i``.

        Example:
            >>> svd.figure("spectra").layout.yaxis.type
            'log'
        """
        from toolkit.plots import jacobian as plots
        figures = {"tokens": plots.decoded_tokens_table, "spectra": plots.singular_spectra}
        if kind not in figures:
            raise ValueError(f"kind must be one of {sorted(figures)}, got {kind!r}.")
        return figures[kind](self, **kwargs)

    # ----- persistence (toolkit.persist: .save(path), JacobianSVD.load(path)) -----------------
    KIND = "toolkit.jacobian.JacobianSVD"
    NOUN = "JacobianSVD"
    _TENSORS = ("singular_values", "U", "V", "stable_rank")
    _FIELDS = ("str_tokens", "left", "right", "rows", "cols")

    def _to_parts(self) -> Parts:
        return Parts(fields={n: getattr(self, n) for n in self._FIELDS},
                     tensors={n: getattr(self, n) for n in self._TENSORS})

    @classmethod
    def _from_parts(cls, parts: Parts) -> "JacobianSVD":
        return cls(**{n: parts.tensors[n] for n in cls._TENSORS}, **{n: parts.fields[n] for n in cls._FIELDS},
                   settings=parts.fields["settings"])

    def __repr__(self) -> str:
        T = len(self.str_tokens)
        return (f"JacobianSVD(T={T}, n_vectors={self.U.shape[-1]}, "
                f"stable_rank={[round(float(s), 2) for s in self.stable_rank]})")


def residual_readout(final_norm: torch.nn.Module, W_U: Tensor) -> Tensor:
    """``[d, vocab]``: the unembedding as seen from the residual stream, through the frozen final norm.

    A direction ``u`` in the residual stream reaches the logits as ``N(u) @ W_U``, where ``N`` is the
    final norm's linear part with its scale held fixed: ``g * u`` for RMSNorm (``g = 1 + w`` in
    Gemma's form), ``w * (u - mean(u))`` for LayerNorm (its bias is no direction). The returned
    matrix is ``N`` folded into ``W_U``, up to the positive frozen ``1/rms``.

    Example:
        >>> norm = torch.nn.LayerNorm(3)
        >>> R = residual_readout(norm, torch.eye(3))
        >>> torch.allclose(torch.ones(3) @ R, torch.zeros(3), atol=1e-7)   # a constant direction is centred away
        True
    """
    original = getattr(final_norm, "original_component", None)   # TransformerLens wraps the HF norm
    if isinstance(original, torch.nn.Module):
        final_norm = original
    rule = rule_for(final_norm)                        # the freeze's own table knows each norm's gain
    if rule is None or rule.gain is None:
        raise ValueError(f"no readout for the final norm {type(final_norm).__qualname__}: register it with "
                         f"toolkit.jacobian.freeze_rules.register_rule(..., kind='norm', gain=...).")
    weight = rule.gain(final_norm)
    gain = torch.ones(W_U.shape[0]) if weight is None else weight.detach().float().cpu()
    readout = gain[:, None] * W_U.detach().float().cpu()
    if isinstance(final_norm, torch.nn.LayerNorm):  # centring: u -> u - mean(u), i.e. C = I - 11^T/d
        readout = readout - readout.mean(0, keepdim=True)
    return readout


def check_analysis_settings(*, top_k: int = 5, n_vectors: int = 3) -> None:
    """Refuse a bad ``top_k`` / ``n_vectors`` before any Jacobian is computed.

    Example:
        >>> check_analysis_settings(top_k=0)
        Traceback (most recent call last):
        ...
        ValueError: top_k (--top-k) must be a positive integer (decoded tokens per singular vector), got 0; use 1 or more.
    """
    positive_int("top_k", top_k, "decoded tokens per singular vector")
    positive_int("n_vectors", n_vectors, "singular vectors decoded per position")


def analyze_jacobian(result: DetachedJacobian, W_U: Tensor, W_E: Tensor, decode: Callable[[int], str], *,
                     top_k: int = 5, n_vectors: int = 3, n_rows: int = 3,
                     str_tokens: Sequence[str] | None = None) -> JacobianSVD:
    """SVD per input position, decoded to tokens; see the module docstring.

    Args:
        result: a :class:`DetachedJacobian` (detached or ordinary).
        W_U: unembedding ``[d_out, vocab]``; W_E: token embeddings ``[vocab, d_in]``.
        decode: token id -> string (e.g. ``lambda i: tokenizer.decode([i])``).
        top_k: tokens per decoded vector; n_vectors: singular vectors kept and decoded;
        n_rows: largest-norm rows and columns decoded per position.

    Example:
        >>> a = analyze_jacobian(jac, model.W_U, model.W_E, lambda i: model.to_str_tokens([i])[0])
        >>> " bridge" in a.top_tokens(position=1, k=5)        # the map at " bridge" promotes bridge words
        True
    """
    check_analysis_settings(top_k=top_k, n_vectors=n_vectors)
    J = result.jacobian.detach().cpu()
    W_U = W_U.detach().cpu().float()
    E = torch.nn.functional.normalize(W_E.detach().cpu().float(), dim=-1)  # once, not per call
    T = J.shape[0]
    U, S, V = svd_per_position(J)
    U, V = align_signs(U, V, result.y.detach().cpu())
    n = min(n_vectors, S.shape[-1])
    U, V = U[..., :n], V[..., :n]
    left, right, rows, cols = [], [], [], []
    for i in range(T):
        s_i = S[i, :n].tolist()
        left.append(_entries(decode_output_directions(U[i].T, W_U, decode, top_k), range(n), s_i))
        right.append(_entries(decode_input_directions(V[i].T, E, decode, top_k, True), range(n), s_i))
        row_norm, col_norm = J[i].norm(dim=1), J[i].norm(dim=0)
        rv, ri = row_norm.topk(min(n_rows, row_norm.numel()))
        cv, ci = col_norm.topk(min(n_rows, col_norm.numel()))
        rows.append(_entries(decode_input_directions(J[i][ri], E, decode, top_k, True), ri.tolist(), rv.tolist()))
        cols.append(_entries(decode_output_directions(J[i][:, ci].T, W_U, decode, top_k), ci.tolist(),
                             cv.tolist()))
    tokens = list(str_tokens) if str_tokens is not None else [decode(int(t)) for t in result.token_ids]
    settings = {**result.settings, "top_k": top_k, "n_vectors": n, "n_rows": n_rows}
    return JacobianSVD(singular_values=S.float(), U=U.float(), V=V.float(), stable_rank=stable_rank(J).float(),
                       str_tokens=tokens, left=left, right=right, rows=rows, cols=cols, settings=settings)


def analyze_with_model(result: DetachedJacobian, model, **kwargs) -> JacobianSVD:
    """:func:`analyze_jacobian` with ``W_U``, ``W_E`` and token strings taken from a backend.

    ``model`` is anything with ``W_U``, ``W_E`` and ``to_str_tokens`` (a
    :class:`~toolkit.backends.base.Backend`).

    Output-space vectors of the final-norm target (``"output"``) are decoded by ``W_U`` itself,
    those of every other target through :func:`residual_readout` (the final norm's frozen gain).

    Example:
        >>> from toolkit.jacobian.compute import detached_jacobian
        >>> a = analyze_with_model(detached_jacobian(model, ids, target="resid.20"), model, top_k=5)
        >>> len(a.top_tokens(position=-1, k=5))
        5
    """
    target = result.settings.get("target", "output")
    W_U = model.W_U if target == "output" else residual_readout(model.final_norm, model.W_U)
    return analyze_jacobian(result, W_U, model.W_E, lambda i: model.to_str_tokens([i])[0],
                            str_tokens=model.to_str_tokens(result.token_ids), **kwargs)
