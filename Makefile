# Two commands do all the set-up: `make train` and `make test`. Both create .venv when it is missing and
# install (once; the stamp is refreshed when pyproject.toml or this file changes). See DEVELOPERS.md for why
# torch goes first and DeepSpeed is built without isolation.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.dlm-installed
CONSTRAINTS := $(VENV)/constraints.txt
CONFIG ?= configs/smoke.yaml
PYTEST_ARGS ?=

.PHONY: install train test clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(BIN)/python -m pip install -c $(CONSTRAINTS) "setuptools>=64" wheel
	$(BIN)/python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(BIN)/python -m pip install --no-build-isolation -c $(CONSTRAINTS) deepspeed
	$(BIN)/python -m pip install -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/dlm train $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
