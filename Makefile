# Two targets do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are the releases CI tests; `make test-oldest` checks the lowest admitted.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test test-oldest demo install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --no-cache-dir: no second copy of the downloaded wheels in ~/.cache (a CI install once ran out of disk)
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --no-cache-dir $(TORCH_PIN)
	$(BIN)/pip install --no-cache-dir -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check src tests benchmarks train.py examples
	$(BIN)/ruff format --check src tests benchmarks train.py examples

# one torch thread per test worker: two workers x two threads on two cores spin-wait and run ~10x slower
test: install lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 2 -q

# the suite with every dependency at the lowest release pyproject admits (torch 2.5.0, torchvision 0.20.0,
# transformers 4.40, timm 1.0.16, numpy 1.24 …), resolved by uv in its own venv (~3 GB, not in CI)
OLDEST := .venv-oldest
test-oldest:
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install uv
	$(OLDEST)/bin/uv pip install --python $(OLDEST)/bin/python --resolution lowest-direct -e '.[dev]'
	OMP_NUM_THREADS=1 $(OLDEST)/bin/pytest -n 2 -q

# trains cvt_tiny on the bundled digits (runs/cvt_tiny-digits; --overwrite: a second demo starts afresh)
demo: install
	$(BIN)/cvt train --overwrite

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info src/*.egg-info
