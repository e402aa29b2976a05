"""Collect hidden states at layer boundaries for sampled positions, cached on disk.

``collect_hidden_states`` runs a model over fixed-length texts in batches, keeps only the
sampled positions (so memory stays bounded by one batch), streams them to a disk store
and returns a :class:`CollectedStates` whose ``pairs(l)`` gives the ``(h_l, h_{l+1})``
training pairs of block ``l``. The store is keyed by (model fingerprint, backend, dtype,
the token ids, the positions, the boundaries); a second call with the same inputs loads
it without running the model.

Example:
    >>> import torch
    >>> tokens = torch.randint(0, 1000, (4, 16)); positions = torch.tensor([[5, 12]] * 4)
    >>> states = collect_hidden_states(model, tokens, positions, layers=[3], use_cache=False, progress=False)
    >>> X, Y = states.pairs(3)            # h_3 and h_4 at the 8 positions     # model = toolkit.load_model()
    >>> tuple(X.shape), tuple(Y.shape)
    ((8, 576), (8, 576))
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from toolkit.backends.base import Backend
from toolkit.collection.store import EntryWriter, boundary_file, read_meta
from toolkit.models.fingerprint import weights_fingerprint
from toolkit.models.weights import cache_root


@dataclass
class CollectedStates:
    """Hidden states at sampled positions for a set of layer boundaries.

    Row ``i`` of every boundary array belongs to text ``text_index[i]`` at position
    ``position[i]``, whose token is ``token[i]``. Arrays are memory-mapped from the store.
    """

    directory: Path
    meta: dict
    tokens: Tensor                         # [n_texts, seq_len]
    positions: Tensor                      # [n_texts, per_text]
    _arrays: dict = field(default_factory=dict, repr=False)
    # Runtime only, never stored: (first text, cache) per batch when collected with keep_kv_cache.
    kv_caches: list | None = field(default=None, repr=False)

    @property
    def boundaries(self) -> list[int]:
        return list(self.meta["boundaries"])

    @property
    def layers(self) -> list[int]:
        """Blocks ``l`` whose pairs (h_l, h_{l+1}) are both stored."""
        b = set(self.boundaries)
        return [l for l in sorted(b) if l + 1 in b]

    @property
    def text_index(self) -> Tensor:
        return torch.arange(self.tokens.shape[0]).repeat_interleave(self.positions.shape[1])

    @property
    def position(self) -> Tensor:
        return self.positions.reshape(-1)

    @property
    def token(self) -> Tensor:
        return self.tokens[self.text_index, self.position]

    def hidden(self, boundary: int) -> Tensor:
        """``[n_rows, d_model]`` float32 states at ``boundary`` (loaded into memory)."""
        if boundary not in self.boundaries:
            raise KeyError(f"boundary {boundary} was not collected; collected: {self.boundaries}.")
        if boundary not in self._arrays:
            self._arrays[boundary] = np.load(self.directory / boundary_file(boundary), mmap_mode="r")
        return torch.from_numpy(np.array(self._arrays[boundary]))

    def pairs(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(h_layer, h_{layer+1})`` at the sampled positions: the input and output of block ``layer``."""
        if layer not in self.layers:
            raise KeyError(f"pairs for block {layer} were not collected; blocks with pairs: {self.layers}.")
        return self.hidden(layer), self.hidden(layer + 1)


def model_fingerprint(model: Backend) -> str:
    """The model's identity from its weights and config (:func:`toolkit.models.fingerprint.weights_fingerprint`),
    not its name or folder: moving the weights or the cache keeps it."""
    return weights_fingerprint(model.hf_model)


def cache_key(model: Backend, tokens: Tensor, positions: Tensor, boundaries: Sequence[int],
              fingerprint: str | None = None) -> str:
    h = hashlib.sha256()
    fingerprint = fingerprint or model_fingerprint(model)
    settings = {"model": fingerprint, "backend": model.name, "dtype": str(model.dtype),
                "boundaries": list(boundaries)}
    if model.remote:        # states computed elsewhere (NDIF's hardware and checkpoint) are kept apart
        settings["remote"] = model.remote
    h.update(json.dumps(settings).encode())
    h.update(tokens.cpu().numpy().astype(np.int64).tobytes())
    h.update(positions.cpu().numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:24]


def boundaries_for(model: Backend, layers: Sequence[int] | None) -> list[int]:
    """Boundaries needed for the pairs of blocks ``layers`` (default: all blocks)."""
    if layers is None:
        return list(range(model.n_layers + 1))
    out = set()
    for l in layers:
        if not isinstance(l, int) or not 0 <= l < model.n_layers:
            raise ValueError(f"layer {l!r} is out of range: {model.info.model_id} has {model.n_layers} blocks, "
                             f"numbered 0..{model.n_layers - 1}.")
        out.update((l, l + 1))
    return sorted(out)


def collect_hidden_states(model: Backend, tokens: Tensor, positions: Tensor, layers: Sequence[int] | None = None,
                          batch_size: int = 8, cache_dir: str | Path | None = None, use_cache: bool = True,
                          progress: bool = True, keep_kv_cache: bool = False) -> CollectedStates:
    """Hidden states of ``model`` at ``positions`` of ``tokens`` for the pairs of blocks ``layers``.

    Args:
        tokens: ``[n_texts, seq_len]`` token ids (see :func:`toolkit.data.chunk_corpus`).
        positions: ``[n_texts, per_text]`` positions to keep in each text.
        layers: blocks whose pairs ``(h_l, h_{l+1})`` are wanted; default all.
        batch_size: texts per forward pass.
        cache_dir: store folder (default ``$TOOLKIT_CACHE/activations``); ``use_cache=False`` recomputes
            and overwrites.
        keep_kv_cache: when the model runs (no store hit) and every block runs (the last boundary is
            collected), keep each batch's attention cache in ``kv_caches``, so that interventions on
            these texts need not run them again (:func:`toolkit.decompose.interventions.patched_kl`).

    A remote model (``model.remote``) collects in a few nnsight sessions (NDIF, or nnsight's
    simulation), each returning only the sampled positions; its store entries are kept apart.
    """
    if tokens.ndim != 2 or positions.ndim != 2 or positions.shape[0] != tokens.shape[0]:
        raise ValueError(f"tokens must be [n_texts, seq_len] and positions [n_texts, per_text]; got "
                         f"{tuple(tokens.shape)} and {tuple(positions.shape)}.")
    if tokens.shape[0] == 0:
        raise ValueError("no texts to collect from: the token tensor is empty.")
    if positions.min() < 0 or positions.max() >= tokens.shape[1]:
        raise ValueError(f"positions must lie in [0, {tokens.shape[1] - 1}] for texts of {tokens.shape[1]} tokens.")
    model.check_tokens(tokens[:1])
    boundaries = boundaries_for(model, layers)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "activations"
    fingerprint = model_fingerprint(model)
    entry = root / cache_key(model, tokens, positions, boundaries, fingerprint)
    if use_cache and read_meta(entry) is not None:
        return _open(entry)

    n_texts, per_text = positions.shape
    meta = {"model_id": model.info.model_id, "model_fingerprint": fingerprint, "backend": model.name,
            "dtype": str(model.dtype), "boundaries": boundaries, "n_texts": n_texts, "seq_len": tokens.shape[1],
            "per_text": per_text, "d_model": model.d_model}
    keep_kv_cache = (keep_kv_cache and model.kv_cache_support and model.n_layers in boundaries
                     and model.info.architecture != "mamba"
                     and not model.remote)      # a remote run keeps nothing but the sampled states
    kv_caches: list | None = [] if keep_kv_cache else None
    with EntryWriter(entry, n_texts * per_text, model.d_model, boundaries) as writer:
        if model.remote:    # one request per group of texts; only the sampled positions come back
            for first, picked in tqdm(model.remote_states(tokens, positions, boundaries, batch_size=batch_size),
                                      desc=f"collect {model.info.model_id} (remote)", disable=not progress,
                                      unit="request"):
                picked = picked.numpy()
                writer.write_rows(first * per_text, {l: picked[i] for i, l in enumerate(boundaries)})
        bar = tqdm(range(0, 0 if model.remote else n_texts, batch_size), desc=f"collect {model.info.model_id}",
                   disable=not progress or model.remote, unit="batch")
        for start in bar:
            ids = tokens[start:start + batch_size]
            pos = positions[start:start + batch_size]
            kv = _new_kv_cache(model) if keep_kv_cache else None
            hs = model.hidden_states(ids, boundaries, kv_cache=kv)      # [n_b, B, T, d]
            if kv is not None:
                kv_caches.append((start, kv))
            rows = torch.arange(ids.shape[0], device=hs.device)[:, None]
            picked = hs[:, rows, pos.to(hs.device)].reshape(len(boundaries), -1, model.d_model)
            picked = picked.float().cpu().numpy()
            writer.write_rows(start * per_text, {l: picked[i] for i, l in enumerate(boundaries)})
        writer.commit(meta, tokens=tokens.cpu().numpy().astype(np.int64),
                      positions=positions.cpu().numpy().astype(np.int64))
    states = _open(entry)
    states.kv_caches = kv_caches
    return states


def _new_kv_cache(model: Backend):
    from transformers import DynamicCache
    return DynamicCache(config=model.hf_model.config)


def kv_cache_bytes(model: Backend, n_texts: int, seq_len: int) -> int:
    """Memory the attention caches of ``n_texts`` texts take (keys and values of every block)."""
    config = model.hf_model.config
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or model.d_model // getattr(config, "num_attention_heads", 1)
    return 2 * model.n_layers * heads * head_dim * seq_len * n_texts * model.dtype.itemsize


def _open(entry: Path) -> CollectedStates:
    meta = read_meta(entry)
    if meta is None:
        raise RuntimeError(f"activation store {entry} is incomplete or corrupt; delete it and collect again.")
    return CollectedStates(directory=entry, meta=meta, tokens=torch.from_numpy(np.load(entry / "tokens.npy")),
                           positions=torch.from_numpy(np.load(entry / "positions.npy")))


def load_collected(directory: str | Path) -> CollectedStates:
    """Reopen a store entry by its folder (as printed by the CLI)."""
    return _open(Path(directory))
