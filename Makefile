# leukops: two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TASK ?= all_subtypes
DATA ?=
PYTEST_ARGS ?=
export LEUKOPS_PROFILE ?= dev
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint stack-up stack-down stack-status airflow-up clean

install: $(STAMP)

# Reinstall only when the project's requirements change; torch comes first so pip takes the
# wheels that lie on this disk (the pinned CUDA build) instead of resolving another one.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

demo: install
	$(BIN)/leukops demo --task $(TASK) $(if $(DATA),--data $(DATA),)

LINTED := pipelines serving dags tests benchmarks

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

stack-up: install
	$(BIN)/leukops stack up

stack-down: install
	$(BIN)/leukops stack down

stack-status: install
	$(BIN)/leukops stack status

# The stack, then Airflow's components on top (detached: `make stack-down` stops everything).
airflow-up: install
	$(BIN)/leukops stack up
	$(BIN)/leukops airflow up --detach

clean:
	-$(BIN)/leukops stack down
	rm -rf .leukops
