"""Backends: one small interface (:class:`Backend`) over TransformerLens and nnsight.

Example:
    >>> from toolkit.backends import make_backend
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> make_backend(tiny_hf_model("mamba"), tokenizer=None).name
    'nnsight'
"""
from __future__ import annotations

from toolkit.backends.base import Backend, ModelInfo
from toolkit.models.architectures import spec_for

BACKENDS = ("transformer_lens", "nnsight")
_ALIASES = {"tl": "transformer_lens", "transformerlens": "transformer_lens", "transformer-lens": "transformer_lens",
            "transformer_lens": "transformer_lens", "nnsight": "nnsight"}

# Mamba has no position limit; this caps what we accept as one sequence.
_UNBOUNDED_CTX = 1 << 20


def model_info(hf_model, model_id: str) -> ModelInfo:
    """Facts about a HF causal LM, read from its config and module tree."""
    spec = spec_for(hf_model)
    config = hf_model.config
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    n_ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or _UNBOUNDED_CTX
    return ModelInfo(model_id=model_id, architecture=spec.family, n_layers=len(spec.blocks(hf_model)),
                     d_model=int(d_model), n_ctx=int(n_ctx), vocab_size=int(config.vocab_size))


def resolve_backend_name(backend: str | None, hf_model) -> str:
    """``backend`` normalised, or the default for the architecture (TL for GPT-2/Pythia, else nnsight)."""
    if backend is None:
        return "transformer_lens" if spec_for(hf_model).tl_backend_default else "nnsight"
    key = _ALIASES.get(str(backend).lower())
    if key is None:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    return key


def make_backend(model, tokenizer=None, backend: str | None = None, model_id: str | None = None,
                 remote: bool | str = False) -> Backend:
    """Wrap a model the user already has: a HF causal LM, an ``nnsight.NNsight`` /
    ``nnsight`` language model, or a TransformerLens ``TransformerBridge``.

    ``remote``: ``True`` runs the remote-capable stages on NDIF, ``"local"`` in nnsight's simulation
    of a remote run (nnsight backend only; see :mod:`toolkit.backends.remote`).

    **In place**: both libraries instrument the HF modules they wrap. ``backend="tl"`` boots a
    ``TransformerBridge`` that replaces the HF model's submodules by bridge components holding
    the originals (numerics unchanged); nnsight gives each module an instance-level ``forward``.
    The caller's model object is that same model afterwards (``backend.hf_model is model``) and
    ``backend.wraps_in_place`` says so; pass a ``copy.deepcopy(model)`` to keep an untouched one.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> hf = tiny_hf_model("llama")
        >>> model = make_backend(hf)
        >>> model.name, model.hf_model is hf, model.wraps_in_place
        ('nnsight', True, True)
    """
    from toolkit.backends.base import no_remote_error
    from toolkit.backends.nnsight_backend import NNsightBackend
    from toolkit.backends.remote import check_remote
    from toolkit.backends.transformer_lens_backend import TransformerLensBackend

    remote = check_remote(remote)          # key and service first, before any work
    if isinstance(model, Backend):
        return model.with_remote(remote)
    kind = type(model).__name__
    bridge = traced = None
    if kind == "HookedTransformer":
        raise TypeError("HookedTransformer (TransformerLens 3.x) applies weight processing and holds no HF "
                        "model; pass the HF model or a TransformerBridge (TransformerLens 4) instead.")
    if hasattr(model, "original_model") and hasattr(model, "run_with_hooks"):  # TransformerBridge
        bridge, hf_model = model, model.original_model
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
        backend = backend or "transformer_lens"
    elif hasattr(model, "_module") and hasattr(model, "trace"):  # nnsight wrapper (NNsight, LanguageModel)
        traced, hf_model = model, model._module
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
        backend = backend or "nnsight"
    else:
        hf_model = model
    model_id = model_id or getattr(hf_model.config, "_name_or_path", "") or kind
    info = model_info(hf_model, model_id)
    name = resolve_backend_name(backend, hf_model)
    if remote and name != "nnsight":
        raise no_remote_error(name, remote)
    if name == "nnsight":
        # a wrapper built for NDIF (weights on the meta device) is remote from the start; others become so below
        wrapped: Backend = NNsightBackend(hf_model, tokenizer, info, traced=traced,
                                          remote=True if (remote is True and traced is not None) else False)
    else:
        wrapped = TransformerLensBackend(hf_model, tokenizer, info, bridge=bridge)
    wrapped.wraps_in_place = True
    return wrapped.with_remote(remote)


def as_backend(model, tokenizer=None) -> Backend:
    """Any model a user holds as a :class:`Backend`: a backend is returned as is, anything else goes
    through :func:`make_backend` (the default backend for its architecture).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = as_backend(tiny_hf_model("mamba"))
        >>> as_backend(model) is model
        True
    """
    return model if isinstance(model, Backend) else make_backend(model, tokenizer)


def library_wrapper(model) -> Backend | None:
    """The :class:`Backend` for a model already seen through a library (a backend, an nnsight wrapper
    or a TransformerBridge), or ``None`` for a bare HF model (which the analyses drive directly,
    without instrumenting it).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> library_wrapper(tiny_hf_model("llama")) is None
        True
    """
    if isinstance(model, Backend):
        return model
    if (hasattr(model, "original_model") and hasattr(model, "run_with_hooks")) or \
            (hasattr(model, "_module") and hasattr(model, "trace")):
        return make_backend(model)
    return None


def hf_model_of(model):
    """The HuggingFace module under any model a user holds (backend, nnsight wrapper, bridge, or HF).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> hf = tiny_hf_model("llama")
        >>> hf_model_of(make_backend(hf)) is hf, hf_model_of(hf) is hf
        (True, True)
    """
    wrapper = library_wrapper(model)
    hf = model if wrapper is None else wrapper.hf_model
    if not hasattr(hf, "config"):
        raise TypeError(f"expected a model (toolkit backend, HuggingFace causal LM, nnsight wrapper or "
                        f"TransformerBridge), got {type(model).__name__}.")
    return hf


__all__ = ["Backend", "ModelInfo", "BACKENDS", "make_backend", "as_backend", "library_wrapper", "hf_model_of",
           "model_info", "resolve_backend_name"]
