# tidelink: `make demo` runs a real pipeline locally; `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build deps test unit-test integration-test lint demo demo-mysql clean-test-logs

all: build

build:
	$(CARGO) build --workspace --bins

deps:
	scripts/install-deps.sh

# Unit tests, then end-to-end tests against real PostgreSQL and tansu (two at a time:
# each starts two clusters, a broker and tidelink processes).
test: deps
	$(CARGO) build -p tidelink
	$(CARGO) test --workspace --exclude tidelink-integration-tests
	$(CARGO) test --no-fail-fast -p tidelink-integration-tests -- --test-threads=2

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

demo: deps
	scripts/demo.sh

# MariaDB → Kafka → PostgreSQL (configs/mysql-to-pg.yaml).
demo-mysql: deps
	scripts/demo-mysql.sh

clean-test-logs:
	rm -rf target/test-logs
