# Quick start:  make test   (creates .venv, installs the package, runs the test suite)
#
# The pins matter: `torch==2.13.0` must be in the same pip command as everything that depends
# on torch, otherwise pip resolves a multi-GB CUDA build on CPU machines (docs: README).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0
EXTRAS ?= dev
comma := ,
# one stamp per set of extras: `make test-gpu EXTRAS=gpu,dev` after `make test` installs the
# GPU extras instead of finding the CPU install's stamp and skipping
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: demo study venv test test-unit test-distributed test-gpu lint format plan clean help

help:
	@echo "make demo            create/update .venv, run the toy APT pipeline end to end (~17 min)"
	@echo "                     (another seed: make demo DEMO_ARGS=\"--seed 3\")"
	@echo "make study           the paper's ablations at toy scale, 3 seeds each -> docs/study.md (~2 h)"
	@echo "make test            create/update .venv, install, run the whole test suite"
	@echo "make test-unit       single-process tests only"
	@echo "make test-gpu        GPU-spec tests (need CUDA; install with EXTRAS=gpu,dev)"
	@echo "make lint            ruff"
	@echo "make plan            parameter counts of every preset"

demo: $(STAMP)
	$(PY) examples/demo.py $(DEMO_ARGS)

# Not part of `make test` / CI: up to 2 hours on 2 cores; resumable (re-run to continue).
study: $(STAMP)
	$(PY) examples/apt_study.py $(STUDY_ARGS)

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)" -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-distributed: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/distributed $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest tests -m gpu $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check megatron_apt tools tests
	$(PY) -m ruff format --check megatron_apt tools tests

format: $(STAMP)
	$(PY) -m ruff format megatron_apt tools tests

plan: $(STAMP)
	$(PY) tools/plan_model.py --all

clean:
	rm -rf $(VENV) build *.egg-info
