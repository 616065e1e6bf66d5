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
DEMO_DIR     ?= demo-output/smollm2
PYTEST_ARGS  ?=

# Stamps: an environment is reinstalled when pyproject.toml or the install script changes.
INSTALLED       := $(VENV)/.llmopt-installed
INSTALLED_TF457 := $(VENV_TF457)/.llmopt-installed

.PHONY: install install-tf457 lock models lint test demo proto bench clean

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

demo: models
	$(LLMOPT) export "$$($(LLMOPT) fetch smollm2-135m-instruct)" -o $(DEMO_DIR)
	$(LLMOPT) optimize $(DEMO_DIR) -o $(DEMO_DIR)-fused
	$(LLMOPT) quantize $(DEMO_DIR)-fused -o $(DEMO_DIR)-int4 --method int4
	$(LLMOPT) generate $(DEMO_DIR)-int4 "What is the capital of France?" --max-new-tokens 48
	$(LLMOPT) inspect $(DEMO_DIR)-int4

proto: install
	$(PYTHON) -m llmopt._proto.generate

bench: install
	$(LLMOPT) bench bench/configs/smollm2_cpu.yaml --prepare --skip-missing \
		--out bench/results/smollm2_cpu

clean:
	rm -rf demo-output .pytest_cache .mypy_cache .ruff_cache
