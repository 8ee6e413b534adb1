# Two targets do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are the releases this project is tested with; any torch>=2.5 works.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test demo install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check src tests benchmarks train.py examples
	$(BIN)/ruff format --check src tests benchmarks train.py examples

# one torch thread per test worker: two workers x two threads on two cores spin-wait and run ~10x slower
test: install lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 2 -q

# trains cvt_tiny on the bundled digits (runs/cvt_tiny-digits; --overwrite: a second demo starts afresh)
demo: install
	$(BIN)/cvt train --overwrite

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
