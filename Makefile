# ca-daemon: `make run` starts the embedded default, `make test` installs what it needs and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE ?= state
CONFIG ?= $(STATE)/ca-daemon.toml
APT_PACKAGES := softhsm2 opensc openssl postgresql mosquitto
STAMP := $(VENV)/.installed

.PHONY: run test lint proto proto-check bench deps system-deps clean

run: deps
	$(BIN)/ca-daemon --config $(CONFIG) init --dev
	$(BIN)/ca-daemon --config $(CONFIG) serve

test: deps
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/pytest -q

lint: deps
	$(BIN)/ruff check ca_daemon tests bench scripts
	$(BIN)/ruff format --check ca_daemon tests bench scripts
	$(BIN)/mypy ca_daemon

proto: deps
	$(BIN)/python scripts/gen_proto.py

proto-check: deps
	$(BIN)/python scripts/gen_proto.py --check

bench: deps
	$(BIN)/python -m bench

deps: system-deps $(STAMP)

# Debian packages: the HSM (SoftHSM2), pkcs11-tool (opensc), openssl, and the PostgreSQL and
# Mosquitto packages the tests start private instances from. Installed only when missing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
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
