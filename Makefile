# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck unit integration e2e up clean compose-secrets

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

.PHONY: lock
# The container image's pinned, hashed packages (compose/requirements.lock and
# compose/build-requirements.lock, made by pip's own resolver: compose/lock.py); run it after
# changing the dependencies in pyproject.toml (tests/unit/test_compose.py says when).
lock: $(STAMP)
	$(BIN)/python compose/lock.py

demo: $(STAMP)
	$(BIN)/mesh demo

up: $(STAMP)
	$(BIN)/mesh up

test: check
	$(BIN)/python -m pytest -q -p no:cacheprovider

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

clean:
	rm -rf $(VENV) .mesh .pytest_cache .mypy_cache .ruff_cache

# What compose/docker-compose.yml mounts (git-ignored): an identity per service, the NATS
# servers' nkey authorization, certificates for mTLS between the NATS nodes.
compose-secrets: $(STAMP)
	$(BIN)/mesh creds compose --out compose/secrets

.PHONY: bench bench-smoke
# The full benchmark (~20 min on 2 cores): prints its tables, writes bench/results/latest.*.
bench: $(STAMP)
	$(BIN)/python -m bench

# Every benchmark for seconds (make test runs it too: tests/bench/test_smoke.py).
bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke --out .mesh/bench-smoke

.PHONY: chaos
chaos: $(STAMP)
	$(BIN)/python -m pytest -q -s -p no:cacheprovider -m chaos tests/chaos

.PHONY: sim
# The deterministic simulation of the decision protocol (tests/sim, docs/simulation.md).
# `make sim` runs SCHEDULES seeded schedules and prints schedules/s; `make sim SEED=n` replays
# one schedule exactly, with its trace; BUG=<name> puts a historical bug back (tests/sim/mutants.py).
SCHEDULES ?= 1000000
sim: $(STAMP)
	$(BIN)/python -m tests.sim $(if $(SEED),--seed $(SEED),--schedules $(SCHEDULES) --jobs $(or $(JOBS),2)) $(if $(BUG),--bug $(BUG))
