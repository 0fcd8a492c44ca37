# Two commands on a fresh machine:  `make demo` (runs the main job on sample photos) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast gpu-check gpu-check-smoke clean

# --no-cache-dir: a CI machine's disk has been seen nearly full; pip's cache would hold a second copy of every wheel.
PIP := $(BIN)/pip --no-cache-dir

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: CPU machines take the CPU build of this release from local disk; on a GPU
	# cluster install the CUDA build of torch before `make setup` and pip keeps it.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[cpu,test]"   # cpu: onnxruntime; a GPU node takes .[gpu] (infra/Dockerfile)
	# MTCNN's weights (the default ensemble's `mtcnn` pass) ship in facenet-pytorch's wheel, which pins torch<2.3 and
	# torchvision: installed without its dependencies (we load its weights only, never import it; pyproject.toml).
	$(PIP) install -q --no-deps "facenet-pytorch==2.6.0"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/rp-anonymize demo demo-output

test: setup
	$(BIN)/pytest -q -rs --durations=20 -n 2 --dist loadgroup

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# On a GPU node (one H100/H200, no hub): every GPU figure in < 8 min, a table against the targets and
# gpu-check.json. It runs in the environment at hand (.venv if there is one, else python3: e.g. the worker
# image), which needs CUDA torch and onnxruntime-gpu (README, "Checking a GPU node").
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) benchmarks/gpu_check.py --out gpu-check.json

# The same code on the tiny model on the CPU (tests/test_gpu_check.py runs it in CI).
gpu-check-smoke: setup
	PYTHONPATH=$(CURDIR) $(BIN)/python benchmarks/gpu_check.py --cpu-smoke --out gpu-check-smoke.json

clean:
	rm -rf demo-input demo-output models/tiny
