# ota — two commands: `make demo` and `make test`. `make help` lists the rest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/ota/v1/*.proto)
GENERATED := ota/v1/.generated

.DEFAULT_GOAL := help
.PHONY: help demo test check bench proto clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(GENERATED): $(PROTOS) $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch $@

proto: $(GENERATED) ## generate ota/v1 code and typed stubs from protos/

demo: $(GENERATED) ## start a private stack and run staged rollouts on a simulated fleet
	$(VENV)/bin/ota demo

test: $(GENERATED) ## unit, integration and end-to-end tests (PostgreSQL too if OTA_TEST_DATABASE_URL is set)
	$(PY) -m pytest

check: $(GENERATED) ## ruff lint and format check, mypy strict
	$(VENV)/bin/ruff check ota device_sim tests bench
	$(VENV)/bin/ruff format --check ota device_sim tests bench
	$(VENV)/bin/mypy

bench: $(GENERATED) ## benchmarks with same-run baselines; results in bench/results/
	$(PY) -m bench

clean: ## remove the virtualenv, generated code and caches
	rm -rf $(VENV) ota/v1/*_pb2*.py* ota/v1/.generated .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
