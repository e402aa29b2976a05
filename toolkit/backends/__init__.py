"""Backends: one small interface (:class:`Backend`) over TransformerLens and nnsight.

Three backends: ``"nnsight"``, ``"transformer_lens"`` (TransformerLens 4's ``TransformerBridge``, also in
3.9) and ``"hooked"`` (TransformerLens 3's ``HookedTransformer``; needs ``transformer-lens>=3.9,<4``).

Example:
    >>> from toolkit.backends import make_backend
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> make_backend(tiny_hf_model("mamba"), tokenizer=None).name
    'nnsight'
"""
from __future__ import annotations

import weakref

from toolkit.backends.base import Backend, ModelInfo
from toolkit.models.architectures import spec_for

BACKENDS = ("transformer_lens", "nnsight", "hooked")
_ALIASES = {"tl": "transformer_lens", "transformerlens": "transformer_lens", "transformer-lens": "transformer_lens",
            "transformer_lens": "transformer_lens", "nnsight": "nnsight", "hooked": "hooked",
            "hooked_transformer": "hooked", "hookedtransformer": "hooked"}

# A bare HookedTransformer handed to an analysis: its backend, built once.
_HOOKED_WRAPPERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

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
                 remote: bool | str = False, *, hf_model=None) -> Backend:
    """Wrap a model the user already has: a HF causal LM, an ``nnsight.NNsight`` /
    ``nnsight`` language model, a TransformerLens ``TransformerBridge``, or (TransformerLens 3) a
    ``HookedTransformer``.

    **HookedTransformer** (``backend="hooked"``): its weights must be raw (built with
    ``HookedTransformer.from_pretrained_no_processing``); a processed one (folded LayerNorm, centred
    writing weights or unembedding) is refused with what each step changes
    (:func:`toolkit.backends.hooked_backend.check_raw`). ``hf_model`` is the HF model it was built
    from (the toolkit reads config facts from it; checked to be the same network); without it, the
    toolkit's registry copy is used where the name is known. ``backend="hooked"`` with a HF model
    builds the ``HookedTransformer`` from it (:func:`toolkit.backends.hooked_backend.hooked_from_hf`).

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
    from toolkit.backends.hooked_backend import HookedTransformerBackend, is_hooked_transformer

    remote = check_remote(remote)          # key and service first, before any work
    if isinstance(model, Backend):
        return model.with_remote(remote)
    kind = type(model).__name__
    bridge = traced = hooked = None
    if is_hooked_transformer(model):
        if remote:
            raise no_remote_error("hooked", remote)
        return _wrap_hooked(model, tokenizer, model_id, hf_model)
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
    if name == "hooked":
        from toolkit.backends.hooked_backend import hooked_from_hf
        hooked = hooked_from_hf(hf_model, tokenizer, model_id)
        wrapped = HookedTransformerBackend(hf_model, tokenizer, info, hooked)
        wrapped.wraps_in_place = False      # the HookedTransformer holds its own copy of the weights
        return wrapped
    if name == "nnsight":
        # a wrapper built for NDIF (weights on the meta device) is remote from the start; others become so below
        wrapped: Backend = NNsightBackend(hf_model, tokenizer, info, traced=traced,
                                          remote=True if (remote is True and traced is not None) else False)
    else:
        wrapped = TransformerLensBackend(hf_model, tokenizer, info, bridge=bridge)
    wrapped.wraps_in_place = True
    return wrapped.with_remote(remote)


def _wrap_hooked(hooked, tokenizer, model_id: str | None, hf_model) -> Backend:
    """A user's ``HookedTransformer`` as a backend: raw weights only, beside the HF model it came from."""
    from toolkit.backends.hooked_backend import HookedTransformerBackend, check_matches_hf, check_raw
    check_raw(hooked)                                   # processed weights: refused before anything runs
    tokenizer = tokenizer or getattr(hooked, "tokenizer", None)
    names = [n for n in (model_id, getattr(hooked.cfg, "tokenizer_name", None),
                         getattr(hooked.cfg, "model_name", None)) if n]
    if hf_model is None:
        hf_model, model_id = _registry_hf_model(names, dtype=hooked.cfg.dtype, device=hooked.W_E.device), \
            model_id or _registry_name(names)
    if hf_model is None:
        raise ValueError(f"make_backend(HookedTransformer) needs the HF model it was built from (hf_model=...): the "
                         f"toolkit reads config facts from it, and {names[-1] if names else 'this model'} is not a "
                         f"registry model it can load itself. Pass hf_model=AutoModelForCausalLM.from_pretrained(...), "
                         f"or let the toolkit build both: toolkit.load_model(name, backend='hooked').")
    check_matches_hf(hooked, hf_model, int(hf_model.config.vocab_size))
    model_id = model_id or getattr(hf_model.config, "_name_or_path", "") or (names[0] if names else "HookedTransformer")
    return HookedTransformerBackend(hf_model, tokenizer, model_info(hf_model, model_id), hooked)


def _registry_name(names: list[str]) -> str | None:
    """The registry name of the first of ``names`` whose weights are installed here (pip), or None."""
    from toolkit.models.registry import find_entry
    from toolkit.models.weights import is_available
    for name in names:
        entry = find_entry(name) or find_entry(name.split("/")[-1])
        if entry is not None and entry.pip_source is not None and is_available(entry.pip_source):
            return entry.name
    return None


def _registry_hf_model(names: list[str], dtype, device):
    """The registry's offline copy of a model known by one of ``names`` (pip-installed weights), or None."""
    from toolkit.models.registry import find_entry
    from toolkit.models.weights import converted_folder
    name = _registry_name(names)
    if name is None:
        return None
    from transformers import AutoModelForCausalLM
    folder = str(converted_folder(find_entry(name).pip_source))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


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
    from toolkit.backends.hooked_backend import is_hooked_transformer
    if isinstance(model, Backend):
        return model
    if is_hooked_transformer(model):   # wrapped once (it loads and checks the HF model beside it)
        if model not in _HOOKED_WRAPPERS:
            _HOOKED_WRAPPERS[model] = make_backend(model)
        return _HOOKED_WRAPPERS[model]
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
