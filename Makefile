# vinakit: `make demo` runs the CPU demo end to end, `make test` runs the test suite.
# Both set up .venv/ first when needed. On a machine with an NVIDIA GPU the same setup installs the GPU stack.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vinakit-installed
# CPU wheels of torch; leave empty to take torch from your pip configuration (e.g. a local wheel folder).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test clean-cache gpu-wheels gpu-install gpu-check

setup: $(STAMP)

$(STAMP): requirements.txt requirements-unsloth.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "vinakit setup: NVIDIA GPU found: installing the CUDA build of torch 2.13.0"; \
	  $(PY) -m pip install -q torch==2.13.0; \
	elif $(PY) -m pip install --dry-run -q --no-deps --no-index torch==2.13.0 >/dev/null 2>&1; then \
	  echo "vinakit setup: no GPU: installing the CPU build of torch 2.13.0 found by pip locally"; \
	  $(PY) -m pip install -q torch==2.13.0; \
	else \
	  echo "vinakit setup: no GPU: installing the CPU build of torch 2.13.0 from $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install -q torch==2.13.0 --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q -r requirements.txt pytest
	# unsloth's metadata asks for torchvision and a certifi newer than some indexes have: install it alone.
	$(PY) -m pip install -q --no-deps -r requirements-unsloth.txt
	# torchvision from PyPI does not load beside the CPU torch and breaks `import transformers`.
	@if ! $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  $(PY) -m pip uninstall -q -y torchvision 2>/dev/null || true; fi
	$(PY) -m pip install -q --no-deps -e .
	@gpu=$$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0); \
	$(PY) -c "import sys, torch; print('vinakit setup: torch', torch.__version__, '| CUDA build:', torch.version.cuda); \
	sys.exit('vinakit setup: a CUDA build of torch landed on a machine without a GPU: remove .venv and retry' \
	if $$gpu == 0 and torch.version.cuda else 0)"
	@touch $(STAMP)

demo: setup
	$(PY) -m vinakit.demo

test: setup
	$(PY) -m pytest -q

clean-cache:
	rm -rf ~/.cache/vinakit

# ---- The GPU check (see bench/gpu_check.py and bench/README.md) ------------------------------------------------
# Here, with network: download the wheels a GPU machine without network lacks, in parts of <= 60 MiB (.whl/part-N).
gpu-wheels: setup
	$(PY) bench/gpu_wheels.py

# On the GPU machine: install the wheels of every carried part into GPU_SITE (kept while the machine stays warm).
GPU_SITE ?= /tmp/vinakit-gpu-site
PART ?= .whl
gpu-install:
	@wheels=$$(find $(PART) -name '*.whl' 2>/dev/null); \
	if [ -n "$$wheels" ]; then python3 -m pip install -q --no-index --no-deps --target $(GPU_SITE) $$wheels; \
	  echo "vinakit gpu-install: $$(echo $$wheels | wc -w) wheels into $(GPU_SITE)"; \
	else echo "vinakit gpu-install: no wheels under $(PART)"; fi

# DRY_RUN=1: the same steps on tiny-vi on a CPU (CI runs this). Otherwise the real check on an NVIDIA GPU.
ifeq ($(DRY_RUN),1)
gpu-check: setup
	$(PY) bench/gpu_check.py --dry-run
else
gpu-check: gpu-install
	PYTHONPATH=$(GPU_SITE):$(CURDIR) python3 bench/gpu_check.py
endif
