#!/usr/bin/env bash
# Builds nisshi (tansu's successor, Kafka-compatible) once and caches it, for `make bench`'s
# measurements on a broker with PostgreSQL storage. nisshi needs rustc >= 1.96: the first
# installed toolchain that new (stable first, then any other rustup has) builds it.
# Prints the path of the nisshi binary on stdout; exits 3, saying why on stderr, when no
# toolchain can build it (the benchmark then leaves those measurements out).
set -euo pipefail
NISSHI_VERSION="${NISSHI_VERSION:-0.8.1}"
CACHE_DIR="${TIDELINK_CACHE_DIR:-$HOME/.cache/tidelink}"
ROOT="$CACHE_DIR/nisshi-$NISSHI_VERSION"
BIN="$ROOT/bin/nisshi"
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/nisshi.lock"
flock 9
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
minor() { rustc "$@" --version 2>/dev/null | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p'; }
toolchain=""
if [ "$(minor)" -ge 96 ] 2>/dev/null; then
  toolchain="default"
elif command -v rustup >/dev/null; then
  for t in $(rustup toolchain list | awk '{print $1}'); do
    if [ "$(minor "+$t")" -ge 96 ] 2>/dev/null; then
      toolchain="$t"
      break
    fi
  done
fi
if [ -z "$toolchain" ]; then
  echo "nisshi $NISSHI_VERSION needs rustc >= 1.96 and no installed toolchain is that new (rustc $(rustc --version | cut -d' ' -f2)); the benchmark leaves out its nisshi measurements" >&2
  exit 3
fi
echo "building nisshi $NISSHI_VERSION with the $toolchain toolchain into $ROOT (about 20 minutes, once)..." >&2
if [ "$toolchain" = default ]; then
  cargo install nisshi --version "$NISSHI_VERSION" --locked --root "$ROOT" >&2
else
  cargo "+$toolchain" install nisshi --version "$NISSHI_VERSION" --locked --root "$ROOT" >&2
fi
echo "$BIN"
