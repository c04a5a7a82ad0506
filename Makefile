# Two entry points: `make demo` (the CPU demo, the main job) and `make test` (the whole test suite).
# Both create and reuse .venv at the repo root. torch is installed first and then pinned by a
# constraints file, so nothing that follows can swap it for another (multi-GB) build.
SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := $(VENV)/torch-constraint.txt
STAMP := $(VENV)/.installed
EXTRAS ?= test,atropos
ARGS ?=
PYTEST_ARGS ?=

# The repo root goes ahead of site-packages: `verl/` here overlays the installed verl.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) ".[$(EXTRAS)]"
	$(PY) -c "import verl, os; assert 'site-packages' in verl.__path__[-1], verl.__path__"
	touch $(STAMP)

# Ray listens on every interface: where this user may (root with util-linux `unshare`), the demo
# runs in a network namespace that has only loopback. Elsewhere it runs as it is.
LOOPBACK_ONLY := $(shell [ "$$(id -u)" = 0 ] && unshare -n true 2>/dev/null && echo "unshare -n sh -c 'ip link set lo up && exec \"\$$0\" \"\$$@\"'")

demo: install
	$(LOOPBACK_ONLY) $(PY) -m recipe.atropos.demo $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
