#!/usr/bin/env bash
# Builds the local Kafka-compatible broker (tansu) once and caches it.
# Prints the path of the tansu binary on stdout. Safe to run concurrently: a lock serialises builds.
set -euo pipefail
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
CACHE_DIR="${TIDELINK_CACHE_DIR:-$HOME/.cache/tidelink}"
ROOT="$CACHE_DIR/tansu-$TANSU_VERSION"
BIN="$ROOT/bin/tansu"
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/tansu.lock"
flock 9
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
echo "building tansu $TANSU_VERSION into $ROOT (about 10 minutes, once)..." >&2
cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore --root "$ROOT" >&2
echo "$BIN"
