"""Shared fixtures. Real-model fixtures are session-scoped: SmolLM2 loads once per run."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer
    from toolkit.models.weights import SMOLLM2, converted_folder
    return AutoTokenizer.from_pretrained(str(converted_folder(SMOLLM2)))


@pytest.fixture(scope="session")
def smollm2_hf():
    """The real SmolLM2-135M-Instruct as a plain HF model, float32, eval mode."""
    from transformers import AutoModelForCausalLM
    from toolkit.models.weights import SMOLLM2, converted_folder
    return AutoModelForCausalLM.from_pretrained(str(converted_folder(SMOLLM2)), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_nnsight(smollm2_hf, smollm2_tokenizer):
    from toolkit.backends import make_backend
    return make_backend(smollm2_hf, smollm2_tokenizer, backend="nnsight", model_id="smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tl(smollm2_hf, smollm2_tokenizer):
    from toolkit.backends import make_backend
    return make_backend(smollm2_hf, smollm2_tokenizer, backend="transformer_lens", model_id="smollm2-135m")


# ----- the HookedTransformer (TransformerLens 3) tests --------------------------------------------
# They skip where HookedTransformer is absent (TransformerLens 4, the pinned stack); `make test-tl3`
# runs them on transformer-lens 3.9 with TOOLKIT_REQUIRE_HOOKED=1, where a skip is a failure: a
# missing HookedTransformer fails the fixture, and any skipped test fails the session.
REQUIRE_HOOKED = os.environ.get("TOOLKIT_REQUIRE_HOOKED", "0") == "1"
_SKIPPED: list[str] = []


@pytest.fixture(scope="session")
def hooked_tl():
    """TransformerLens 3's HookedTransformer class (skips on TransformerLens 4; fails under TOOLKIT_REQUIRE_HOOKED=1)."""
    from toolkit.backends.hooked_backend import hooked_transformer_class
    try:
        return hooked_transformer_class()
    except ImportError as err:
        if REQUIRE_HOOKED:
            pytest.fail(f"TOOLKIT_REQUIRE_HOOKED=1 but {err}")
        pytest.skip("HookedTransformer absent (TransformerLens 4); runs in `make test-tl3`")


def pytest_runtest_logreport(report):
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if REQUIRE_HOOKED and _SKIPPED:
        print(f"\nTOOLKIT_REQUIRE_HOOKED=1: {len(_SKIPPED)} test(s) skipped, which this leg counts as failures: "
              + ", ".join(_SKIPPED[:10]))
        session.exitstatus = 1
