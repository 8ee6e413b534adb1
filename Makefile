# Two targets do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are the releases this project is tested with; any torch>=2.4 works.
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
	$(BIN)/ruff check src tests benchmarks train.py

test: install lint
	$(BIN)/pytest -n 2 -q

demo: install
	$(BIN)/cvt train

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
