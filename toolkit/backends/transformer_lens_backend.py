"""The TransformerLens backend: ``TransformerBridge`` hooks on the raw HF model.

``TransformerBridge`` (TransformerLens 4, successor of ``HookedTransformer``) wraps the
HF model without weight processing, so the residual-stream geometry is the model's own
(folding LayerNorm or centring writing weights would change it). Boundary ``l < L`` is the
hook ``blocks.{l}.hook_resid_pre``; boundary ``L`` is ``blocks.{L-1}.hook_resid_post``.

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> from toolkit.backends import make_backend
    >>> tl = make_backend(tiny_hf_model("gpt2"), tokenizer=model.tokenizer, backend="transformer_lens")
    >>> import torch                                     # (the tiny model's vocabulary is smaller: token ids)
    >>> tl.bridge.hook_dict["blocks.0.hook_resid_pre"] is not None, tl.hidden_states(torch.tensor([[1, 2]])).shape
    (True, torch.Size([3, 1, 2, 64]))
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from toolkit.backends.base import Backend, ModelInfo, Patch
from toolkit.models.placement import is_dispatched


def tl_bridge_supports(hf_class: str) -> bool:
    """Whether the installed TransformerLens has a ``TransformerBridge`` adapter for this transformers class.

    Example:
        >>> tl_bridge_supports("MinistralForCausalLM"), tl_bridge_supports("Phi3ForCausalLM")
        (False, True)
    """
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    return hf_class in SUPPORTED_ARCHITECTURES


class TransformerLensBackend(Backend):
    name = "transformer_lens"

    def __init__(self, hf_model, tokenizer, info: ModelInfo, bridge=None):
        super().__init__(hf_model, tokenizer, info)
        if bridge is None:
            from transformer_lens.model_bridge import TransformerBridge
            if tokenizer is None:
                raise ValueError("the TransformerLens backend needs a tokenizer (TransformerBridge otherwise "
                                 "tries to download one); pass tokenizer=...")
            hf_class = type(hf_model).__name__
            if not tl_bridge_supports(hf_class):
                raise ValueError(f"TransformerLens' TransformerBridge has no adapter for {hf_class} "
                                 f"({info.architecture}); use backend='nnsight', which serves every family.")
            # The name only picks TL's defaults; architecture and weights come from hf_model.
            # A model placed by accelerate (device_map) keeps its placement: TransformerLens reads it from
            # hf_device_map; a device here would ask it to move the model.
            device = None if is_dispatched(hf_model) else str(self.device)
            bridge = TransformerBridge.boot_transformers(info.model_id, hf_model=hf_model, tokenizer=tokenizer,
                                                         device=device, dtype=self.dtype)
        self.bridge = bridge

    def hook_name(self, layer: int) -> str:
        """TransformerLens hook that carries boundary ``layer``."""
        self.check_boundary(layer)
        if layer == self.n_layers:
            return f"blocks.{layer - 1}.hook_resid_post"
        return f"blocks.{layer}.hook_resid_pre"

    def hidden_states(self, input_ids: Tensor, layers: Sequence[int] | None = None, kv_cache=None) -> Tensor:
        input_ids = self.check_tokens(input_ids)
        layers = list(range(self.n_layers + 1)) if layers is None else [self.check_boundary(l) for l in layers]
        names = {self.hook_name(l) for l in layers}
        with torch.no_grad():
            kwargs = {} if kv_cache is None else {"past_key_values": kv_cache, "use_cache": True}
            _, cache = self.bridge.run_with_cache(input_ids, names_filter=lambda n: n in names, **kwargs)
        return torch.stack([cache[self.hook_name(l)].to(self.device) for l in layers])  # device_map: any device

    def run_with_patches(self, input_ids: Tensor, patches: Sequence[Patch], **forward_kwargs) -> Tensor:
        input_ids = self.check_tokens(input_ids)
        hooks = []
        for patch in patches:
            patch = patch.on(self.device, self.dtype)
            hooks.append((self.hook_name(patch.layer), lambda resid, hook, patch=patch: patch.applied_to(resid)))
        with torch.no_grad():
            return self.bridge.run_with_hooks(input_ids, fwd_hooks=hooks, **forward_kwargs)

    def target_function(self, input_ids: Tensor, kind: str, layer: int | None,
                        position: int = -1) -> Callable[[Tensor], Tensor] | None:
        """``f(x) -> y`` through ``bridge.run_with_hooks``: ``blocks.0.hook_resid_pre`` returns ``x``,
        and ``ln_final.hook_out`` (``"output"``) or the boundary's hook is read."""
        if kind not in ("output", "resid"):
            return None
        ids = self.check_tokens(input_ids)
        read_hook = "ln_final.hook_out" if kind == "output" else self.hook_name(layer) if layer else None

        def f(x: Tensor) -> Tensor:
            if read_hook is None:  # boundary 0: y is x itself
                return x[position]
            captured: list[Tensor] = []

            def put_x(resid: Tensor, hook) -> Tensor:
                return x[None].to(resid.device, resid.dtype)  # where block 0 runs (device_map: any device)

            def grab(resid: Tensor, hook) -> None:
                captured.append(resid)

            self.bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", put_x), (read_hook, grab)])
            return captured[-1][0, position]
        return f
