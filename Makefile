# Quickstart targets. Each creates ./.venv on first use and installs everything it needs from the package
# registries (torch and torchvision are pinned here, not in the package metadata: pip on our build machines
# takes this pair from local disk, and torch-fidelity needs a torchvision that imports beside torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg Makefile | cksum | cut -d' ' -f1)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint env clean

env: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[eval,text,dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/scm-distill demo --output demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check scm_distill tests examples

clean:
	rm -rf demo-output .pytest_cache
