# Quickstart targets. Each creates ./.venv on first use and installs everything it needs from the package
# registries (torch and torchvision are pinned here, not in the package metadata: pip on our build machines
# takes this pair from local disk, and torch-fidelity needs a torchvision that imports beside torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg Makefile | cksum | cut -d' ' -f1)
TORCH := torch==2.14.1 torchvision==0.29.1
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint env data clean

env: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[eval,text,dev]'
	rm -f $(VENV)/.installed-* && touch $@

# Fashion-MNIST's offline IDX files (Debian package; root only, best effort: without them the benchmark reads the
# Hub through `datasets` and the tests that need the real files skip).
data:
	@test -d $(FASHION) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { timeout 300 apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -qq >/dev/null 2>&1 && \
	      timeout 300 apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; }; } || \
	  echo "note: dataset-fashion-mnist is not installed; Fashion-MNIST tests skip"

demo: $(STAMP)
	$(BIN)/scm-distill demo --output demo-output

# Two pytest workers, one torch thread each (a file's tests stay on one worker, so its module fixtures are built
# once): most of the suite is imports, subprocess start-up and tiny models. On the 2-core build machine, alone, the
# 455 tests took 14.4 minutes (2026-12-03; 443 took 11.0 the day before), against more than 26 in one process at 2
# threads.
test: $(STAMP) data
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check scm_distill tests examples

clean:
	rm -rf demo-output .pytest_cache
