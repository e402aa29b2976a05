"""Cached prefixes: run only what a patch at position p can change.

Replacing ``h_l`` at position ``p`` changes nothing before ``p``. For the next-token
distribution at ``p`` it is enough to (1) process the prefix ``[0, p)`` once and keep the
model's cache (attention keys/values, or Mamba's conv and SSM states), and (2) run the single
token at ``p`` against that cache, with one batch row per intervention. These helpers use
transformers' own cache API, so they serve every architecture either backend serves.

Example:
    >>> caches = prefix_caches(model, ids[:1], [5, 9])      # states after 5 and after 9 tokens  # doctest: +SKIP
    >>> step = repeat_cache(caches[0], 30)                   # one row per layer to patch          # doctest: +SKIP
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor

from toolkit.backends.base import Backend


def prefix_caches(model: Backend, input_ids: Tensor, cut_points: Sequence[int]) -> list:
    """Caches after processing ``input_ids[:, :p]`` for each ``p`` in ``cut_points`` (ascending, >= 1).

    The text is processed once, segment by segment; each cache is a deep copy taken at its cut.
    """
    input_ids = model.check_tokens(input_ids)
    cuts = list(cut_points)
    if any(b <= a for a, b in zip(cuts, cuts[1:])) or (cuts and cuts[0] < 1):
        raise ValueError(f"cut points must be ascending and >= 1, got {cuts}.")
    caches, cache, start = [], None, 0
    with torch.no_grad():
        for cut in cuts:
            if cut > start:
                out = model.hf_model(input_ids[:, start:cut], **cache_kwargs(model, cache))
                cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache_params
                start = cut
            caches.append(copy.deepcopy(cache))
    return caches


def cache_kwargs(model: Backend, cache) -> dict:
    """Forward kwargs that continue from ``cache`` (Mamba names it ``cache_params``)."""
    name = "cache_params" if model.info.architecture == "mamba" else "past_key_values"
    return {name: cache, "use_cache": True}


def _repeat_states(value, n: int, batch: int):
    if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value.repeat_interleave(n, dim=0)
    if isinstance(value, list):
        return [_repeat_states(v, n, batch) for v in value]
    if isinstance(value, dict):
        return {k: _repeat_states(v, n, batch) for k, v in value.items()}
    return value


def repeat_cache(cache, n: int):
    """A copy of a batch-1 cache with every row repeated ``n`` times (attention and recurrent layers)."""
    cache = copy.deepcopy(cache)
    for layer in cache.layers:
        if hasattr(layer, "keys") and isinstance(getattr(layer, "keys"), Tensor):
            layer.batch_repeat_interleave(n)
        else:  # recurrent layers (Mamba) have no batch_repeat_interleave in transformers 5
            for name, value in vars(layer).items():
                setattr(layer, name, _repeat_states(value, n, 1))
    return cache


def full_cache_supported(model: Backend, seq_len: int, n_queries: int) -> bool:
    """Whether :func:`sampled_tokens_kwargs` applies: an attention model whose cache keeps every
    position (no sliding window shorter than the text plus the queries)."""
    if model.info.architecture == "mamba":
        return False
    window = getattr(model.hf_model.config, "sliding_window", None)
    return window is None or seq_len + n_queries <= window


def full_cache(model: Backend, input_ids: Tensor):
    """The cache after processing the whole text (batch 1)."""
    from toolkit.models.architectures import spec_for
    base = spec_for(model.hf_model).base(model.hf_model)  # no logits needed: skip the unembedding
    with torch.no_grad():
        return base(model.check_tokens(input_ids), use_cache=True).past_key_values


def sampled_tokens_kwargs(model: Backend, cache, seq_len: int, positions: Tensor, n_rows: int) -> dict:
    """Forward kwargs to re-run the tokens at ``positions`` as new queries against a full-text cache.

    Query ``j`` sees cached keys ``[0, positions[j])`` and itself, never the other queries, with
    its own position id; so one call re-computes every sampled position of a text at once, and a
    patch at query ``j`` affects only query ``j``, exactly as in a full forward.
    """
    n_q = positions.numel()
    keys = torch.arange(seq_len + n_q, device=model.device)
    pos = positions.to(model.device)[:, None]
    allowed = (keys[None, :] < pos) | (keys[None, :] == seq_len + torch.arange(n_q, device=model.device)[:, None])
    mask = torch.zeros(allowed.shape, dtype=model.dtype, device=model.device)
    mask = mask.masked_fill(~allowed, torch.finfo(model.dtype).min)[None, None].expand(n_rows, 1, n_q, -1)
    layer_types = getattr(model.hf_model.config, "layer_types", None)
    attention_mask = {t: mask for t in set(layer_types)} if layer_types else mask
    return {"past_key_values": repeat_cache(cache, n_rows), "use_cache": True, "attention_mask": attention_mask,
            "position_ids": pos.T.expand(n_rows, -1)}
