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
position's interventions run as one batch of steps (see :mod:`toolkit.backends.incremental`).
Where the logits are affine in the final-normed state (every supported head but a soft-capped
one), the KL is taken from the normed states and the unembedding, several boundaries' variants per
pass over the vocabulary, without forming their logits (:func:`toolkit.decompose.kl.kl_from_normed`).
:func:`patched_kl_plain` is the plain reference (one full forward per intervention) that tests and
benchmarks compare against.

Example:
    Patching ``h_11`` with its own value changes nothing; with a shuffled one, the output moves:

    >>> import torch
    >>> tokens = model.to_tokens("The capital of France is Paris, and the capital of Spain is")   # [1, T]
    >>> positions = torch.tensor([[4, 9]])
    >>> h11 = model.hidden_states(tokens, layers=[11])[0][0, positions[0]]      # [2, d]: rows as in CollectedStates
    >>> kl = patched_kl(model, tokens, positions, {11: h11, ("swapped", 11): h11.flip(0)}, progress=False)
    >>> float(kl[11].abs().max()) < 1e-4, bool((kl[("swapped", 11)] > 0.1).all())
    (True, True)
"""
from __future__ import annotations

from typing import Hashable, Literal, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from toolkit.backends.base import Backend, Patch
from toolkit.backends.incremental import (cache_kwargs, full_cache, full_cache_supported, prefix_caches,
                                          repeat_cache, run_queries)
from toolkit.decompose.kl import kl_divergence, kl_from_normed, kl_many, linear_unembedding
from toolkit.models.placement import output_device, parameter

__all__ = ["kl_divergence", "kl_many", "boundary_of", "patched_kl", "patched_kl_plain"]


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

    A remote model (``model.remote``, see :mod:`toolkit.backends.remote`) runs the interventions
    as a few nnsight sessions, one row per (text, anchor, key) cut after the last position it
    needs, and only the KL values come back (taken in float64 from the logits on the server).
    """
    _check(model, tokens, positions, values)
    keys = sorted(values, key=boundary_of)
    n_texts, per_text = positions.shape
    out = {key: torch.zeros(n_texts * per_text, dtype=torch.float64) for key in keys}
    if model.remote:        # a few requests; only the per-anchor KL comes back
        requests = model.remote_kl(tokens, positions, values, {key: boundary_of(key) for key in keys},
                                   next_only=kl_positions == "next", max_rows=max_rows)
        for first, kl in tqdm(requests, desc="interventions (remote)", disable=not progress, unit="request"):
            for key in keys:
                out[key][first * per_text:first * per_text + kl[key].shape[0]] = kl[key]
        return out
    if not model.kv_cache_support:  # no transformers cache (HookedTransformer): full forwards through the library
        return patched_kl_plain(model, tokens, positions, values, kl_positions)
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
                         progress: bool, kl_rows: int = 576) -> None:
    """Each batch of texts is run once; then, per boundary ``b``, every (variant, sampled position)
    enters at ``h_b`` as a query against the texts' caches and runs blocks ``b..L-1`` only."""
    n_texts, per_text = positions.shape
    seq_len, d = tokens.shape[1], model.d_model
    by_boundary: dict[int, list] = {}
    for key in keys:
        by_boundary.setdefault(boundary_of(key), []).append(key)
    head = linear_unembedding(model.hf_model)      # then KL from hidden states: no variant's logits formed
    # The KL runs where the head runs; its weights are read once (loaded when offloaded).
    kl_device = output_device(model.hf_model)
    weight = None if head is None else parameter(head)
    bias = None if head is None or head.bias is None else parameter(head, "bias")
    pending: list[tuple[list, Tensor]] = []            # (keys, normed_q) not yet scored

    def score() -> None:
        # Several boundaries' variants scored at once: the vocabulary products run on >= kl_rows
        # rows (192-row products run at 70% of the speed of 576-row ones here).
        names = [key for chunk, _ in pending for key in chunk]
        normed_q = torch.cat([q.to(kl_device) for _, q in pending], dim=1)
        if head is not None:
            kl = kl_from_normed(normed_p, normed_q, weight, bias, p, p_weight)
        else:
            kl = kl_many(logits_p, model.unembed_normed(normed_q), p)
        kl = kl.cpu()                                                       # [n * per_text, len(names)]
        for i, key in enumerate(names):
            out[key][rows] = kl[:, i]
        pending.clear()

    bar = tqdm(total=n_texts, desc="interventions", disable=not progress, unit="text")
    for start, n, cache in batches:
        rows = slice(start * per_text, (start + n) * per_text)
        pos = positions[start:start + n]
        if cache is None:
            cache, normed = full_cache(model, tokens[start:start + n])
            normed_p = normed[torch.arange(n, device=normed.device)[:, None], pos.to(normed.device)].flatten(0, 1)
        else:
            normed_p = model.final_norm(final_states[rows].to(model.boundary_device(model.n_layers), model.dtype))
        normed_p = normed_p.to(kl_device)
        logits_p = model.unembed_normed(normed_p).to(kl_device)
        p = torch.softmax(logits_p.float(), dim=-1)                        # [n * per_text, vocab]
        p_weight = None if head is None else p @ weight.float()            # shared by every boundary
        per_call = max(1, max_rows // n)
        for b, group in by_boundary.items():
            for chunk in (group[i:i + per_call] for i in range(0, len(group), per_call)):
                # query order (text, position, variant): the variants of one P lie side by side
                hidden = torch.stack([values[key][rows] for key in chunk], dim=1).reshape(n, -1, d)
                queries = pos.repeat_interleave(len(chunk), dim=1)
                normed_q = run_queries(model, cache, seq_len, b, hidden, queries)
                pending.append((chunk, normed_q.reshape(n * per_text, len(chunk), d)))
                if head is None or sum(len(c) for c, _ in pending) * n * per_text >= kl_rows:
                    score()
        if pending:
            score()
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
