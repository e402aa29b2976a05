"""Cached prefixes: run only what a patch at position p can change.

Replacing ``h_l`` at position ``p`` changes nothing before ``p``. For the next-token
distribution at ``p`` it is enough to (1) process the prefix ``[0, p)`` once and keep the
model's cache (attention keys/values, or Mamba's conv and SSM states), and (2) run the single
token at ``p`` against that cache, with one batch row per intervention. These helpers use
transformers' own cache API, so they serve every architecture either backend serves.

For attention models a cache of the *whole* text serves every position at once (a mask hides
the later keys), and a patch at boundary ``b`` needs only blocks ``b..L-1``: :func:`run_queries`
enters the model at ``h_b`` (:func:`entering_at`), so nothing below the patch is recomputed.

Example:
    A query that re-enters an unchanged ``h_12`` gets the full forward's output back, running blocks 12.. only:

    >>> import torch
    >>> text = model.to_tokens("The capital of France is Paris, and the capital of Spain is")   # [1, T]
    >>> cache, normed = full_cache(model, text)               # whole texts, once
    >>> positions = torch.tensor([[4, 9]])
    >>> h12 = model.hidden_states(text, layers=[12])[0][:, positions[0]]        # [1, 2, d]
    >>> out = run_queries(model, cache, text.shape[1], 12, h12, positions)
    >>> torch.allclose(out, normed[:, positions[0]], atol=1e-4)
    True
    >>> caches = prefix_caches(model, text, [5, 9])          # states after 5 and after 9 tokens
    >>> caches[1].get_seq_length(), repeat_cache(caches[0], 3).layers[0].keys.shape[0]
    (9, 3)
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor, nn

from toolkit.backends.base import Backend
from toolkit.models.architectures import spec_for


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
    """Whether :func:`run_queries` applies: an attention model whose cache keeps every position
    (no sliding window shorter than the text plus the queries)."""
    if model.info.architecture == "mamba":
        return False
    window = getattr(model.hf_model.config, spec_for(model.hf_model).window_attr, None)
    return window is None or seq_len + n_queries <= window


def full_cache(model: Backend, input_ids: Tensor):
    """Process whole texts once: ``(cache, final-normed last hidden states [batch, seq, d])``."""
    base = spec_for(model.hf_model).base(model.hf_model)  # no logits needed: skip the unembedding
    with torch.no_grad():
        out = base(model.check_tokens(input_ids), use_cache=True)
    return out.past_key_values, out.last_hidden_state


class _PassThrough(nn.Module):
    """Stands in for a block below the entry boundary: returns its input unchanged (as the block would:
    alone, or first of a tuple)."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor | tuple:
        return (hidden_states, None) if self.as_tuple else hidden_states


class _NoPositions(nn.Module):
    """Stands in for a learned position embedding that ``h_b`` already contains."""

    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        self.width, self.dtype = width, dtype

    def forward(self, position_ids: Tensor) -> Tensor:  # the model's dtype: float32 zeros would promote bf16
        return torch.zeros(*position_ids.shape, self.width, dtype=self.dtype, device=position_ids.device)


@contextmanager
def entering_at(model: Backend, boundary: int):
    """Inside, the HF base model treats ``inputs_embeds`` as ``h_boundary``: the blocks below the
    boundary pass their input through and learned positions are not added again, while rotary
    embeddings, masks and layer types stay the model's own. Restored on exit, even on error."""
    spec = spec_for(model.hf_model)
    base, blocks = spec.base(model.hf_model), spec.blocks(model.hf_model)
    below = list(blocks[:model.check_boundary(boundary)])
    learned = getattr(base, spec.positions_attr) if spec.positions_attr else None
    try:
        for i in range(boundary):
            blocks[i] = _PassThrough(spec.block_returns_tuple)
        if learned is not None:
            setattr(base, spec.positions_attr, _NoPositions(model.d_model, learned.weight.dtype))
        yield base
    finally:
        for i, block in enumerate(below):
            blocks[i] = block
        if learned is not None:
            setattr(base, spec.positions_attr, learned)


def query_mask(model: Backend, seq_len: int, positions: Tensor):
    """Attention mask for queries at ``positions [batch, n_q]`` appended to a full-text cache:
    query ``j`` sees cached keys ``[0, positions[:, j])`` and itself, never the other queries."""
    n_q = positions.shape[1]
    keys = torch.arange(seq_len + n_q, device=model.device)
    own = seq_len + torch.arange(n_q, device=model.device)
    allowed = (keys[None, None, :] < positions[:, :, None].to(model.device)) | (keys[None, :] == own[:, None])[None]
    mask = torch.zeros(allowed.shape, dtype=model.dtype, device=model.device)
    mask = mask.masked_fill(~allowed, torch.finfo(model.dtype).min)[:, None]     # [batch, 1, n_q, keys]
    layer_types = getattr(model.hf_model.config, "layer_types", None)
    return {t: mask for t in set(layer_types)} if layer_types else mask


def run_queries(model: Backend, cache, seq_len: int, boundary: int, hidden: Tensor, positions: Tensor) -> Tensor:
    """Final-normed outputs of queries entering at ``h_boundary``, against a full-text cache.

    ``hidden [batch, n_q, d]`` is ``h_boundary`` of queries at ``positions [batch, n_q]`` of the
    texts whose cache (from :func:`full_cache`) is ``cache``; each query sees the cached keys
    before its position and itself, exactly as in a full forward where only that position was
    changed at that boundary. Only blocks ``boundary..L-1`` run; the cache is left as it was.
    """
    snapshot = [dict(vars(layer)) for layer in cache.layers]
    try:
        with torch.no_grad(), entering_at(model, boundary) as base:
            out = base(inputs_embeds=hidden.to(model.device, model.dtype), past_key_values=cache, use_cache=True,
                       attention_mask=query_mask(model, seq_len, positions), position_ids=positions.to(model.device))
    finally:  # the cache grew by the queries' keys: put every layer back (update replaces, never mutates)
        for layer, state in zip(cache.layers, snapshot):
            vars(layer).clear()
            vars(layer).update(state)
    return out.last_hidden_state
