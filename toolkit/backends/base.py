"""The one small interface every analysis uses to talk to a model.

A :class:`Backend` wraps a HuggingFace causal LM through either TransformerLens
(``TransformerBridge``) or nnsight. Analysis code only ever calls the methods here,
so each analysis is written once and runs through both libraries.

Layer boundaries
----------------
``h_l`` is the residual stream at boundary ``l`` for ``l = 0 .. n_layers``:

* ``h_0`` is the input of the first block: the token embeddings, plus learned
  position embeddings where the model has them (GPT-2), times Gemma's
  ``sqrt(d_model)`` scale where the model applies it inside the embedding.
* ``h_l`` (``1 <= l <= n_layers``) is the output of block ``l - 1``, which is also
  the input of block ``l``.
* ``h_{n_layers}`` is the last block's output *before* the final norm.

So the layer transition of block ``l`` is ``h_l -> h_{l+1}``, and logits are
``unembed(h_{n_layers})`` = ``lm_head(final_norm(h_{n_layers}))``.

Example:
    >>> import torch, toolkit
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = toolkit.make_backend(tiny_hf_model("llama"))   # or toolkit.load_model("smollm2-135m")
    >>> ids = torch.tensor([[5, 6, 7, 8]])                    # or a string, with a tokenizer
    >>> hs = model.hidden_states(ids)                         # [n_layers+1, batch, seq, d_model]
    >>> hs.shape
    torch.Size([3, 1, 4, 64])
    >>> logits = model.run_with_patch(ids, layer=1, positions=torch.tensor([[3]]), values=hs[1, :, [3]])
    >>> torch.allclose(logits, model.logits(ids), atol=1e-5)  # patching h_1 with itself changes nothing
    True
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from toolkit.models.placement import execution_device, input_device, parameter

if TYPE_CHECKING:
    from toolkit.prompts import Prompt


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a loaded model."""

    model_id: str           # registry name, hub id or local path it was loaded from
    architecture: str       # family: llama, qwen3, gemma3, gpt2, gpt_neox, mamba
    n_layers: int
    d_model: int
    n_ctx: int              # longest sequence the model accepts
    vocab_size: int


class Backend(ABC):
    """A loaded model seen through one interpretability library.

    Subclasses: :class:`toolkit.backends.nnsight_backend.NNsightBackend`,
    :class:`toolkit.backends.transformer_lens_backend.TransformerLensBackend` and (TransformerLens 3)
    :class:`toolkit.backends.hooked_backend.HookedTransformerBackend`. All hold the same HuggingFace
    model in ``hf_model`` (raw HF numerics, no weight processing), so they agree to float tolerance.
    """

    name: str = "abstract"
    #: Where traces run: ``False`` here, ``True`` on NDIF, ``"local"`` nnsight's simulation of a
    #: remote run (see :mod:`toolkit.backends.remote`). Only the nnsight backend runs remotely.
    remote: bool | str = False
    wraps_in_place: bool = False  # the library instrumented the caller's HF model itself (see make_backend)
    #: ``hidden_states(kv_cache=...)`` / ``run_with_patches(past_key_values=...)`` take a transformers cache.
    kv_cache_support: bool = True

    def __init__(self, hf_model: nn.Module, tokenizer, info: ModelInfo):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.info = info

    # ----- facts --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def d_model(self) -> int:
        return self.info.d_model

    @property
    def n_ctx(self) -> int:
        return self.info.n_ctx

    @property
    def device(self) -> torch.device:
        """Where token ids and input embeddings go: the input embedding's execution device.

        For a model dispatched by accelerate (``device_map``) blocks may sit on other devices or be
        offloaded (their parameters on ``meta`` between calls); tensors meant for block ``l`` go to
        :meth:`boundary_device` instead.
        """
        return input_device(self.hf_model)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' floating dtype (offloaded ones keep theirs on ``meta``)."""
        return next(p.dtype for p in self.hf_model.parameters() if p.is_floating_point())

    def boundary_device(self, layer: int) -> torch.device:
        """The device ``h_layer`` is consumed on: block ``layer``'s (the final norm's for the last boundary)."""
        self.check_boundary(layer)
        module = self.final_norm if layer == self.n_layers else self.blocks[layer]
        return execution_device(module)

    def __repr__(self) -> str:
        i = self.info
        return (f"{type(self).__name__}({i.model_id!r}, arch={i.architecture}, layers={i.n_layers}, "
                f"d_model={i.d_model}, dtype={self.dtype}, device={self.device})")

    # ----- checks shared by every backend -------------------------------------------------
    def check_boundary(self, layer: int) -> int:
        """Return ``layer`` if it names a boundary 0..n_layers, else raise a clear error."""
        if not isinstance(layer, int) or not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer boundary {layer!r} is out of range: {self.info.model_id} has "
                             f"{self.n_layers} blocks, so boundaries run from 0 (embeddings) to "
                             f"{self.n_layers} (last block output).")
        return layer

    def check_tokens(self, input_ids: "Prompt") -> Tensor:
        """A prompt (text, list of texts or ids; see :func:`toolkit.prompts.ensure_tokens`) as a checked
        ``[batch, seq]`` id tensor on the model's device."""
        from toolkit.prompts import ensure_tokens
        input_ids = ensure_tokens(self, input_ids)
        if input_ids.shape[1] > self.n_ctx:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than the context of "
                             f"{self.info.model_id} ({self.n_ctx}); use a shorter seq_len or truncate the prompt.")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.info.vocab_size):
            bad = int(input_ids.max()) if int(input_ids.max()) >= self.info.vocab_size else int(input_ids.min())
            raise ValueError(f"token id {bad} is outside {self.info.model_id}'s vocabulary (0..{self.info.vocab_size - 1}); "
                             f"were the ids made by another model's tokenizer? Tokenise with this model's "
                             f"(model.to_tokens) or pass ids below {self.info.vocab_size}.")
        return input_ids.to(self.device)

    # ----- tokens ---------------------------------------------------------------------------
    def to_tokens(self, texts: str | Sequence[str], prepend_bos: bool = True) -> Tensor:
        """Tokenise one text or equal-length texts into a [batch, seq] LongTensor.

        ``prepend_bos`` adds the tokenizer's BOS token where the tokenizer has one and
        would add it by default (Gemma); SmolLM2 and GPT-2 add none.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.tokenizer is None:
            raise ValueError(f"{self.info.model_id} was wrapped without a tokenizer; pass tokenizer= to "
                             f"toolkit.make_backend, or give token ids.")
        enc = self.tokenizer(texts, add_special_tokens=prepend_bos, return_tensors="pt", padding=len(texts) > 1)
        return self.check_tokens(enc["input_ids"])

    def to_str_tokens(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Decode each id on its own, as TransformerLens' ``to_str_tokens`` does."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    # ----- the interface ------------------------------------------------------------------
    @abstractmethod
    def hidden_states(self, input_ids: "Prompt", layers: Sequence[int] | None = None,
                      kv_cache=None) -> Float[Tensor, "n_boundaries batch seq d_model"]:
        """Residual stream at the chosen boundaries (default all): ``[len(layers), batch, seq, d_model]``.

        ``kv_cache`` (a transformers ``DynamicCache``) is filled with the keys and values of the
        blocks that run, for cached steps later (:mod:`toolkit.backends.incremental`). Blocks above
        the highest boundary asked for may not run.
        """

    def run_with_patch(self, input_ids: "Prompt", layer: int, positions: Int[Tensor, "batch n"],
                       values: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch seq vocab"]:
        """Logits ``[batch, seq, vocab]`` after replacing ``h_layer`` at ``positions`` with ``values``.

        ``positions`` is ``[batch, n]`` (or ``[batch]`` for one position a row) and ``values``
        is ``[batch, n, d_model]`` (or ``[batch, d_model]``). Row ``b`` of the batch has
        ``h_layer[b, positions[b, j]]`` replaced by ``values[b, j]``, and every later layer
        sees the replacement.
        """
        input_ids = self.check_tokens(input_ids)
        positions, values = normalize_patch(positions, values, input_ids.shape[0], self.d_model)
        rows = torch.arange(input_ids.shape[0])[:, None].expand_as(positions)
        return self.run_with_patches(input_ids, [Patch(layer, rows.reshape(-1), positions.reshape(-1),
                                                       values.reshape(-1, self.d_model))])

    @abstractmethod
    def run_with_patches(self, input_ids: "Prompt", patches: Sequence["Patch"],
                         **forward_kwargs) -> Float[Tensor, "batch seq vocab"]:
        """Logits after applying several patches, possibly at different boundaries, in one pass.

        Each :class:`Patch` replaces ``h_layer[rows[i], positions[i]]`` with ``values[i]``.
        ``forward_kwargs`` go to the HF forward (e.g. ``past_key_values`` for cached steps).
        """

    # ----- remote execution (NDIF) ------------------------------------------------------------
    def with_remote(self, remote: bool | str) -> "Backend":
        """This model with its traces run remotely (``True``: NDIF, ``"local"``: nnsight's simulation).

        ``remote=False`` returns the model unchanged. Backends without remote execution refuse.
        """
        if not remote:
            return self
        raise no_remote_error(self.name, remote)

    def remote_states(self, tokens: Tensor, positions: Tensor, boundaries: Sequence[int], batch_size: int = 8):
        """Remote collection: yield ``(first text, [len(boundaries), n_texts_in_request * per_text, d])``
        float32 states at ``positions`` of ``tokens``, one item per request."""
        raise ValueError(f"{type(self).__name__} does not run remotely; call with_remote(...) on an nnsight model.")

    def remote_kl(self, tokens: Tensor, positions: Tensor, values: dict, boundaries: dict, next_only: bool = True,
                  max_rows: int = 32):
        """Remote interventions: yield ``(first text, {key: KL [n_texts_in_request * per_text]})`` per request,
        ``h_{boundaries[key]}`` at each anchor replaced by ``values[key]``'s row."""
        raise ValueError(f"{type(self).__name__} does not run remotely; call with_remote(...) on an nnsight model.")

    def target_function(self, input_ids: Int[Tensor, "seq"], kind: str, layer: int | None,
                        position: int = -1) -> Callable[[Tensor], Tensor] | None:
        """This library's own ``f: h_0 [T, d] -> y [d]`` for a Jacobian target, or ``None`` if it has none.

        ``kind`` is ``"output"`` (the final-norm state) or ``"resid"`` (boundary ``layer``); ``f``
        runs the model through the library's own hooking (an nnsight trace, TransformerLens
        hooks) with ``x`` written into block 0's input, so a detached Jacobian can be taken
        through it. The analyses fall back to driving the HF model directly where this is
        ``None`` (the default, and every other target kind).
        """
        return None

    @property
    def frozen_module(self) -> nn.Module:
        """The module tree :meth:`target_function`'s ``f`` runs: what a detached Jacobian through this
        backend freezes. The HF model here (both libraries instrument it in place); a backend whose
        library holds its own copy of the weights (``HookedTransformer``) returns that.

        Example:
            >>> model.frozen_module is model.hf_model      # model = toolkit.load_model(): nnsight
            True
        """
        return self.hf_model

    def logits(self, input_ids: "Prompt") -> Float[Tensor, "batch seq vocab"]:
        """Plain forward pass: ``[batch, seq, vocab]``."""
        with torch.no_grad():
            return self.hf_model(self.check_tokens(input_ids)).logits

    # ----- embedding, final norm, unembedding (shared HF modules) ---------------------------
    @property
    def W_E(self) -> Tensor:
        """Token embedding matrix ``[vocab, d_model]`` (before any Gemma scale); loaded when offloaded.
        On NDIF (``remote=True``) the weights live on the server: the local one is the meta placeholder."""
        if self.remote is True:
            return self.hf_model.get_input_embeddings().weight
        return parameter(self.hf_model.get_input_embeddings())

    @property
    def W_U(self) -> Tensor:
        """Unembedding matrix ``[d_model, vocab]`` (transpose of the lm_head weight); loaded when offloaded."""
        if self.remote is True:
            return self.hf_model.get_output_embeddings().weight.T
        return parameter(self.hf_model.get_output_embeddings()).T

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied to ``h_{n_layers}`` before the unembedding."""
        from toolkit.models.architectures import spec_for
        return spec_for(self.hf_model).final_norm(self.hf_model)

    @property
    def blocks(self) -> nn.ModuleList:
        """The HF model's list of blocks (one per layer transition)."""
        from toolkit.models.architectures import spec_for
        return spec_for(self.hf_model).blocks(self.hf_model)

    def unembed(self, h_last: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        """Logits from the last boundary: ``lm_head(final_norm(h_last))``."""
        return self.unembed_normed(self.final_norm(h_last))

    def unembed_normed(self, normed: Tensor) -> Tensor:
        """Logits from states already through the final norm (with Gemma's final soft-cap)."""
        out = self.hf_model.get_output_embeddings()(normed)
        softcap = getattr(self.hf_model.config, "final_logit_softcapping", None)
        if softcap:
            out = torch.tanh(out / softcap) * softcap
        return out


def no_remote_error(backend_name: str, remote) -> ValueError:
    """The error of a backend asked to run remotely that cannot."""
    return ValueError(f"remote={remote!r}: remote execution (NDIF) runs through nnsight, and the {backend_name} "
                      f"backend has none. Load the model with backend='nnsight' "
                      f"(toolkit.load_model(name, backend='nnsight', remote=...)).")


@dataclass
class Patch:
    """Replace ``h_layer[rows[i], positions[i]]`` by ``values[i]`` (rows, positions: [n]; values: [n, d]).

    With ``add=True`` the values are *added* to the residual stream instead of replacing it
    (steering edits: ``h_layer[rows[i], positions[i]] += values[i]``).
    """

    layer: int
    rows: Tensor
    positions: Tensor
    values: Tensor
    add: bool = False

    def on(self, device: torch.device, dtype: torch.dtype) -> "Patch":
        return Patch(self.layer, self.rows.to(device), self.positions.to(device), self.values.to(device, dtype),
                     self.add)

    def applied_to(self, resid: Tensor) -> Tensor:
        """A copy of ``resid`` ``[batch, seq, d]`` with this patch applied (on ``resid``'s device and dtype):
        what a hook function returns.

        Example:
            >>> p = Patch(0, torch.tensor([0]), torch.tensor([1]), torch.ones(1, 2), add=True)
            >>> p.applied_to(torch.zeros(1, 2, 2))[0].tolist()
            [[0.0, 0.0], [1.0, 1.0]]
        """
        resid, patch = resid.clone(), self.on(resid.device, resid.dtype)
        if patch.add:
            resid[patch.rows, patch.positions] += patch.values
        else:
            resid[patch.rows, patch.positions] = patch.values
        return resid


def normalize_patch(positions: Tensor, values: Tensor, batch: int, d_model: int) -> tuple[Tensor, Tensor]:
    """Bring ``positions``/``values`` to ``[batch, n]`` / ``[batch, n, d]`` and check them."""
    positions = torch.as_tensor(positions)
    if positions.ndim == 0:
        positions = positions.expand(batch)
    if positions.ndim == 1:
        positions = positions[:, None]
    if values.ndim == 2:
        values = values[:, None, :]
    if positions.shape[0] != batch or values.shape[:2] != positions.shape or values.shape[2] != d_model:
        raise ValueError(f"patch shapes do not fit: positions {tuple(positions.shape)} and values "
                         f"{tuple(values.shape)} for a batch of {batch} at width {d_model}; expected "
                         f"positions [batch, n] and values [batch, n, d_model].")
    return positions.long(), values
