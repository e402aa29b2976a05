"""Names the package's docstring examples use, built once per test session and only when an example needs them.

Docstrings show what a user writes after loading a model (``model = toolkit.load_model()``) and
running an analysis; these are the same objects, on the real SmolLM2-135M (the embedded default),
so every public example runs in ``make test`` instead of being skipped:

- ``model``: the embedded default, nnsight backend, float32;
- ``ids``: the token ids of ``"The capital of France is"`` (``[T]``);
- ``jac``: ``toolkit.detached_jacobian(model, "The bridge out of Marin is the")`` (output target);
- ``svd`` / ``analysis``: ``jac.svd(model)``;
- ``decomposition``: a small decomposition (embedded corpus, layers 2 and 3, 40/12 texts);
- ``steering``: ``toolkit.steer(model, concept, prompt, max_new_tokens=6)``;
- ``spectra``: ``toolkit.layerwise_spectra`` of ``toolkit.all_layer_jacobians`` on a tiny random Llama;
- ``top``: the matrix-free top-2 SVD of the output Jacobian of ``ids``;
- ``audit``: ``toolkit.check_freeze`` on a tiny random GPT-2;
- ``tiny``, ``tiny_f``, ``tiny_x``: a tiny random Llama (HF), the function of its boundary ``h_1``
  (last position) and the input embeddings ``[2, 64]`` it is taken at (for :func:`frozen_operator`);
- ``tmp``: a fresh temporary folder (:class:`pathlib.Path`) per example.
"""
from __future__ import annotations

import os
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

_CACHE: dict[str, Any] = {}


def _model():
    import toolkit
    return toolkit.load_model()


def _ids():
    return _get("model").to_tokens("The capital of France is")[0]


def _jac():
    import toolkit
    return toolkit.detached_jacobian(_get("model"), "The bridge out of Marin is the")


def _svd():
    return _get("jac").svd(_get("model"))


def _decomposition():
    import toolkit
    return toolkit.decompose_layers(_get("model"), "embedded", layers=[2, 3], n_train=40, n_test=12, seq_len=32,
                                    per_text=4, k=16, rank=8, compare_mlp=False, n_boot=200, progress=False,
                                    use_cache=False)


def _steering():
    import toolkit
    return toolkit.steer(_get("model"), "The bridge out of Marin is the Golden", "I'm going to Arizona to see the",
                         max_new_tokens=6)


def _spectra():
    import torch
    import toolkit
    from toolkit.models.tiny import tiny_hf_model
    tiny = toolkit.make_backend(tiny_hf_model("llama"), backend="nnsight")
    return toolkit.layerwise_spectra(toolkit.all_layer_jacobians(tiny, torch.tensor([3, 1, 4, 1, 5])), k=4)


def _top():
    import toolkit
    return toolkit.jacobian_svd(_get("model"), _get("ids"), k=2)


def _audit():
    import toolkit
    from toolkit.models.tiny import tiny_hf_model
    return toolkit.check_freeze(tiny_hf_model("gpt2"))


def _tiny():
    from toolkit.models.tiny import tiny_hf_model
    return tiny_hf_model("llama")


def _tiny_f():
    from toolkit.jacobian.targets import state_function
    return state_function(_get("tiny"), 1)


def _tiny_x():
    import torch
    from toolkit.jacobian.targets import input_embeddings
    return input_embeddings(_get("tiny"), torch.tensor([4, 5]))


_FACTORIES: dict[str, Callable[[], Any]] = {
    "tiny": _tiny, "tiny_f": _tiny_f, "tiny_x": _tiny_x,
    "model": _model, "ids": _ids, "jac": _jac, "svd": _svd, "analysis": _svd, "decomposition": _decomposition,
    "steering": _steering, "spectra": _spectra, "top": _top, "audit": _audit,
}


def _get(name: str) -> Any:
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]


def _names_used(item) -> set[str]:
    import re
    source = "\n".join(example.source for example in item.dtest.examples)
    used = {name for name in [*_FACTORIES, "tmp"] if re.search(rf"\b{name}\b", source)}
    # An example that builds its own ``model`` (a tiny one, say) keeps it: nothing is loaded for it.
    return {name for name in used if not re.search(rf"(^|;)\s*{name}\s*=[^=]|\bas {name}\b", source, re.M)}


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace, tmp_path):
    """Put the names a docstring example uses (and only those) into its namespace."""
    item = request.node
    if not hasattr(item, "dtest"):
        yield
        return
    for name in _names_used(item):
        if name == "tmp":
            doctest_namespace["tmp"] = tmp_path
        else:
            doctest_namespace[name] = _get(name)
    yield
