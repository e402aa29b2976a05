"""Interventions: replace ``h_b`` at one position, propagate, and measure the output change.

For a test anchor (text, position p) and a boundary b, the intervention replaces
``h_b[p]`` by a given vector (for the decomposition: ``T(h_{b-1})``, the tokenwise map's
prediction) and runs the remaining layers. The output change is
``KL(P_orig || P_patched)`` of the next-token distribution at p (or averaged over p and all
later positions with ``positions="later"``).

The fast path never recomputes what cannot change: positions before p are read from a
cache. For attention models each text is run once to fill a cache, then every sampled
position of the text is re-run as a query against it (a mask hides later keys), with one batch
row per boundary and one unpatched row for ``P_orig``: one call per text. For Mamba (a
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
                                          repeat_cache, sampled_tokens_kwargs)


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(P || Q)`` over the last dimension, from logits, in float64 for small values."""
    logp = torch.log_softmax(logits_p.double(), dim=-1)
    logq = torch.log_softmax(logits_q.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


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
               kl_positions: Literal["next", "later"] = "next", max_rows: int = 32,
               progress: bool = True) -> dict[Hashable, Tensor]:
    """KL of the output after each replacement, by the cached fast path.

    Args:
        tokens: ``[n_texts, seq_len]``; positions: ``[n_texts, per_text]`` sorted ascending per text.
        values: key -> ``[n_texts * per_text, d_model]`` replacement for ``h_b`` at each row, where the
            key is the boundary ``b`` or a tuple ending in it (several variants per boundary).
        kl_positions: ``"next"`` (the patched position's next-token distribution) or ``"later"``
            (mean KL over the patched position and every later one).
        max_rows: interventions per forward call (bounds the memory of the repeated cache).
    Returns:
        key -> ``[n_texts * per_text]`` KL in nats (float64).
    """
    _check(model, tokens, positions, values)
    keys = sorted(values, key=boundary_of)
    n_texts, per_text = positions.shape
    out = {key: torch.zeros(n_texts * per_text, dtype=torch.float64) for key in keys}
    groups = [keys[i:i + max_rows] for i in range(0, len(keys), max_rows)]
    all_at_once = kl_positions == "next" and full_cache_supported(model, tokens.shape[1], per_text)
    for t in tqdm(range(n_texts), desc="interventions", disable=not progress, unit="text"):
        rows = slice(t * per_text, (t + 1) * per_text)
        if all_at_once:
            # Every sampled position is a query against the full-text cache: one call per group.
            cache = full_cache(model, tokens[t:t + 1])
            every_query = torch.arange(per_text)
            for group in groups:
                n_rows = len(group) + 1  # row 0 stays unpatched: it gives P_orig from the same cache
                kwargs = sampled_tokens_kwargs(model, cache, tokens.shape[1], positions[t], n_rows)
                queries = tokens[t, positions[t]][None].expand(n_rows, -1)
                patches = [Patch(boundary_of(key), torch.full((per_text,), i + 1), every_query, values[key][rows])
                           for i, key in enumerate(group)]
                logits = model.run_with_patches(queries, patches, **kwargs)      # [n_rows, per_text, vocab]
                kl = kl_divergence(logits[:1], logits[1:])                        # [len(group), per_text]
                for i, key in enumerate(group):
                    out[key][rows] = kl[i]
            continue
        cuts = positions[t].tolist()
        caches = prefix_caches(model, tokens[t:t + 1], cuts)
        for j, p in enumerate(cuts):
            row = t * per_text + j
            end = p + 1 if kl_positions == "next" else tokens.shape[1]
            for group in groups:
                n_rows = len(group) + 1
                segment = tokens[t:t + 1, p:end].expand(n_rows, -1)
                patches = [Patch(boundary_of(key), torch.tensor([i + 1]), torch.tensor([0]), values[key][row:row + 1])
                           for i, key in enumerate(group)]
                logits = model.run_with_patches(segment, patches,
                                                **cache_kwargs(model, repeat_cache(caches[j], n_rows)))
                kl = kl_divergence(logits[:1], logits[1:]).mean(dim=-1)     # [len(group)]
                for i, key in enumerate(group):
                    out[key][row] = kl[i]
    return out


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
