# Fresh machine: `make demo` (main job) or `make test` (suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo demo-vqa demo-video lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel; every later install is held to it by the constraints file.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev,peft,deepspeed,diffusion,tensorboard]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/tokensift quickstart --out runs/quickstart

demo-vqa: $(STAMP)
	$(BIN)/tokensift quickstart-vqa --out runs/vqa

demo-video: $(STAMP)
	$(BIN)/tokensift quickstart-video --out runs/video

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/shellcheck launch/*.sh launch/*.sbatch

clean:
	rm -rf $(VENV) runs .pytest_cache
