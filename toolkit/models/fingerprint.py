"""A model's identity from its weights and architecture, not from where it was loaded.

:func:`weights_fingerprint` hashes the configuration (without paths and runtime switches) and,
for every parameter and persistent buffer in name order, its name, shape, dtype and the SHA-256 of
its bytes: exact, independent of the device and of the folder the weights came from (SmolLM2-135M:
about 0.3 s on one CPU core). The same weights loaded from any folder, through either backend, give
the same fingerprint; fine-tuning, one edited weight, another checkpoint or another dtype give
another. TransformerLens' bridge wraps each module (``original_component``), adds aliases of its
own and a zero ``lm_head.bias``: the walk reads through the wrappers and skips all-zero biases, so a
bridged model keeps its fingerprint.

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> a, b = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=0)
    >>> b.config._name_or_path = "/somewhere/else"
    >>> weights_fingerprint(a) == weights_fingerprint(b), len(weights_fingerprint(a))
    (True, 16)
    >>> weights_fingerprint(a) == weights_fingerprint(tiny_hf_model("llama", seed=1))
    False
"""
from __future__ import annotations

import hashlib
import json

from typing import Iterator

import torch
from torch import nn

from toolkit.models.placement import parameter

# Config entries that say where or how a model was loaded or is run, not what it computes.
_NOT_IDENTITY = {"transformers_version", "torch_dtype", "dtype", "use_cache", "output_attentions",
                 "output_hidden_states", "return_dict"}


def _config_identity(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    if config is None:
        return ""
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _NOT_IDENTITY}
    return json.dumps(data, sort_keys=True, default=str)


def named_weights(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by name, reading through TransformerLens' module wrappers.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> next(named_weights(tiny_hf_model("gpt2")))[0]
        'transformer.wte.weight'
    """
    original = getattr(module, "original_component", None)
    if isinstance(original, nn.Module) and original is not module:
        yield from named_weights(original, prefix)
        return
    for name, p in module._parameters.items():
        if p is not None and p.device.type == "meta":  # offloaded (accelerate): values from the offload store
            try:
                p = parameter(module, name)
            except RuntimeError:  # no local weights at all (a model that lives on NDIF): shape and config name it
                pass
        if p is not None:
            yield prefix + name, p
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, b
    for name, child in module._modules.items():
        if child is not None:
            yield from named_weights(child, f"{prefix}{name}.")


def _tensor_identity(t: torch.Tensor) -> bytes:
    head = f"{tuple(t.shape)}|{t.dtype}|".encode()
    if t.device.type == "meta":  # offloaded to disk: only its shape is known here
        return head + b"meta"
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return head + hashlib.sha256(memoryview(data)).digest()


def weights_fingerprint(module: nn.Module) -> str:
    """16 hex digits identifying ``module``'s weights and architecture (see the module docstring).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("gpt2")
        >>> before = weights_fingerprint(model)
        >>> with torch.no_grad():
        ...     model.transformer.h[0].mlp.c_fc.weight[3, 5] += 1e-3
        >>> weights_fingerprint(model) == before
        False
    """
    h = hashlib.sha256(_config_identity(module).encode())
    for name, t in sorted(named_weights(module), key=lambda item: item[0]):
        if name.endswith("bias") and t.device.type != "meta" and not t.any():
            continue  # a zero bias computes nothing (TransformerLens' bridge adds one to GPT-2's lm_head)
        h.update(name.encode() + b"\0" + _tensor_identity(t) + b"\0")
    return h.hexdigest()[:16]
