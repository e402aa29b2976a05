"""Interventions: replace ``h_b`` at one position, propagate, and measure the output change.

For a test anchor (text, position p) and a boundary b, the intervention replaces
``h_b[p]`` by a given vector (for the decomposition: ``T(h_{b-1})``, the tokenwise map's
prediction) and runs the remaining layers. The output change is
``KL(P_orig || P_patched)`` of the next-token distribution at p (or averaged over p and all
later positions with ``positions="later"``).

The fast path never recomputes what cannot change: positions before p are read from a
cache, and blocks below the patched boundary are not run at all. For attention models each batch
of texts is run once to fill a cache (which also gives ``P_orig``); then, per boundary ``b``,
every variant at every sampled position enters at ``h_b`` as a query against the cache (a mask
hides later keys) and runs blocks ``b..L-1`` only: one call per boundary and batch of texts. For Mamba (a
recurrent state cannot hide later positions) and for ``kl_positions="later"`` the prefix
``[0, p)`` is processed once per text with a cache copied at each sampled position, and each
position's interventions run as one batch of steps (see :mod:`toolkit.backends.incremental`). :func:`patched_kl_plain` is the plain reference (one full
forward per intervention) that tests and benchmarks compare against.

Example:
    >>> values = {11: predicted_h11}          # [n_texts * per_text, d_model], rows as in CollectedStates
    >>> kl = patched_kl(model, tokens, positions, values)   # {11: [n_texts * per_text]}  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Hashable, Literal, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from toolkit.backends.base import Backend, Patch
from toolkit.backends.incremental import (cache_kwargs, full_cache, full_cache_supported, prefix_caches,
                                          repeat_cache, run_queries)


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
    far = d.amax(dim=-1) > 30
    if far.any():
        logp = torch.log_softmax(logits_p.double(), -1)[:, None]
        logq = torch.log_softmax(logits_q.double(), -1)
        kl = torch.where(far, (logp.exp() * (logp - logq)).sum(-1), kl)
    return kl


def boundary_of(key: Hashable) -> int:
    """Keys of ``values`` are a boundary, or a tuple whose last item is the boundary (``("mlp", 11)``)."""
    return key if isinstance(key, int) else key[-1]


def _check(model: Backend, tokens: Tensor, positions: Tensor, values: Mapping[Hashable, Tensor]) -> None:
    n_rows = positions.numel()
    if tokens.ndim != 2 or positions.ndim != 2 or positions.shape[0] != tokens.shape[0]:
        raise ValueError(f"tokens must be [n_texts, seq_len] and positions [n_texts, per_text]; got "
                         f"{tuple(tokens.shape)} and {tuple(positions.shape)}.")
    for key, v in values.items():
        b = model.check_boundary(boundary_of(key))
        if b == 0:
            raise ValueError("boundary 0 (the embeddings) has no block before it to replace; use b >= 1.")
        if v.shape != (n_rows, model.d_model):
            raise ValueError(f"values for boundary {b} must be [{n_rows}, {model.d_model}] (one row per sampled "
                             f"position), got {tuple(v.shape)}.")


def patched_kl(model: Backend, tokens: Tensor, positions: Tensor, values: Mapping[Hashable, Tensor],
               kl_positions: Literal["next", "later"] = "next", max_rows: int = 32, batch_size: int = 8,
               kv_caches: list | None = None, final_states: Tensor | None = None,
               progress: bool = True) -> dict[Hashable, Tensor]:
    """KL of the output after each replacement, by the cached fast path.

    Args:
        tokens: ``[n_texts, seq_len]``; positions: ``[n_texts, per_text]`` sorted ascending per text.
        values: key -> ``[n_texts * per_text, d_model]`` replacement for ``h_b`` at each row, where the
            key is the boundary ``b`` or a tuple ending in it (several variants per boundary).
        kl_positions: ``"next"`` (the patched position's next-token distribution) or ``"later"``
            (mean KL over the patched position and every later one).
        max_rows: interventions (text x variant) per forward call; bounds the memory of the logits.
        batch_size: texts whose full caches are held at once (attention models, ``"next"``).
        kv_caches, final_states: the texts' attention caches, ``(first text, cache)`` per batch, and
            ``h_L`` at every row, as :func:`toolkit.collection.pairs.collect_hidden_states` keeps them
            (``keep_kv_cache=True``): then the texts themselves are not run again.
    Returns:
        key -> ``[n_texts * per_text]`` KL in nats (float64).
    """
    _check(model, tokens, positions, values)
    keys = sorted(values, key=boundary_of)
    n_texts, per_text = positions.shape
    out = {key: torch.zeros(n_texts * per_text, dtype=torch.float64) for key in keys}
    widest = max(sum(boundary_of(k) == b for k in keys) for b in {boundary_of(k) for k in keys})
    if kl_positions == "next" and full_cache_supported(model, tokens.shape[1], min(widest, max_rows) * per_text):
        batches = _cache_batches(n_texts, per_text, batch_size, kv_caches, final_states)
        _kl_from_full_caches(model, tokens, positions, values, keys, out, max_rows, batches, final_states, progress)
    else:
        _kl_from_prefix_caches(model, tokens, positions, values, keys, out, kl_positions, max_rows, progress)
    return out


def _cache_batches(n_texts: int, per_text: int, batch_size: int, kv_caches: list | None,
                   final_states: Tensor | None) -> list[tuple[int, int, object]]:
    """``(first text, n texts, cache or None)`` per batch; given caches must cover the texts in order."""
    if kv_caches is None or final_states is None:
        return [(s, min(batch_size, n_texts - s), None) for s in range(0, n_texts, batch_size)]
    starts = [s for s, _ in kv_caches] + [n_texts]
    batches = [(s, e - s, c) for (s, c), e in zip(kv_caches, starts[1:])]
    if starts[0] != 0 or any(n < 1 or c.layers[0].keys.shape[0] != n for _, n, c in batches):
        raise ValueError("kv_caches must be (first text, cache) for consecutive batches covering every text, "
                         "as collect_hidden_states(keep_kv_cache=True) returns them.")
    if final_states.shape[0] != n_texts * per_text or any(c.get_seq_length() == 0 for _, _, c in batches):
        raise ValueError("final_states must hold h_L at every row, and every cache must be filled.")
    return batches


@torch.no_grad()
def _kl_from_full_caches(model: Backend, tokens: Tensor, positions: Tensor, values: Mapping[Hashable, Tensor],
                         keys: list, out: dict, max_rows: int, batches: list, final_states: Tensor | None,
                         progress: bool) -> None:
    """Each batch of texts is run once; then, per boundary ``b``, every (variant, sampled position)
    enters at ``h_b`` as a query against the texts' caches and runs blocks ``b..L-1`` only."""
    n_texts, per_text = positions.shape
    seq_len, d = tokens.shape[1], model.d_model
    by_boundary: dict[int, list] = {}
    for key in keys:
        by_boundary.setdefault(boundary_of(key), []).append(key)
    bar = tqdm(total=n_texts, desc="interventions", disable=not progress, unit="text")
    for start, n, cache in batches:
        rows = slice(start * per_text, (start + n) * per_text)
        pos = positions[start:start + n].to(model.device)
        if cache is None:
            cache, normed = full_cache(model, tokens[start:start + n])
            logits_p = model.unembed_normed(normed[torch.arange(n, device=model.device)[:, None], pos]).flatten(0, 1)
        else:
            logits_p = model.unembed(final_states[rows].to(model.device, model.dtype))
        p = torch.softmax(logits_p.float(), dim=-1)                        # [n * per_text, vocab]
        per_call = max(1, max_rows // n)
        for b, group in by_boundary.items():
            for chunk in (group[i:i + per_call] for i in range(0, len(group), per_call)):
                # query order (text, position, variant): the variants of one P lie side by side
                hidden = torch.stack([values[key][rows] for key in chunk], dim=1).reshape(n, -1, d)
                queries = pos.repeat_interleave(len(chunk), dim=1)
                normed_q = run_queries(model, cache, seq_len, b, hidden, queries)
                logits_q = model.unembed_normed(normed_q).reshape(n * per_text, len(chunk), -1)
                kl = kl_many(logits_p, logits_q, p).cpu()                          # [n * per_text, len(chunk)]
                for i, key in enumerate(chunk):
                    out[key][rows] = kl[:, i]
        bar.update(n)
    bar.close()


def _kl_from_prefix_caches(model: Backend, tokens: Tensor, positions: Tensor, values: Mapping[Hashable, Tensor],
                           keys: list, out: dict, kl_positions: str, max_rows: int, progress: bool) -> None:
    """Mamba, short sliding windows and ``"later"``: the prefix of each text is processed once,
    with a cache copied at each sampled position, and each position's interventions run as one batch."""
    n_texts, per_text = positions.shape
    groups = [keys[i:i + max_rows] for i in range(0, len(keys), max_rows)]
    for t in tqdm(range(n_texts), desc="interventions", disable=not progress, unit="text"):
        cuts = positions[t].tolist()
        caches = prefix_caches(model, tokens[t:t + 1], cuts)
        for j, p in enumerate(cuts):
            row = t * per_text + j
            end = p + 1 if kl_positions == "next" else tokens.shape[1]
            for group in groups:
                n_rows = len(group) + 1  # row 0 stays unpatched: it gives P_orig from the same cache
                segment = tokens[t:t + 1, p:end].expand(n_rows, -1)
                patches = [Patch(boundary_of(key), torch.tensor([i + 1]), torch.tensor([0]), values[key][row:row + 1])
                           for i, key in enumerate(group)]
                logits = model.run_with_patches(segment, patches,
                                                **cache_kwargs(model, repeat_cache(caches[j], n_rows)))
                kl = kl_divergence(logits[:1], logits[1:]).mean(dim=-1)     # [len(group)]
                for i, key in enumerate(group):
                    out[key][row] = kl[i]


def patched_kl_plain(model: Backend, tokens: Tensor, positions: Tensor, values: Mapping[int, Tensor],
                     kl_positions: Literal["next", "later"] = "next") -> dict[int, Tensor]:
    """The same numbers as :func:`patched_kl`, with one full forward per intervention (reference)."""
    _check(model, tokens, positions, values)
    n_texts, per_text = positions.shape
    out = {key: torch.zeros(n_texts * per_text, dtype=torch.float64) for key in values}
    for t in range(n_texts):
        base = model.logits(tokens[t:t + 1])
        for j, p in enumerate(positions[t].tolist()):
            row = t * per_text + j
            end = p + 1 if kl_positions == "next" else tokens.shape[1]
            for key, v in values.items():
                patched = model.run_with_patch(tokens[t:t + 1], boundary_of(key), torch.tensor([p]), v[row:row + 1])
                out[key][row] = kl_divergence(base[0, p:end], patched[0, p:end]).mean()
    return out
