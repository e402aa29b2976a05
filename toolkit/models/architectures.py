"""Where each supported HF architecture keeps its blocks, embeddings and final norm.

One small table instead of per-model code: the backends and the Jacobian rules look
things up here by the HF ``config.model_type``.

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> spec = spec_for(tiny_hf_model("gpt2"))
    >>> spec.family, spec.tl_backend_default
    ('gpt2', True)
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str               # our name for the family
    model_types: tuple        # HF config.model_type values it covers
    base_attr: str            # attribute of the CausalLM holding the base model
    blocks_attr: str          # attribute of the base model holding the ModuleList of blocks
    norm_attr: str            # attribute of the base model holding the final norm
    tl_backend_default: bool  # TransformerLens serves it by default (GPT-2, Pythia); else nnsight
    positions_attr: str | None = None  # learned position embedding added to the token embeddings (GPT-2)
    block_returns_tuple: bool = False  # blocks return (hidden, attention weights) (GPT-J, GPT-Neo)
    window_attr: str = "sliding_window"  # config attribute of the local-attention window, if any

    def base(self, hf_model: nn.Module) -> nn.Module:
        return getattr(hf_model, self.base_attr)

    def blocks(self, hf_model: nn.Module) -> nn.ModuleList:
        return getattr(self.base(hf_model), self.blocks_attr)

    def final_norm(self, hf_model: nn.Module) -> nn.Module:
        return getattr(self.base(hf_model), self.norm_attr)

    def blocks_path(self) -> str:
        """Dotted path from the CausalLM to the blocks, e.g. ``model.layers``."""
        return f"{self.base_attr}.{self.blocks_attr}"


SPECS: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec("llama", ("llama",), "model", "layers", "norm", False),
    ArchitectureSpec("qwen3", ("qwen3", "qwen2"), "model", "layers", "norm", False),
    ArchitectureSpec("gemma3", ("gemma3_text", "gemma3"), "model", "layers", "norm", False),
    ArchitectureSpec("gemma", ("gemma",), "model", "layers", "norm", False),
    ArchitectureSpec("gemma2", ("gemma2",), "model", "layers", "norm", False),
    ArchitectureSpec("mistral", ("mistral",), "model", "layers", "norm", False),
    ArchitectureSpec("ministral", ("ministral",), "model", "layers", "norm", False),
    ArchitectureSpec("ministral3", ("ministral3",), "model", "layers", "norm", False),
    ArchitectureSpec("phi3", ("phi3",), "model", "layers", "norm", False),
    ArchitectureSpec("olmo2", ("olmo2",), "model", "layers", "norm", False),
    ArchitectureSpec("smollm3", ("smollm3",), "model", "layers", "norm", False),
    ArchitectureSpec("gptj", ("gptj",), "transformer", "h", "ln_f", False, block_returns_tuple=True),
    ArchitectureSpec("gpt_neo", ("gpt_neo",), "transformer", "h", "ln_f", False, positions_attr="wpe",
                     block_returns_tuple=True, window_attr="window_size"),  # local layers: a window_size mask
    ArchitectureSpec("gpt2", ("gpt2",), "transformer", "h", "ln_f", True, positions_attr="wpe"),
    ArchitectureSpec("gpt_neox", ("gpt_neox",), "gpt_neox", "layers", "final_layer_norm", True),
    ArchitectureSpec("mamba", ("mamba",), "backbone", "layers", "norm_f", False),
)


def spec_for(hf_model: nn.Module) -> ArchitectureSpec:
    """The spec for a HF causal LM, or a clear error naming the unsupported model type."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(t for s in SPECS for t in s.model_types)
    raise ValueError(f"model type {model_type!r} is not supported; supported HF model types: {supported}.")
