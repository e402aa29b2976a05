"""Layer-to-layer analyses of language models on TransformerLens and nnsight.

Everything common is one import away. A model (any backend, or a plain HuggingFace model)
and a prompt (text, a list of texts, or token ids) go in; result objects that plot
(``.figure()``), tabulate (``.to_frame()``), save (``.save(path)``, reloaded by
:func:`toolkit.load`) and report (``.report(path)``) come out.

Depth is named one way everywhere: boundaries ``h_0 .. h_L`` (targets ``"resid.l"``) and blocks
``0 .. L-1`` (``"attn.l"``, ``"mlp.l"``, ``"block.l"``), plus ``"output"``; TransformerLens hook
names such as ``"blocks.12.hook_resid_post"`` mean the same tensors (:mod:`toolkit.jacobian.targets`).

Example:
    >>> import toolkit
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = toolkit.make_backend(tiny_hf_model("llama"))    # or toolkit.load_model() for SmolLM2-135M
    >>> jac = toolkit.detached_jacobian(model, [5, 6, 7, 8])     # or a string, with a tokenizer
    >>> jac.reconstruction_error < 1e-5
    True
"""
from toolkit.backends import Backend, as_backend, make_backend
from toolkit.decompose.pipeline import decompose as decompose_layers
from toolkit.jacobian.all_layers import all_layer_jacobians
from toolkit.jacobian.audit import check_freeze
from toolkit.jacobian.compute import detached_jacobian, ordinary_jacobian
from toolkit.jacobian.layerwise import layerwise_spectra
from toolkit.jacobian.matrix_free import jacobian_svd
from toolkit.jacobian.steering import steer, steering_sweep
from toolkit.loading import load_model
from toolkit.models.registry import DEFAULT_MODEL
from toolkit.prompts import ensure_tokens

__version__ = "0.1.0"
__all__ = ["Backend", "make_backend", "as_backend", "load_model", "DEFAULT_MODEL", "ensure_tokens",
           "decompose_layers", "detached_jacobian", "ordinary_jacobian", "jacobian_svd", "all_layer_jacobians",
           "layerwise_spectra", "steer", "steering_sweep", "check_freeze", "load", "__version__"]
from toolkit.persist import load  # noqa: E402  (toolkit.load(path): any saved result, by its recorded kind)
