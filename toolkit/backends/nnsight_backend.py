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


class NNsightBackend(Backend):
    name = "nnsight"

    def __init__(self, hf_model, tokenizer, info: ModelInfo, traced: NNsight | None = None):
        super().__init__(hf_model, tokenizer, info)
        self.traced = traced if traced is not None else NNsight(hf_model)
        self._blocks_path = spec_for(hf_model).blocks_path().split(".")

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
        return torch.stack([saved[l] for l in layers])

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
                if patch.add:
                    target[patch.rows, patch.positions] = target[patch.rows, patch.positions] + patch.values
                else:
                    target[patch.rows, patch.positions] = patch.values
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
