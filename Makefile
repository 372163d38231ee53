# tidelink: `make demo` runs a real pipeline locally; `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build deps test unit-test integration-test lint demo demo-mysql bench bench-quick chaos clean-test-logs

all: build

build:
	$(CARGO) build --workspace --bins

deps:
	scripts/install-deps.sh

# Unit tests, then end-to-end tests against real PostgreSQL, MariaDB and Apache Kafka (two at a time:
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

# The chaos suite at length: random faults under load (kill -9 of the source and sink
# processes, of the Kafka node leading a partition in a 3-node cluster, cluster restarts,
# database crashes), then `verify` and the exactly-once audit.
# `make test` runs one round of each fault; this runs CHAOS_ROUNDS and writes the report.
CHAOS_ROUNDS ?= 30
chaos: deps
	$(CARGO) build -p tidelink
	CHAOS_ROUNDS=$(CHAOS_ROUNDS) CHAOS_REPORT=$(CURDIR)/docs/reliability.md \
		$(CARGO) test -p tidelink-integration-tests --test chaos -- --nocapture

clean-test-logs:
	rm -rf target/test-logs

# Benchmarks (not tests): release builds, throwaway servers, ratios measured in the same run.
# `bench` uses 1M rows and writes docs/benchmarks.md; `bench-quick` (50k rows, a few
# minutes) exercises the same harness and prints the same table.
BENCH_BUILD = $(CARGO) build --release -p tidelink -p tidelink-integration-tests --bins
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

# The chart (a PNG next to the report) is drawn by scripts/bench-chart.py with matplotlib.
CHART_DEPS = python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib

# `make bench BENCH_NISSHI=1` also measures on nisshi with PostgreSQL storage when a
# toolchain can build it (scripts/install-nisshi.sh: rustc >= 1.96; about 20 minutes once,
# then cached); without one it says so and leaves those rows out. Apache Kafka is the
# reference broker, so nisshi is not built unless asked for.
NISSHI = $$(if [ "$(BENCH_NISSHI)" = 1 ]; then scripts/install-nisshi.sh || true; fi)

bench: deps
	$(BENCH_BUILD)
	TIDELINK_NISSHI_BIN=$(NISSHI) TIDELINK_BIN=$(TARGET_DIR)/release/tidelink $(TARGET_DIR)/release/bench --rows 1000000 --out docs/benchmarks.md
	$(CHART_DEPS)
	python3 scripts/bench-chart.py docs/benchmarks.md docs/benchmarks.png

bench-quick: deps
	$(BENCH_BUILD)
	TIDELINK_BIN=$(TARGET_DIR)/release/tidelink $(TARGET_DIR)/release/bench --rows 50000 --out $(TARGET_DIR)/bench-quick.md
	$(CHART_DEPS)
	python3 scripts/bench-chart.py $(TARGET_DIR)/bench-quick.md $(TARGET_DIR)/bench-quick.png
