#!/usr/bin/env bash
# `make demo-mysql`: MariaDB → Kafka → PostgreSQL on throwaway local servers. Starts a
# MariaDB source with the row binlog, a PostgreSQL target and a broker (Apache Kafka; tansu with TIDELINK_BROKER=tansu), runs
# `tidelink run -c configs/mysql-to-pg.yaml` (the sink creates the target tables), drives a
# workload, shows the target catching up with equal counts and checksums, and /metrics.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/servers.sh"
"$root/scripts/install-deps.sh"
echo "==> building tidelink"
cargo build -q -p tidelink --manifest-path "$root/Cargo.toml"
tidelink="${CARGO_TARGET_DIR:-$root/target}/debug/tidelink"

work="$(mktemp -d "${TMPDIR:-/tmp}/tidelink-demo-mysql.XXXXXX")"
chmod 755 "$work"
daemon_pid=""
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  cp "$work/tidelink.log" "$root/target/demo-mysql.log" 2>/dev/null || true
  stop_broker "$work/kafka"
  stop_mariadb "$work/source"
  stop_pg "$work/target"
  rm -rf "$work"
}
trap cleanup EXIT

src_port=$(free_port); dst_port=$(free_port); kafka_port=$(free_port); metrics_port=$(free_port)
echo "==> starting source MariaDB :$src_port, target PostgreSQL :$dst_port, broker :$kafka_port (${TIDELINK_BROKER:-kafka})"
start_mariadb "$work/source" "$src_port"
start_pg "$work/target" "$dst_port"
start_broker "$work/kafka" "$kafka_port"

maria=(mariadb -h 127.0.0.1 -P "$src_port" -u root --batch --skip-column-names)
psql_dst=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$dst_port" -U postgres)
"${psql_dst[@]}" -c "CREATE DATABASE warehouse"
"${maria[@]}" -e "CREATE DATABASE store; USE store;
CREATE TABLE store.customers (id int PRIMARY KEY, name varchar(60) NOT NULL, email varchar(80),
  vip tinyint(1) NOT NULL DEFAULT 0, created_at datetime(6) NOT NULL DEFAULT NOW(6));
CREATE TABLE store.orders (id bigint unsigned AUTO_INCREMENT PRIMARY KEY, customer_id int NOT NULL,
  total decimal(12,2) NOT NULL, status enum('new','paid','shipped') NOT NULL, placed_on date NOT NULL);
INSERT INTO store.customers (id, name, email, vip)
  SELECT seq, CONCAT('customer ', seq), CONCAT('c', seq, '@example.com'), seq % 10 = 0 FROM seq_1_to_2000;"

export SOURCE_DSN="mysql://root@127.0.0.1:$src_port/store"
export TARGET_DSN="postgres://postgres@127.0.0.1:$dst_port/warehouse"
export KAFKA_BROKERS="127.0.0.1:$kafka_port"
export METRICS_LISTEN="127.0.0.1:$metrics_port"
"$tidelink" validate -c "$root/configs/mysql-to-pg.yaml"
echo "==> tidelink run -c configs/mysql-to-pg.yaml (log: $work/tidelink.log)"
"$tidelink" run -c "$root/configs/mysql-to-pg.yaml" >"$work/tidelink.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 150); do
  curl -sf "http://$METRICS_LISTEN/readyz" >/dev/null && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/tidelink.log"; exit 1; }
  sleep 0.2
done
curl -sf "http://$METRICS_LISTEN/readyz" >/dev/null || { echo "tidelink did not become ready"; cat "$work/tidelink.log"; exit 1; }
echo "    ready; 2000 existing customers are copied by the initial snapshot"

src_counts() {
  "${maria[@]}" -e "SELECT CONCAT((SELECT COUNT(*) FROM store.customers), ' customers, ', (SELECT COUNT(*) FROM store.orders), ' orders')"
}
dst_counts() {
  "${psql_dst[@]}" -d warehouse -At -c "SELECT (SELECT count(*) FROM store.customers) || ' customers, ' || (SELECT count(*) FROM store.orders) || ' orders'" 2>/dev/null || echo "(tables not created yet)"
}
# The same text per row on both sides, then md5 over all rows.
src_digest() {
  "${maria[@]}" -e "SELECT MD5(CONCAT(
    IFNULL((SELECT GROUP_CONCAT(CONCAT_WS(',', id, name, email, vip) ORDER BY id SEPARATOR '|') FROM store.customers), ''),
    IFNULL((SELECT GROUP_CONCAT(CONCAT_WS(',', id, customer_id, total, status, placed_on) ORDER BY id SEPARATOR '|') FROM store.orders), '')))" \
    --init-command="SET SESSION group_concat_max_len = 1073741824"
}
dst_digest() {
  "${psql_dst[@]}" -d warehouse -At -c "SELECT md5(
    coalesce((SELECT string_agg(concat_ws(',', id, name, email, vip), '|' ORDER BY id) FROM store.customers), '') ||
    coalesce((SELECT string_agg(concat_ws(',', id, customer_id, total, status, placed_on), '|' ORDER BY id) FROM store.orders), ''))" 2>/dev/null || echo "-"
}

echo "==> workload: 20 transactions of inserts, updates and deletes on the source"
for round in $(seq 1 20); do
  "${maria[@]}" -e "USE store; START TRANSACTION;
    INSERT INTO store.orders (customer_id, total, status, placed_on)
      SELECT (seq * 7 + $round) % 2000 + 1, ROUND(seq * 1.37 + $round, 2), 'new', DATE '2026-01-01' + INTERVAL $round DAY FROM seq_1_to_500;
    UPDATE store.orders SET status = 'shipped' WHERE id % 20 = $round % 20 AND status = 'new';
    UPDATE store.customers SET email = CONCAT('moved', id, '@example.org') WHERE id % 50 = $round;
    DELETE FROM store.orders WHERE id % 97 = $round;
    COMMIT;"
  printf '    round %2d  source: %-32s target: %s\n' "$round" "$(src_counts)" "$(dst_counts)"
done

echo "==> waiting for the target to catch up"
for i in $(seq 1 120); do
  s="$(src_digest)"; t="$(dst_digest)"
  printf '    source: %-32s target: %s\n' "$(src_counts)" "$(dst_counts)"
  [ "$s" = "$t" ] && break
  sleep 1
done
if [ "$s" = "$t" ]; then
  echo "==> target equals source: checksum $s"
else
  echo "==> MISMATCH after 120 s: source $s, target $t"; tail -30 "$work/tidelink.log"; exit 1
fi
echo "==> tidelink status"
"$tidelink" status -c "$root/configs/mysql-to-pg.yaml" | head -8
show_metrics "$METRICS_LISTEN"
echo "==> stopping tidelink (SIGTERM)"
kill -TERM "$daemon_pid"; wait "$daemon_pid" && echo "    exited cleanly"; daemon_pid=""
