"""Small random models built from configs, for tests and quick experiments.

Each architecture the toolkit supports has a tiny config here (2 layers, width 64)
so that tests exercise the real HF modeling code without any download. The
vocabulary defaults to 512 so that embeddings stay small; pass ``vocab_size`` to
match a real tokenizer when a test needs one.

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = tiny_hf_model("llama")
    >>> model.config.num_hidden_layers
    2
"""
from __future__ import annotations

import torch
import transformers
from transformers import PreTrainedModel

TINY_ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "qwen3", "gemma3", "mamba", "qwen2")


def _tiny_config(arch: str, vocab_size: int, n_layers: int, width: int, n_ctx: int):
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=width, n_layer=n_layers, n_head=4, n_positions=n_ctx,
                                       architectures=["GPT2LMHeadModel"], **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=4,
                                          intermediate_size=4 * width, max_position_embeddings=n_ctx,
                                          architectures=["GPTNeoXForCausalLM"], **common)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=2 * width,
                                        max_position_embeddings=n_ctx, architectures=["LlamaForCausalLM"], **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=width // 4, intermediate_size=2 * width,
                                        max_position_embeddings=n_ctx, architectures=["Qwen3ForCausalLM"], **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=2 * width,
                                        max_position_embeddings=n_ctx, architectures=["Qwen2ForCausalLM"], **common)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=4,
                                             num_key_value_heads=1, head_dim=width // 4, intermediate_size=2 * width,
                                             max_position_embeddings=n_ctx, sliding_window=8,
                                             architectures=["Gemma3ForCausalLM"], **common)
    if arch == "mamba":
        return transformers.MambaConfig(hidden_size=width, num_hidden_layers=n_layers, state_size=8,
                                        architectures=["MambaForCausalLM"], **common)
    raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}.")


def tiny_hf_model(arch: str, *, vocab_size: int = 512, n_layers: int = 2, width: int = 64,
                  n_ctx: int = 256, seed: int = 0, dtype: torch.dtype = torch.float32,
                  **config_overrides) -> PreTrainedModel:
    """Build a randomly initialised causal LM of architecture ``arch`` (eval mode, no download).

    ``config_overrides`` set config attributes before the model is built (``sliding_window=64``).
    """
    config = _tiny_config(arch, vocab_size, n_layers, width, n_ctx)
    for name, value in config_overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if arch in ("llama", "qwen3", "gemma3", "gpt_neox", "qwen2"):
        # Random init leaves norm weights at exactly 1 (0 for Gemma's 1+w form); perturb them so
        # tests notice a norm whose weight was dropped or applied twice.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    if arch == "qwen2":
        # Biases start at 0; Qwen's real ones are not, and the v bias is what feeds the constant term c.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.add_(0.1 * torch.randn_like(p))
    return model
