# `make run` and `make test` are the two commands in the README: each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdtrain-installed
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: setup run test test-slow test-multinode bench bench-gpu clean

setup: $(STAMP)

# Where no NVIDIA GPU is visible, put the CPU build of torch in place before anything asks
# for torch, so the range in pyproject.toml is already satisfied and pip never downloads a
# multi-GB CUDA build. A CPU wheel pip can find locally (--find-links) is taken first, its
# dependencies from the index. Otherwise pip installs torch from whatever index its own
# configuration names (pip.conf, or PIP_INDEX_URL / PIP_EXTRA_INDEX_URL: point one at
# PyTorch's CPU wheel index to get the small build). With a GPU, pip's normal (CUDA) torch
# comes in through pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
	  $(PY) -m pip install -q --no-index --no-deps torch==$(TORCH_CPU_VERSION) 2>/dev/null || \
	    echo "setup: no local CPU wheel of torch; installing torch from pip's configured index"; \
	  $(PY) -m pip install -q torch==$(TORCH_CPU_VERSION); \
	fi
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $(STAMP)

run: setup
	$(VENV)/bin/sdtrain launch recipes/quickstart.yaml

test: setup
	$(PY) -m pytest --durations=25

test-slow: setup
	$(PY) -m pytest -m slow

# Every multi-node test (ssh, pdsh, Slurm, OpenMPI), after installing what is missing.
test-multinode: setup
	.ci/install-multinode --all
	$(PY) -m pytest -m multinode

bench: setup
	$(VENV)/bin/sdtrain bench recipes/quickstart.yaml --peers torch

# The GPU side-by-side (tests/bench_gpu.py): sdtrain against plain eager, torch.compile and
# DeepSpeed ZeRO-0 at GPT-2 124M and 1.3B. No setup: any Python with torch runs it from the
# checkout (.venv's where there is one); without CUDA it says so and exits 0.
bench-gpu:
	PYTHONPATH=. $(if $(wildcard $(PY)),$(PY),python3) tests/bench_gpu.py --json runs/bench-gpu.json

clean:
	rm -rf $(VENV) runs
