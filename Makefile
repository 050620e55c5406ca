# ota — two commands: `make demo` and `make test`. `make help` lists the rest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/ota/v1/*.proto)
# The generated ota/v1 code is committed (see docs/DECISIONS.md, "Packaging"):
# `make proto` rewrites it, `make check` fails when it no longer matches protos/.
PROTOC = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	--python_out=$(1) --grpc_python_out=$(1) --mypy_out=quiet:$(1) --mypy_grpc_out=quiet:$(1) $(PROTOS)

.DEFAULT_GOAL := help
.PHONY: help demo test check bench proto proto-check dist clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

proto: $(STAMP) ## regenerate the committed ota/v1 code and typed stubs from protos/
	rm -f ota/v1/*_pb2*.py ota/v1/*_pb2*.pyi
	$(call PROTOC,.)

proto-check: $(STAMP) ## fail if the committed ota/v1 code does not match protos/
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(call PROTOC,$$tmp) && \
	if ! diff -rq -x __init__.py -x __pycache__ "$$tmp/ota/v1" ota/v1 >/dev/null; then \
		echo "ota/v1 does not match protos/: run make proto (and commit the result)" >&2; exit 1; fi

demo: $(STAMP) ## start a private stack and run staged rollouts on a simulated fleet
	$(VENV)/bin/ota demo

# Two workers: much of an end-to-end test is waiting on processes, brokers and devices.
# A file stays on one worker; tests/conftest.py keeps the longest files together.
TEST_WORKERS ?= 2

test: $(STAMP) ## unit, integration and end-to-end tests (PostgreSQL too if OTA_TEST_DATABASE_URL is set)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

check: proto-check ## generated code up to date, ruff lint and format check, mypy strict
	$(VENV)/bin/ruff check ota device_sim tests bench
	$(VENV)/bin/ruff format --check ota device_sim tests bench
	$(VENV)/bin/mypy

bench: $(STAMP) ## benchmarks with same-run baselines; results in bench/results/
	$(PY) -m bench

dist: $(STAMP) ## build the sdist and the wheel into dist/
	$(PY) -m build --no-isolation --outdir dist .

clean: ## remove the virtualenv, build output and caches (not the committed ota/v1 code)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
