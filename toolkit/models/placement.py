"""Where a module runs: devices of sharded and offloaded models (HF accelerate ``device_map``).

A model loaded with ``device_map=...`` is *dispatched* by accelerate: each module carries an
``AlignDevicesHook`` (``module._hf_hook``) that moves its inputs to the module's
*execution device* and, for modules offloaded to CPU RAM or disk, loads their weights just for
the call. Offloaded parameters sit on the ``"meta"`` device between calls, so
``next(model.parameters()).device`` says nothing about where a tensor must go, and
``module.weight`` may hold no numbers at all.

These helpers answer both questions for any module, dispatched or not:

* :func:`execution_device` -- the device a module computes on (its hook's, else its weights');
* :func:`input_device` -- where token ids and input embeddings go (the embedding's device);
* :func:`parameter` -- a parameter's *values*, loaded from the offload store when it is on meta;
* :func:`is_offloaded` -- whether any weight lives off-device (CPU RAM or disk offload).

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = tiny_hf_model("llama")
    >>> str(input_device(model)), is_offloaded(model)
    ('cpu', False)
    >>> parameter(model.lm_head).shape
    torch.Size([512, 64])
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["execution_device", "input_device", "output_device", "is_offloaded", "is_dispatched", "parameter"]

_META = torch.device("meta")


def _hooks(module: nn.Module) -> list:
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # a SequentialHook chains several


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else the device of
    its first parameter or buffer that is not on meta, else the CPU.

    Example:
        >>> execution_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device != _META:
            return tensor.device
    for sub in module.modules():  # all on meta: a child's hook knows where they are loaded to
        for hook in _hooks(sub):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu")


def input_device(hf_model: nn.Module) -> torch.device:
    """Where token ids and input embeddings go: the input embedding's execution device.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> input_device(tiny_hf_model("gpt2"))
        device(type='cpu')
    """
    return execution_device(hf_model.get_input_embeddings())


def output_device(hf_model: nn.Module) -> torch.device:
    """Where the logits come out: the output head's execution device.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> output_device(tiny_hf_model("gpt2"))
        device(type='cpu')
    """
    return execution_device(hf_model.get_output_embeddings())


def is_dispatched(hf_model: nn.Module) -> bool:
    """Whether accelerate placed the model (``device_map=...``): modules carry device hooks.

    Example:
        >>> is_dispatched(nn.Linear(2, 2))
        False
    """
    return getattr(hf_model, "hf_device_map", None) is not None or any(
        "_hf_hook" in m.__dict__ for m in hf_model.modules())


def is_offloaded(hf_model: nn.Module) -> bool:
    """Whether any parameter is offloaded (on ``meta`` between calls: CPU-RAM or disk offload).

    Example:
        >>> is_offloaded(nn.Linear(2, 2))
        False
    """
    return any(p.device == _META for p in hf_model.parameters())


def parameter(module: nn.Module, name: str = "weight") -> Tensor:
    """The values of ``module``'s parameter ``name`` (dotted for a child's), detached, on the
    owning module's execution device; loaded from accelerate's offload store when on meta.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> torch.equal(parameter(lin, "bias"), lin.bias)
        True
    """
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    wrapped = getattr(owner, "original_component", None)   # TransformerLens' bridge wraps HF modules in place
    if isinstance(wrapped, nn.Module):
        owner = wrapped
    value = getattr(owner, leaf)
    if value is None or value.device != _META:
        return value if value is None else value.detach()
    for hook in _hooks(owner):
        weights = getattr(hook, "weights_map", None)
        if weights is None:
            continue
        try:
            value = weights[leaf]
        except KeyError:
            continue
        return value.to(execution_device(owner)).detach()
    raise RuntimeError(f"parameter {name!r} of {type(module).__name__} is on the meta device and no accelerate "
                       f"offload store holds it: load the model with device_map/offload_folder through "
                       f"toolkit.load_model (or transformers' from_pretrained), not with init_empty_weights alone.")
