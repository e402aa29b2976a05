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
