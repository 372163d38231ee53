#!/usr/bin/env bash
# Throwaway local servers for the demo and manual runs: PostgreSQL 15 clusters, MariaDB,
# and the broker (Apache Kafka 4.4; tansu with TIDELINK_BROKER=tansu); and how the demos
# show a daemon's metrics.
# Source this file, then call the functions.
# Everything lives under the directory you pass; nothing touches the machine's own services.

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"

# free_port: a port nothing listens on, below the kernel's ephemeral range: a port in that
# range can be the local end of any outgoing connection, which the probe does not see and
# which makes a server's bind fail.
free_port() {
  local port low=32768
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  [ "$low" -gt 11000 ] 2>/dev/null || low=32768
  while :; do
    port=$(( 10000 + RANDOM % (low - 10000) ))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

# wait_for_port PORT WHAT LOG: waits up to 10 s until something listens on 127.0.0.1:PORT;
# otherwise says WHAT did not start and where its LOG is, and fails.
wait_for_port() {
  local port="$1" what="$2" log="$3"
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$what did not start; see $log" >&2
  return 1
}

# start_pg DIR PORT [WAL_LEVEL]: initdb (as user postgres when run as root) and start.
start_pg() {
  local dir="$1" port="$2" wal_level="${3:-logical}"
  local run=()
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$dir"
    run=(runuser -u postgres --)
  fi
  "${run[@]}" "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres --no-sync -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o \
    "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c wal_level=$wal_level -c max_wal_senders=10 -c max_replication_slots=10 -c fsync=off" \
    start >/dev/null || { cat "$dir/server.log" >&2; return 1; }
}

# stop_pg DIR
stop_pg() {
  local dir="$1" run=()
  [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
  [ -d "$dir/data" ] && "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
}

# start_broker DIR PORT: a single-node Apache Kafka (KRaft, broker and controller in one
# process) on 127.0.0.1:PORT with its log in DIR, or tansu with sqlite storage when
# TIDELINK_BROKER=tansu; pid in DIR/broker.pid, output in DIR/broker.log
start_broker() {
  local dir="$1" port="$2" here
  here="$(dirname "${BASH_SOURCE[0]}")"
  mkdir -p "$dir"
  if [ "${TIDELINK_BROKER:-kafka}" = tansu ]; then
    local tansu
    tansu="$("$here/install-tansu.sh")" || return 1
    ( cd "$dir" && exec "$tansu" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "sqlite://tansu.db" >"$dir/broker.log" 2>&1 ) &
    echo $! >"$dir/broker.pid"
    wait_for_port "$port" tansu "$dir/broker.log"
    return
  fi
  local kafka controller internal
  kafka="$("$here/install-kafka.sh")" || return 1
  controller=$(free_port) internal=$(free_port)
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=CLIENT://127.0.0.1:$port,INTERNAL://127.0.0.1:$internal,CONTROLLER://127.0.0.1:$controller
advertised.listeners=CLIENT://127.0.0.1:$port,INTERNAL://127.0.0.1:$internal
listener.security.protocol.map=CLIENT:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=INTERNAL
log.dirs=$dir/data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
  local java=(java -cp "$kafka/lib/*" "-Dlog4j2.configurationFile=$kafka/log4j2.properties")
  # The cluster id: 16 random bytes, base64url (StorageTool random-uuid logs to stdout);
  # given with `=` since it may start with `-`.
  "${java[@]}" kafka.tools.StorageTool format -c "$dir/server.properties" \
    --cluster-id="$(openssl rand 16 | base64 | tr '+/' '-_' | tr -d '=')" >"$dir/format.log" 2>&1 \
    || { cat "$dir/format.log" >&2; return 1; }
  "${java[@]}" -Xms256m -Xmx512m kafka.Kafka "$dir/server.properties" >"$dir/broker.log" 2>&1 &
  echo $! >"$dir/broker.pid"
  for _ in $(seq 1 600); do
    grep -q "Kafka Server started" "$dir/broker.log" 2>/dev/null && return 0
    kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null || break
    sleep 0.1
  done
  echo "Apache Kafka did not start; see $dir/broker.log" >&2
  return 1
}

# stop_broker DIR
stop_broker() {
  local dir="$1"
  [ -f "$dir/broker.pid" ] && kill "$(cat "$dir/broker.pid")" 2>/dev/null || true
}

# start_mariadb DIR PORT [SERVER_ID]: a throwaway MariaDB with the row binlog a CDC source
# needs; root connects over TCP without a password. pid in DIR/mariadb.pid
start_mariadb() {
  local dir="$1" port="$2" server_id="${3:-1}"
  mkdir -p "$dir/tmp"
  [ "$(id -u)" = 0 ] && chown -R mysql: "$dir"
  mariadb-install-db --no-defaults --user=mysql --datadir="$dir/data" --tmpdir="$dir/tmp" \
    --auth-root-authentication-method=normal \
    --skip-test-db >"$dir/install.log" 2>&1 || { cat "$dir/install.log" >&2; return 1; }
  mariadbd --no-defaults --user=mysql --datadir="$dir/data" --tmpdir="$dir/tmp" --port="$port" --bind-address=127.0.0.1 \
    --socket="$dir/sock" --pid-file="$dir/mariadb.pid" --log-bin="$dir/data/binlog" \
    --binlog-format=ROW --binlog-row-image=FULL --server-id="$server_id" \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_bin --skip-name-resolve \
    --innodb-buffer-pool-size=64M >"$dir/server.log" 2>&1 &
  wait_for_port "$port" mariadbd "$dir/server.log"
}

# stop_mariadb DIR
stop_mariadb() {
  local dir="$1"
  [ -f "$dir/mariadb.pid" ] && kill "$(cat "$dir/mariadb.pid")" 2>/dev/null || true
}

# show_metrics LISTEN: the demos' few lines of a daemon's /metrics, and why its sink counts
# can exceed its source's
show_metrics() {
  local listen="$1"
  echo "==> a few lines of http://$listen/metrics"
  curl -s "http://$listen/metrics" | grep -E '^tidelink_(source_events_total|kafka_produced_events_total|sink_applied_rows_total|sink_lag_seconds|errors_total)' | head -14
  echo "    (the sink's counts include the snapshot that ran beside the workload: its op=\"read\" rows,"
  echo "    and the deletes it sends for rows the workload deleted while it copied them)"
}
