# Everything runs in virtual environments built by scripts/install.sh:
#   .venv        llmopt (editable) and its dev tools, newest transformers
#   .venv-tf457  the same with transformers 4.57, the oldest supported, for the export tests
VENV         ?= .venv
VENV_TF457   ?= .venv-tf457
TF457_SPEC   ?= transformers==4.57.*
PYTHON       := $(VENV)/bin/python
PYTHON_TF457 := $(VENV_TF457)/bin/python
LLMOPT       := $(VENV)/bin/llmopt
MODELS       := smollm2-135m-instruct all-minilm-l6-v2
DEMO_DIR     ?= llmopt-demo
PYTEST_ARGS  ?=

# Stamps: an environment is reinstalled when pyproject.toml or the install script changes.
INSTALLED       := $(VENV)/.llmopt-installed
INSTALLED_TF457 := $(VENV_TF457)/.llmopt-installed

.PHONY: install install-tf457 lock models lint test demo proto bench gpu-check clean

install: $(INSTALLED)

install-tf457: $(INSTALLED_TF457)

$(INSTALLED): pyproject.toml scripts/install.sh constraints/main.txt
	LLMOPT_CONSTRAINTS=constraints/main.txt scripts/install.sh $(VENV)
	touch $@

$(INSTALLED_TF457): pyproject.toml scripts/install.sh constraints/tf457.txt
	LLMOPT_CONSTRAINTS=constraints/tf457.txt scripts/install.sh $(VENV_TF457) '$(TF457_SPEC)'
	touch $@

# Re-resolve both environments from pyproject.toml alone (newest allowed versions) into fresh
# scratch environments and record what was installed as the new tested sets.
lock:
	rm -rf .venv-lock .venv-lock-tf457
	LLMOPT_CONSTRAINTS= scripts/install.sh .venv-lock
	LLMOPT_CONSTRAINTS= scripts/install.sh .venv-lock-tf457 '$(TF457_SPEC)'
	scripts/lock.sh .venv-lock constraints/main.txt
	scripts/lock.sh .venv-lock-tf457 constraints/tf457.txt
	rm -rf .venv-lock .venv-lock-tf457

models: install
	for model in $(MODELS); do $(LLMOPT) fetch $$model || exit 1; done

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy llmopt

test: lint models install-tf457
	$(PYTHON) -m pytest $(PYTEST_ARGS)
	$(PYTHON_TF457) -m pytest -m "not real_model" $(PYTEST_ARGS) tests/exporter

# The whole pipeline on SmolLM2: fetch, export, optimize, int8 + int4, serve, streamed chat,
# benchmark table and plot (see `llmopt demo --help`). A second run reuses the packages.
demo: install
	$(LLMOPT) demo --out $(DEMO_DIR)

proto: install
	$(PYTHON) -m llmopt._proto.generate
	$(PYTHON) scripts/gen_api_docs.py

bench: install
	$(LLMOPT) bench bench/configs/smollm2_cpu.yaml --prepare --skip-missing \
		--out bench/results/smollm2_cpu

# The GPU self-test (llmopt doctor --gpu): on a machine with an NVIDIA GPU and onnxruntime-gpu,
# cuda (and tensorrt where installed) against CPU, offline, in minutes; fails with the reasons.
gpu-check: install
	$(LLMOPT) doctor --gpu

clean:
	rm -rf llmopt-demo .pytest_cache .mypy_cache .ruff_cache
