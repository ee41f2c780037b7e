# Two commands from a fresh machine (only Python needed):
#   make demo   set up .venv, train the EFlow recipe on the built-in `shapes` videos (CPU), sample a video
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= runs/demo
# the demo's run: configs/demo.toml (8-frame 16x16 clips, 2000 steps, ~4 minutes on 2 CPU cores)
DEMO_FLAGS ?= --config configs/demo.toml

.PHONY: setup demo test lint clean

$(BIN)/eflow: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the pinned CPU torch first, only where no torch is installed (an unpinned torch pulls GBs of CUDA wheels)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/eflow

demo: setup
	$(BIN)/eflow train $(DEMO_FLAGS) --out $(DEMO_OUT) --overwrite
	$(BIN)/eflow sample $(DEMO_OUT) --steps 4 --num 8

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
