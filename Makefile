# ca-daemon: `make run` starts the embedded default, `make test` installs what it needs and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE ?= state
CONFIG ?= $(STATE)/ca-daemon.toml
# Debian packages: the HSM (SoftHSM2), pkcs11-tool (opensc) and openssl to run; PostgreSQL and
# Mosquitto too for the tests, which start private instances of them: the tests start their own
# throwaway PostgreSQL cluster from /usr/lib/postgresql/*/bin (as the `postgres` user when run as
# root); set CA_DAEMON_TEST_PG_URL=postgresql://... to use a running server instead.
# faketime: tests/integration/test_clock_steps.py steps a running daemon's wall clock with libfaketime.
RUN_PACKAGES := softhsm2 opensc openssl
TEST_PACKAGES := $(RUN_PACKAGES) postgresql mosquitto faketime
STAMP := $(VENV)/.installed
# pytest-xdist processes, each taking whole test files (module fixtures stay in one process). Much of a test's time
# is spent waiting on a daemon (start-up, polling, timeouts), not on the CPU: on this 2-core machine the suite took
# 18 min 19 s in one process and 9 min 21 s in two (measured back to back), and later 9 min 2 s in three against
# 10 min 55 s in two (back to back, 1.78 and 1.66 cores busy on average). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 3

.PHONY: run test lint proto proto-check bench deps test-deps system-deps bytecode clean

run: deps bytecode
	$(BIN)/ca-daemon --config $(CONFIG) init --dev
	$(BIN)/ca-daemon --config $(CONFIG) serve

test: test-deps bytecode
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: deps
	$(BIN)/ruff check ca_daemon tests bench scripts
	$(BIN)/ruff format --check ca_daemon tests bench scripts
	$(BIN)/mypy --strict ca_daemon tests bench

proto: deps
	$(BIN)/python scripts/gen_proto.py

proto-check: deps
	$(BIN)/python scripts/gen_proto.py --check

bench: test-deps bytecode
	$(BIN)/python -m bench

# Every `ca-daemon` command and every daemon worker (a spawned process) imports the package afresh. Where
# PYTHONDONTWRITEBYTECODE is set (as on our CI machines) Python never caches its compiled modules, and each process
# compiled all of ca_daemon again: about 0.3 s of CPU in a 1 s command, 545 commands and hundreds of workers in a
# test run. compileall writes the caches whatever that variable says, and only for sources newer than their cache.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 ca_daemon bench

deps: PACKAGES = $(RUN_PACKAGES)
deps: system-deps $(STAMP)

test-deps: PACKAGES = $(TEST_PACKAGES)
test-deps: system-deps $(STAMP)

# Installs only what is missing, so a second run is quick and offline.
system-deps:
	@missing=""; for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c "import ensurepip" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
