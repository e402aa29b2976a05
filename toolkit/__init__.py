"""Layer-to-layer analyses of language models on TransformerLens and nnsight.

Example:
    >>> import toolkit
    >>> model = toolkit.load_model()            # SmolLM2-135M-Instruct, offline   # doctest: +SKIP
    >>> hs = model.hidden_states(model.to_tokens("The capital of France is"))       # doctest: +SKIP
"""
from toolkit.backends import Backend, make_backend
from toolkit.models.loading import load_model
from toolkit.models.registry import DEFAULT_MODEL

__version__ = "0.1.0"
__all__ = ["Backend", "make_backend", "load_model", "DEFAULT_MODEL", "__version__"]
from toolkit.persist import load  # noqa: E402  (toolkit.load(path): any saved result, by its recorded kind)
