# Two entry points do all set-up on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch, installed before anything else so that no CUDA build is pulled in.
# On a GPU machine: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# a local folder of wheels (the CPU torch build lies in /opt/wheels on the project's machines)
WHEELS ?= $(wildcard /opt/wheels)
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.installed

SHELL := /bin/bash
# DVC stages run `fluxfill <stage>`: the venv's bin must be on PATH for them
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install run test bench lint clean tiny-weights tiny-weights-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install $(if $(WHEELS),--find-links $(WHEELS)) $(TORCH_SPEC) 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]} -eq 0
	$(PIP) install -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]} -eq 0
	touch $(STAMP)

install: $(STAMP)

## run the whole chain on the embedded default (tiny model, demo photos, local MLflow)
run: install
	$(VENV)/bin/dvc repro
	$(VENV)/bin/fluxfill summary

## lint, then the whole test suite (CPU, no network)
test: lint
	$(PY) -m pytest -q

## retrain the tiny preset's shipped weights (fluxfill/weights/tiny) on the CPU, one thread, deterministic
tiny-weights: install
	$(VENV)/bin/fluxfill pretrain-tiny

## retrain them into a temporary folder and compare with the shipped files (equal hashes, or held-out
## figures within the stated tolerance on another machine); exit 1 on a mismatch
tiny-weights-check: install
	$(VENV)/bin/fluxfill pretrain-tiny --check

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check fluxfill flows tests bench

clean:
	rm -rf data/prepared data/latents models metrics plots eval checkpoints mlflow.db mlartifacts .fluxfill
