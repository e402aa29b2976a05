"""One rule for prompts: a string, a list of strings, or token ids, to a ``[batch, seq]`` id tensor.

Every public analysis takes its prompt through :func:`ensure_tokens`, so ``"text"``,
``["text a", "text b"]``, ``[1, 2, 3]``, a ``[seq]`` tensor and a ``[batch, seq]`` tensor all work the
same way everywhere. Text needs a tokenizer: a loaded model (:func:`toolkit.load_model`, or
:func:`toolkit.make_backend` with a tokenizer) has one; a bare HuggingFace model does not, so it
takes ids (or pass ``tokenizer=``).

Example:
    >>> import torch
    >>> ensure_tokens(None, [5, 6, 7])
    tensor([[5, 6, 7]])
    >>> ensure_tokens(None, torch.tensor([[1, 2], [3, 4]])).shape
    torch.Size([2, 2])
    >>> ensure_tokens(None, "some text")
    Traceback (most recent call last):
    ...
    ValueError: a text prompt needs a tokenizer, and this model has none (a bare HuggingFace model); pass token ids, a model from toolkit.load_model(...), toolkit.make_backend(hf_model, tokenizer), or tokenizer=...
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

Prompt = Union[str, Sequence[str], Tensor, Sequence[int], np.ndarray]

__all__ = ["Prompt", "ensure_tokens", "single_sequence"]


def _tokenizer_of(model: Any, tokenizer: Any = None) -> Any:
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def ensure_tokens(model: Any, prompt: Prompt, *, tokenizer: Any = None,
                  prepend_bos: bool = True) -> Int[Tensor, "batch seq"]:
    """``prompt`` as a ``[batch, seq]`` LongTensor (on the CPU; backends move it where they run).

    Args:
        model: anything with a ``tokenizer`` attribute (a toolkit backend, an nnsight language model,
            a TransformerBridge), or ``None`` / a bare HF model when ``prompt`` is already ids.
        prompt: a string, a list of strings (tokenised together; they must tokenise to the same
            length, since the analyses take no attention mask), a list of ints, or an int tensor
            ``[seq]`` / ``[batch, seq]``.
        prepend_bos: add the tokenizer's BOS token where it adds one by default (Gemma).

    Example:
        >>> ensure_tokens(None, (4, 5)).tolist()
        [[4, 5]]
    """
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and
                                   all(isinstance(p, str) for p in prompt)):
        tok = _tokenizer_of(model, tokenizer)
        if tok is None:
            raise ValueError("a text prompt needs a tokenizer, and this model has none (a bare HuggingFace model); "
                             "pass token ids, a model from toolkit.load_model(...), toolkit.make_backend(hf_model, "
                             "tokenizer), or tokenizer=...")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if any(not t for t in texts):
            raise ValueError("empty text prompt: give at least one character of text.")
        rows = [tok(t, add_special_tokens=prepend_bos)["input_ids"] for t in texts]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise ValueError(f"the {len(texts)} texts tokenise to different lengths {lengths}; the analyses take no "
                             f"attention mask, so pass texts of equal token length, or one text at a time.")
        return torch.tensor(rows, dtype=torch.long)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple)):
        prompt = [list(r) for r in prompt]
    ids = torch.as_tensor(np.asarray(prompt) if isinstance(prompt, np.ndarray) else prompt)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be integers, got a {ids.dtype} tensor; did you pass embeddings?")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.numel() == 0:
        raise ValueError(f"token ids must be [seq] or [batch, seq] and non-empty, got shape {tuple(ids.shape)}.")
    return ids.long()


def single_sequence(model: Any, prompt: Prompt, **kwargs) -> Int[Tensor, "seq"]:
    """:func:`ensure_tokens` for analyses of one sequence (the Jacobians): ``[seq]``, or a clear error.

    Example:
        >>> single_sequence(None, [[1, 2, 3]]).tolist()
        [1, 2, 3]
    """
    ids = ensure_tokens(model, prompt, **kwargs)
    if ids.shape[0] != 1:
        raise ValueError(f"this analysis takes one non-empty sequence, got a batch of {ids.shape[0]}; "
                         f"pass one prompt at a time.")
    return ids[0]
