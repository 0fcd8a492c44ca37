# Two commands on a fresh machine:  `make demo` (runs the main job on sample photos) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: CPU machines take the CPU build of this release from local disk; on a GPU
	# cluster install the CUDA build of torch before `make setup` and pip keeps it.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[cpu,test]"   # cpu: onnxruntime; a GPU node takes .[gpu] (infra/Dockerfile)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/rp-anonymize demo demo-output

test: setup
	$(BIN)/pytest -q -rs --durations=20

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf demo-input demo-output models/tiny
