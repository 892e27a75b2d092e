# make demo: set up .venv from nothing and run the main job on the built-in default.
# make test: set up .venv from nothing and run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU build) first, so that the project's "torch>=2.4" takes it rather than
# pulling a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test test-base lint format clean chromium

# The last install is the reference for the parity tests: open-flamingo pins torch 2.0.1, so
# only its model code is installed (without dependencies), with the one small package it imports;
# timm (the EVA-CLIP reference) without its torchvision, which does not load beside this torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps open-flamingo==2.0.1 einops-exts==0.0.4 timm==1.0.31
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/interleaf demo

# The chat page's test drives Debian's chromium through Playwright (a browser download cannot
# work without internet); installed from the Debian registry when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(VENV)/.installed chromium
	$(PY) -m pytest

# A base install (`pip install .`, no extras) in a virtualenv of its own, smoke-tested.
BASE_VENV ?= .venv-base
test-base:
	rm -rf $(BASE_VENV)
	$(PYTHON) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BASE_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(BASE_VENV)/bin/python -m pip install --quiet .
	cd /tmp && HF_HUB_OFFLINE=1 $(CURDIR)/$(BASE_VENV)/bin/python $(CURDIR)/.ci/smoke_base_install.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --config .importlinter

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) $(BASE_VENV) .pytest_cache .ruff_cache build
