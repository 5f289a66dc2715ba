# megatron_esft: `make demo` runs the whole ESFT pipeline on a tiny model; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: setup test test-gpu demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# the CPU build of torch is installed on its own first, so nothing pulls a CUDA torch
	$(PY) -m pip install --quiet -c constraints.txt torch==$(TORCH_VERSION)
	# constraints.txt: the exact versions the suite last passed with (a new release cannot change CI on its own)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The suite builds its tiny models on the CPU. Where a GPU is visible, Megatron-Core's hard-coded CUDA placement
# (moe/router.py, moe/experts.py: `.to(torch.cuda.current_device())`) splits such a model across devices, so the
# suite runs with the GPU hidden, and then, on a machine with a GPU, the GPU-only tests (test_cuda_*, the trainer on
# the GPU) run with it visible (`make test-gpu`).
GPU_TESTS := -k "test_cuda_ or test_gpu_training or gpu_memory"

# Most tests wait on subprocesses (tools, torchrun ranks), so one pytest process keeps about one of two cores busy;
# two workers (pytest-xdist; a file's tests stay on one worker, so its module fixtures are built once) take the
# suite from ~27 to ~19 minutes on 2 cores. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

test: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; \
	if [ $$rc -eq 0 ] && $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	    $(MAKE) --no-print-directory test-gpu; rc=$$?; fi; exit $$rc

test-gpu: setup
	$(PY) -m pytest -rs $(GPU_TESTS) tests

demo: setup
	$(PY) examples/tiny/run_demo.py --out runs/demo

clean:
	rm -rf runs/demo
