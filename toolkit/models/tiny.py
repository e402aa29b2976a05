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

TINY_ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "qwen3", "gemma3", "mamba",
                      "mistral", "ministral", "ministral3", "phi3", "olmo2", "gemma2", "smollm3", "gptj", "gpt_neo", "gemma")
# Llama-like decoders: (config class, CausalLM class, extra config). Sliding windows of 4 tokens, so
# that the tests' 6-9 token prompts reach past them; Ministral and Gemma 2 alternate sliding and full layers.
_LLAMA_LIKE = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(sliding_window=4)),
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    # Gemma 2: softcaps low enough to bend random-init attention scores and logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=4, query_pre_attn_scalar=16,
                                                         attn_logit_softcapping=1.0, final_logit_softcapping=2.0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layer_interval=2)),  # odd layers: no rotary
}
# One per distinct block mechanism, for the slower parametrised tests: Mistral, Ministral, Ministral 3,
# SmolLM3 and Gemma blocks are Llama's (separate q/k, gated MLP, pre-norms) with other masks or rotary.
MECHANISM_ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "qwen3", "gemma3", "mamba", "phi3", "olmo2", "gemma2",
                           "gptj", "gpt_neo")
_UNPERTURBED = ("gpt2", "mamba")  # norm weights left at their init (the older tests' numbers rely on it)


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
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=4,
                                             num_key_value_heads=1, head_dim=width // 4, intermediate_size=2 * width,
                                             max_position_embeddings=n_ctx, sliding_window=8,
                                             architectures=["Gemma3ForCausalLM"], **common)
    if arch in _LLAMA_LIKE:
        config_cls, model_cls, extra = _LLAMA_LIKE[arch]
        if arch == "ministral3":  # YaRN from a 4-token original context, so its query scale grows within a prompt
            extra = dict(rope_parameters=dict(type="yarn", rope_theta=1e6, factor=n_ctx / 4, beta_fast=32.0,
                                              beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1,
                                              original_max_position_embeddings=4, max_position_embeddings=n_ctx))
        if arch == "ministral":
            extra = {**extra, "layer_types": ["sliding_attention", "full_attention"] * (n_layers // 2)
                     + ["sliding_attention"] * (n_layers % 2)}
        return getattr(transformers, config_cls)(
            hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
            head_dim=width // 4, intermediate_size=2 * width, max_position_embeddings=n_ctx, pad_token_id=0,
            architectures=[model_cls], **extra, **common)
    if arch == "gptj":
        return transformers.GPTJConfig(n_embd=width, n_layer=n_layers, n_head=4, rotary_dim=width // 8,
                                       n_positions=n_ctx, architectures=["GPTJForCausalLM"], **common)
    if arch == "gpt_neo":  # alternating global and local (window 4) attention
        return transformers.GPTNeoConfig(hidden_size=width, num_layers=n_layers, num_heads=4, window_size=4,
                                         attention_types=[[["global", "local"], n_layers // 2]] + [[["global"], n_layers % 2]],
                                         max_position_embeddings=n_ctx, architectures=["GPTNeoForCausalLM"],
                                         **common)
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
    if arch not in _UNPERTURBED:
        # Random init leaves norm weights at exactly 1 (0 for Gemma's 1+w form); perturb them so
        # tests notice a norm whose weight was dropped or applied twice.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ("norm" in name or ".ln_" in name) and p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return model
