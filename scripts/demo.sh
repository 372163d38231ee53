#!/usr/bin/env bash
# `make demo`: a real pipeline on throwaway local servers. Starts a source and a target
# PostgreSQL 15 and a broker (Apache Kafka; tansu with TIDELINK_BROKER=tansu), runs `tidelink run -c configs/pg-to-pg.yaml`, drives a
# workload of inserts, updates and deletes, shows the target catching up (counts and
# checksums) and some /metrics lines, then stops everything and removes it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/servers.sh"
"$root/scripts/install-deps.sh"
echo "==> building tidelink"
cargo build -q -p tidelink --manifest-path "$root/Cargo.toml"
tidelink="${CARGO_TARGET_DIR:-$root/target}/debug/tidelink"

work="$(mktemp -d "${TMPDIR:-/tmp}/tidelink-demo.XXXXXX")"
chmod 755 "$work"  # the postgres user runs the clusters inside it
daemon_pid=""
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  stop_broker "$work/kafka"
  stop_pg "$work/source"
  stop_pg "$work/target"
  rm -rf "$work"
}
trap cleanup EXIT

src_port=$(free_port); dst_port=$(free_port); kafka_port=$(free_port); metrics_port=$(free_port)
echo "==> starting source PostgreSQL :$src_port, target PostgreSQL :$dst_port, broker :$kafka_port (${TIDELINK_BROKER:-kafka})"
start_pg "$work/source" "$src_port"
start_pg "$work/target" "$dst_port"
start_broker "$work/kafka" "$kafka_port"

psql_src=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$src_port" -U postgres)
psql_dst=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$dst_port" -U postgres)
"${psql_src[@]}" -c "CREATE DATABASE shop"
"${psql_dst[@]}" -c "CREATE DATABASE replica"
schema="
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text, tags text[],
                        profile jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL, total numeric(12,2) NOT NULL,
                     status text NOT NULL, placed_on date NOT NULL, receipt bytea);"
"${psql_src[@]}" -d shop -c "$schema"
"${psql_dst[@]}" -d replica -c "$schema"

export SOURCE_DSN="postgres://postgres@127.0.0.1:$src_port/shop"
export TARGET_DSN="postgres://postgres@127.0.0.1:$dst_port/replica"
export KAFKA_BROKERS="127.0.0.1:$kafka_port"
export METRICS_LISTEN="127.0.0.1:$metrics_port"
"$tidelink" validate -c "$root/configs/pg-to-pg.yaml"
echo "==> tidelink run -c configs/pg-to-pg.yaml (log: $work/tidelink.log)"
"$tidelink" run -c "$root/configs/pg-to-pg.yaml" >"$work/tidelink.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 150); do
  curl -sf "http://$METRICS_LISTEN/readyz" >/dev/null && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/tidelink.log"; exit 1; }
  sleep 0.2
done
curl -sf "http://$METRICS_LISTEN/readyz" >/dev/null || { echo "tidelink did not become ready"; cat "$work/tidelink.log"; exit 1; }
echo "    ready: $(curl -s "http://$METRICS_LISTEN/readyz" | tr '\n' ' ')"

counts() {
  "$1" "${@:2}" -At -c "SELECT (SELECT count(*) FROM customers) || ' customers, ' || (SELECT count(*) FROM orders) || ' orders'"
}
digest() {
  "$1" "${@:2}" -At -c "SELECT md5(coalesce((SELECT string_agg(c::text, '|' ORDER BY id) FROM customers c), '') ||
                                  coalesce((SELECT string_agg(o::text, '|' ORDER BY id) FROM orders o), ''))"
}

echo "==> workload: 20 transactions of inserts, updates and deletes on the source"
"${psql_src[@]}" -d shop -c "INSERT INTO customers (id, name, email, tags, profile)
  SELECT g, 'customer ' || g, 'c' || g || '@example.com', ARRAY['demo', 'tier-' || (g % 3)],
         jsonb_build_object('vip', g % 10 = 0) FROM generate_series(1, 2000) g"
for round in $(seq 1 20); do
  "${psql_src[@]}" -d shop -c "BEGIN;
    INSERT INTO orders (customer_id, total, status, placed_on, receipt)
      SELECT (g * 7 + $round) % 2000 + 1, round((g * 1.37 + $round)::numeric, 2), 'new', date '2026-01-01' + $round,
             decode(md5(g::text), 'hex') FROM generate_series(1, 500) g;
    UPDATE orders SET status = 'shipped' WHERE id % 20 = $round % 20 AND status = 'new';
    UPDATE customers SET email = 'moved' || id || '@example.org' WHERE id % 50 = $round;
    DELETE FROM orders WHERE id % 97 = $round;
    COMMIT;"
  printf '    round %2d  source: %-32s target: %s\n' "$round" "$(counts "${psql_src[@]}" -d shop)" "$(counts "${psql_dst[@]}" -d replica)"
done

echo "==> waiting for the target to catch up"
for i in $(seq 1 120); do
  s="$(digest "${psql_src[@]}" -d shop)"; t="$(digest "${psql_dst[@]}" -d replica)"
  printf '    source: %-32s target: %s\n' "$(counts "${psql_src[@]}" -d shop)" "$(counts "${psql_dst[@]}" -d replica)"
  [ "$s" = "$t" ] && break
  sleep 1
done
if [ "$s" = "$t" ]; then
  echo "==> target equals source: checksum $s"
else
  echo "==> MISMATCH after 120 s: source $s, target $t"; tail -30 "$work/tidelink.log"; exit 1
fi

show_metrics "$METRICS_LISTEN"
echo "==> stopping tidelink (SIGTERM)"
kill -TERM "$daemon_pid"; wait "$daemon_pid" && echo "    exited cleanly"; daemon_pid=""
