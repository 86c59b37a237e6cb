# precis: every target creates .venv and installs what it needs when that is missing or stale.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
export PYTHONPATH := $(CURDIR)/layers/core:$(CURDIR)
export SAM_CLI_TELEMETRY := 0
# No AWS account is needed or used: the local stack and the tests point boto3 at moto.
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: help run serve drop report test lint format build bench clean

help:
	@echo "make run     serve the local stack on 127.0.0.1 and summarize a sample document live"
	@echo "make serve   serve the local stack until stopped (PRECIS_PORT, PRECIS_DEV_API_KEY)"
	@echo "make drop FILE=path  drop a file into the running local stack's inbox and watch its job"
	@echo "make report  cost and tokens per user and model, latency per stage (+ a PNG chart), from the local stack"
	@echo "make test    run the test suite"
	@echo "make lint    ruff, mypy and sam validate --lint"
	@echo "make build   sam build (with Python 3.13 first on PATH)"
	@echo "make bench   measure streaming overhead and cold-start import time"

$(READY): pyproject.toml layers/core/requirements.txt
	@test -x $(PY) || "$$(.ci/python)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r layers/core/requirements.txt
	$(PY) -m pip install --quiet --group dev
	@touch $@

run: $(READY)
	$(PY) -m local run $(ARGS)

serve: $(READY)
	$(PY) -m local serve

drop: $(READY)
	@test -n "$(FILE)" || { echo "usage: make drop FILE=path/to/document.txt"; exit 2; }
	$(PY) -m local drop "$(FILE)" $(ARGS)

report: $(READY)
	$(PY) -m local report $(ARGS)

test: $(READY)
	$(PY) -m pytest $(ARGS)

lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/sam validate --lint

format: $(READY)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

build: $(READY)
	PATH="$$(dirname "$$(.ci/python)"):$$PATH" $(VENV)/bin/sam build

bench: $(READY)
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .aws-sam .pytest_cache .mypy_cache .ruff_cache
