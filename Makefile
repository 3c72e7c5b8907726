# Every target bootstraps its own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
FUZZ_STAMP := $(VENV)/.installed-fuzz

export FLEET_SOCKET ?= $(CURDIR)/.fleet/fleetd.sock
export FLEET_STATE_DIR ?= $(CURDIR)/.fleet/state

.PHONY: install run test lint format unasync bench chaos load fuzz clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint,etcd]'
	touch $(STAMP) $(RUN_STAMP)

# fleetd alone needs only the runtime packages: a first `make run` installs no test or lint tools.
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

run: $(RUN_STAMP)
	@echo "fleetd on $(FLEET_SOCKET); in another shell: export FLEET_SOCKET=$(FLEET_SOCKET)"
	$(BIN)/fleetd

# Tests mostly wait on processes they start, so three workers on two cores halve the suite;
# `make test PYTEST_ARGS=` runs it in one process.
PYTEST_ARGS ?= -n 3

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check fleetd fleetctl protocol tests bench
	$(BIN)/ruff format --check fleetd fleetctl protocol tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix fleetd fleetctl protocol tests bench
	$(BIN)/ruff format fleetd fleetctl protocol tests bench

# fleetctl/sync.py (the blocking SyncClient) is generated from fleetctl/client.py (the async
# Client) by token replacement; tests/test_unasync.py fails when it is stale.
unasync: $(STAMP)
	$(BIN)/python -m tests.unasync

bench: $(STAMP)
	$(BIN)/python -m bench

# fleetd SIGKILLed at random moments under a mixed workload, invariants checked after each
# restart (tests/chaos.py; its short form runs in `make test`). E.g. CHAOS_ARGS="--kills 50
# --seed 7 --json chaos.json --verbose".
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

# 200 concurrent clients mixing status, lease and claims operations against one fleetd with
# 500 members (tests/load.py; its short form runs in `make test`): throughput, p50/p99 per op,
# zero errors and zero lost writes. E.g. LOAD_ARGS="--seconds 60 --json load.json".
load: $(STAMP)
	$(BIN)/python -m tests.load $(LOAD_ARGS)

# Coverage-guided fuzzing with atheris (the `fuzz` extra), each target for FUZZ_SECONDS:
# frames, responses, fleet.toml and fleetctl's argv (tests/fuzz_targets.py). Findings go to
# .fuzz/crashes/; `python -m tests.fuzz_targets TARGET FILE` replays one.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= frames responses toml argv

$(FUZZ_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,lint,etcd,fuzz]'
	touch $(FUZZ_STAMP)

fuzz: $(FUZZ_STAMP)
	@for target in $(FUZZ_TARGETS); do \
		echo "fuzz: $$target for $(FUZZ_SECONDS) s"; \
		$(BIN)/python -m tests.fuzz_targets $$target -max_total_time=$(FUZZ_SECONDS) \
			-print_final_stats=1 || exit 1; \
	done

clean:
	rm -rf $(VENV) .fleet .fuzz bench/results
