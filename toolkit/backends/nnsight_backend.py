"""The nnsight backend: hidden states and patches through ``nnsight.NNsight`` traces.

nnsight serves Mamba and Llama/Qwen/Gemma by default (TransformerLens serves GPT-2 and
Pythia), and can serve every architecture in :mod:`toolkit.models.architectures`.

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> from toolkit.backends import make_backend
    >>> model = make_backend(tiny_hf_model("llama"), tokenizer=None, backend="nnsight")
    >>> model.hidden_states(torch.randint(0, 512, (1, 5))).shape
    torch.Size([3, 1, 5, 64])
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from nnsight import NNsight
from torch import Tensor

from toolkit.backends.base import Backend, ModelInfo, Patch
from toolkit.models.architectures import spec_for
from toolkit.models.placement import input_device


class PlacedNNsight(NNsight):
    """``NNsight`` whose inputs go to the input embedding's execution device.

    nnsight moves a trace's inputs to ``Envoy.device``, the device of the model's *first
    parameter*; when accelerate has offloaded that parameter (``device_map`` with disk or CPU
    offload) it is ``meta``, and the inputs would be sent there.
    """

    @property
    def device(self) -> torch.device:
        return input_device(self._module)


class NNsightBackend(Backend):
    name = "nnsight"

    def __init__(self, hf_model, tokenizer, info: ModelInfo, traced: NNsight | None = None,
                 remote: bool | str = False):
        super().__init__(hf_model, tokenizer, info)
        # remote=True: the weights live on NDIF, a meta-device wrapper is expected and inputs are serialized
        if remote is not True and traced is not None and traced.device is not None and traced.device.type == "meta":
            raise ValueError("this nnsight wrapper would send its inputs to the meta device: nnsight reads the "
                             "device of the model's first parameter, which accelerate offloaded. Pass the HF "
                             "model itself (make_backend(hf_model, ...) wraps it so that inputs go to the input "
                             "embedding's device), or keep the input embedding in memory in the device_map.")
        self.traced = traced if traced is not None else PlacedNNsight(hf_model)
        self._blocks_path = spec_for(hf_model).blocks_path().split(".")
        self.remote = remote
        self.requests = 0          # remote requests sent (sessions), for the record

    # ----- remote execution (NDIF, or nnsight's local simulation) ----------------------------
    def with_remote(self, remote: bool | str) -> "NNsightBackend":
        """This model with the remote-capable stages (:meth:`remote_states`, :meth:`remote_kl`) run
        on NDIF (``True``) or in nnsight's simulation of a remote run (``"local"``).

        Checks the API key and the service first (:func:`toolkit.backends.remote.check_remote`).

        Example:
            >>> from toolkit.models.tiny import tiny_hf_model
            >>> from toolkit.backends import make_backend
            >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight", remote="local")
            >>> model.remote
            'local'
        """
        from toolkit.backends.remote import check_remote, remotable
        remote = check_remote(remote)
        if remote == self.remote:
            return self
        if not remote:
            twin = NNsightBackend(self.hf_model, self.tokenizer, self.info)
        else:
            traced = self.traced if hasattr(self.traced, "to_model_key") else None
            if traced is None:
                traced = remotable(self.hf_model, self.tokenizer, self._hub_id() if remote is True else None)
            twin = NNsightBackend(self.hf_model, self.tokenizer, self.info, traced=traced, remote=remote)
        twin.wraps_in_place = self.wraps_in_place
        return twin

    def _hub_id(self) -> str:
        """The hub id NDIF knows this checkpoint by."""
        import warnings
        from pathlib import Path

        from toolkit.models.registry import find_entry
        entry = find_entry(self.info.model_id)
        if entry is not None:
            if entry.pip_source is not None:
                warnings.warn(f"{entry.name} was loaded from dequantized GGUF weights; NDIF runs the hub checkpoint "
                              f"{entry.hub_id}, whose numbers differ slightly from this local model's.")
            return entry.hub_id
        name = getattr(self.hf_model.config, "_name_or_path", "") or self.info.model_id
        if not name or Path(name).expanduser().exists():
            raise ValueError(f"NDIF runs checkpoints by their hub id, and {self.info.model_id!r} was loaded from a "
                             f"local folder; load it by hub id: toolkit.load_model('org/name', remote=True).")
        return name

    def _require_remote(self) -> None:
        if not self.remote:
            raise ValueError("this model runs locally; call model.with_remote(True) (NDIF) or "
                             "model.with_remote('local') (nnsight's simulation) first.")

    def remote_states(self, tokens: Tensor, positions: Tensor, boundaries: Sequence[int], batch_size: int = 8,
                      texts_per_request: int = 64):
        from toolkit.backends.remote import collect_at_positions
        self._require_remote()
        for item in collect_at_positions(self.traced, ".".join(self._blocks_path), tokens, positions, boundaries,
                                         self.remote, batch_size=batch_size, texts_per_request=texts_per_request):
            self.requests += 1
            yield item

    def remote_kl(self, tokens: Tensor, positions: Tensor, values: dict, boundaries: dict, next_only: bool = True,
                  max_rows: int = 32, texts_per_request: int = 16, max_request_bytes: int = 2 ** 26):
        from toolkit.backends.remote import kl_at_anchors
        self._require_remote()
        # the replacement vectors travel with the request: at most ~64 MiB of them per request
        per_text = positions.shape[1] * len(values) * self.d_model * 4
        texts_per_request = max(1, min(texts_per_request, max_request_bytes // per_text))
        for item in kl_at_anchors(self.traced, ".".join(self._blocks_path), tokens, positions, values, boundaries,
                                  self.remote, next_only=next_only, max_rows=max_rows,
                                  texts_per_request=texts_per_request):
            self.requests += 1
            yield item

    def _traced_blocks(self):
        # Envoys must be reached through the NNsight wrapper, not the raw modules.
        node = self.traced
        for part in self._blocks_path:
            node = getattr(node, part)
        return node

    def hidden_states(self, input_ids: Tensor, layers: Sequence[int] | None = None, kv_cache=None) -> Tensor:
        input_ids = self.check_tokens(input_ids)
        layers = list(range(self.n_layers + 1)) if layers is None else [self.check_boundary(l) for l in layers]
        blocks = self._traced_blocks()
        saved: dict[int, Tensor] = {}
        kwargs = {} if kv_cache is None else {"past_key_values": kv_cache, "use_cache": True}
        with torch.no_grad(), self.traced.trace(input_ids, **kwargs) as tracer:
            # nnsight 0.8 requires modules to be visited in execution order.
            for l in sorted(set(layers)):
                saved[l] = (blocks[0].input if l == 0 else _first(blocks[l - 1].output)).save()
            tracer.stop()  # nothing above the last boundary asked for is needed: skip the rest and the unembedding
        # A model split across devices (device_map) hands each boundary over where its block ran.
        return torch.stack([saved[l].to(self.device) for l in layers])

    def run_with_patches(self, input_ids: Tensor, patches: Sequence[Patch], **forward_kwargs) -> Tensor:
        input_ids = self.check_tokens(input_ids)
        patches = sorted((p.on(self.device, self.dtype) for p in patches), key=lambda p: p.layer)
        blocks = self._traced_blocks()
        with torch.no_grad(), self.traced.trace(input_ids, **forward_kwargs):
            # Ascending layers: nnsight 0.8 visits modules in execution order.
            for patch in patches:
                self.check_boundary(patch.layer)
                if patch.layer == self.n_layers:
                    # h_L feeds the final norm, which is not a block: patch the last block's output.
                    target = _first(blocks[patch.layer - 1].output)  # edited in place: the norm sees it
                else:
                    target = blocks[patch.layer].input
                # The patched tensor lives where the block before it ran (device_map: any device).
                rows, positions = patch.rows.to(target.device), patch.positions.to(target.device)
                values = patch.values.to(target.device)
                if patch.add:
                    target[rows, positions] = target[rows, positions] + values
                else:
                    target[rows, positions] = values
            out = self.traced.output.save()
        return out.logits if hasattr(out, "logits") else out[0]

    def target_function(self, input_ids: Tensor, kind: str, layer: int | None,
                        position: int = -1) -> Callable[[Tensor], Tensor] | None:
        """``f(x) -> y`` run inside an nnsight trace: ``x`` replaces block 0's input, ``y`` is saved.

        Example:
            >>> from toolkit.backends import make_backend
            >>> from toolkit.models.tiny import tiny_hf_model
            >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
            >>> f = model.target_function(torch.tensor([1, 2, 3]), "output", None)
            >>> f(torch.randn(3, 64)).shape
            torch.Size([64])
        """
        if kind not in ("output", "resid"):
            return None
        ids = self.check_tokens(input_ids)
        blocks = self._traced_blocks()
        base = getattr(self.traced, spec_for(self.hf_model).base_attr)

        def f(x: Tensor) -> Tensor:
            if kind == "resid" and layer == 0:
                return x[position]
            # use_cache=False: a Mamba cache would carry state outside the frozen map.
            with self.traced.trace(ids, use_cache=False):
                blocks[0].input = x[None]
                # Base model output = final norm applied; a block's output (transformers 5: a tensor).
                h = base.output[0] if kind == "output" else blocks[layer - 1].output
                y = _first(h)[0, position].save()
            return y
        return f


def _first(out):
    """The hidden-state tensor of a module output (tensor, tuple or ``ModelOutput``)."""
    return out if isinstance(out, Tensor) else out[0]
