# `make run` and `make test` are the two commands in the README: each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdtrain-installed

.PHONY: setup run test test-slow test-multinode bench clean

setup: $(STAMP)

# Where no NVIDIA GPU is visible, put the CPU build of torch in place before anything asks
# for torch, so the range in pyproject.toml is already satisfied and pip never downloads a
# multi-GB CUDA build. A CPU wheel pip can find locally (--find-links) is taken first, its
# dependencies from the index; else PyTorch's CPU index. With a GPU, pip's normal (CUDA)
# torch comes in through pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
	  if $(PY) -m pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then \
	    $(PY) -m pip install -q torch==2.13.0; \
	  else \
	    $(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
	      --extra-index-url https://pypi.org/simple; \
	  fi; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: setup
	$(VENV)/bin/sdtrain launch recipes/quickstart.yaml

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

# Every multi-node test (ssh, pdsh, Slurm, OpenMPI), after installing what is missing.
test-multinode: setup
	.ci/install-multinode --all
	$(PY) -m pytest -m multinode

bench: setup
	$(VENV)/bin/sdtrain bench recipes/quickstart.yaml --peers torch

clean:
	rm -rf $(VENV) runs
