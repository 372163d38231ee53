//! End-to-end: PostgreSQL → Kafka → PostgreSQL, against real servers, asserting
//! that the target ends equal to the source.

use std::time::{Duration, Instant};
use tidelink_integration_tests::{
    first_column, http_get, metric_sum, table_rows, Daemon, PgCluster, PgPipeline, TYPES_SCHEMA,
};

const CATCH_UP: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread")]
async fn every_supported_type_round_trips_exactly() {
    let p = PgPipeline::start(TYPES_SCHEMA).await;
    round_trip_all_types(&p, "").await;
}

/// The target starts empty; the sink creates the table from the source's definitions.
#[tokio::test(flavor = "multi_thread")]
async fn missing_target_tables_are_created_from_the_source_definitions() {
    let p = PgPipeline::start_with(TYPES_SCHEMA, "").await;
    round_trip_all_types(&p, "          create_tables: true\n").await;
    let target = p.target.client("replica").await;
    let key: Vec<String> = first_column(
        &target,
        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid \
         AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'all_types'::regclass AND i.indisprimary",
    )
    .await
    .expect("primary key");
    assert_eq!(
        key,
        vec!["id"],
        "the created table has the source's primary key"
    );
}

async fn round_trip_all_types(p: &PgPipeline, sink_extra: &str) {
    let config = p.write_config("types.yaml", sink_extra);
    let _daemon = p.run_ready(&config, "types.log").await;
    let source = p.source.client("app").await;
    source
        .batch_execute(
            r#"
INSERT INTO all_types VALUES
 (1, -32768, -2147483648, -9223372036854775808, '-12345678901234567890.0123456789', '1e-20',
  '-3.4028235e38', '-1.7976931348623157e308', true,
  'plain', 'varchar ✓ ünïcödé 日本', 'ab', '\x00ff10'::bytea,
  '0001-01-01', '00:00:00', '23:59:59.999999+14:00',
  '1970-01-01 00:00:00.000001', '2024-02-29 12:34:56.789012+05:30', '-1 year 2 mons 3 days 04:05:06.7',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"a": [1, 2.5, null], "b": "x\"y"}', '{"nested": {"k": [true, false]}, "n": 1.10}',
  '{1,NULL,3}', '{"with space","quote\"d","back\\slash",NULL,"NULL",""}', '{{1,2},{3,4}}', '{1.5,NaN,-0.001}',
  '{a,bc}',
  'happy', '{sad,ok}', '192.168.0.1/24', '1234.56', '(1.5,-2)', B'1010', '[2024-01-01 00:00,2024-02-01 00:00)'),
 (2, 32767, 2147483647, 9223372036854775807, '0.0000000001', 'NaN',
  'NaN', 'Infinity', false,
  '', ' leading and trailing ', 'x', ''::bytea,
  '9999-12-31', '24:00:00', '00:00:00-12:00',
  '2000-01-01 00:00:00', '1999-12-31 23:59:59.999999+00', '0 seconds',
  '00000000-0000-0000-0000-000000000000',
  'null', '[]', '{}', '{}', '{{NULL}}', '{}', '{NULL,"x "}',
  'sad', '{}', '::1', '-0.01', '(0,0)', B'0000', 'empty'),
 (3, NULL, NULL, NULL, NULL, NULL, '-Infinity', '-0', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
UPDATE all_types SET c_text = 'updated', c_float8 = 0.1 + 0.2 WHERE id = 2;
INSERT INTO all_types (id, c_text) VALUES (4, 'to be deleted');
DELETE FROM all_types WHERE id = 4;
"#,
        )
        .await
        .expect("insert typed rows");
    p.wait_in_sync(&[("all_types", "id")], CATCH_UP).await;
    let target = p.target.client("replica").await;
    assert_eq!(
        table_rows(&source, "all_types", "id").await,
        table_rows(&target, "all_types", "id").await
    );
    assert_eq!(table_rows(&target, "all_types", "id").await.len(), 3);
}

const WORKLOAD_SCHEMA: &str = r#"
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(14,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE transfers (id bigserial PRIMARY KEY, from_id bigint, to_id bigint, amount numeric(14,2), note text);
"#;

/// Runs `rounds` transactions against the source: each inserts 500 transfers, updates 200
/// accounts and deletes 50 transfers; the first round inserts the accounts. About 750
/// changes per round.
async fn workload(source: &tokio_postgres::Client, first_round: usize, rounds: usize) {
    if first_round == 0 {
        source
            .batch_execute(
                "INSERT INTO accounts SELECT g, 'owner ' || g, 0 FROM generate_series(1, 5000) g",
            )
            .await
            .expect("accounts");
    }
    for round in first_round..first_round + rounds {
        source
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO transfers (from_id, to_id, amount, note)
                   SELECT (g * 7) % 5000 + 1, (g * 13) % 5000 + 1, g % 1000 + 0.25, 'round {round}'
                   FROM generate_series(1, 500) g;
                 UPDATE accounts SET balance = balance + {round} % 17 + 1, updated_at = now()
                   WHERE id % 25 = {round} % 25;
                 DELETE FROM transfers WHERE id IN (SELECT id FROM transfers ORDER BY id DESC LIMIT 50 OFFSET 100);
                 COMMIT;"
            ))
            .await
            .expect("workload round");
    }
}

const WORKLOAD_TABLES: &[(&str, &str)] = &[("accounts", "id"), ("transfers", "id")];
const WORKLOAD_TOPICS: &[&str] = &["it.public.accounts", "it.public.transfers"];

#[tokio::test(flavor = "multi_thread")]
async fn a_50k_change_workload_ends_with_target_equal_to_source() {
    let p = PgPipeline::start(WORKLOAD_SCHEMA).await;
    // A pure stream test: exact counts below would race a concurrent snapshot.
    let config = p.write_config_without_snapshot("workload.yaml", "");
    let daemon = p.run_ready(&config, "workload.log").await;
    let source = p.source.client("app").await;
    // 5,000 account inserts + 64 rounds of 750 changes = 53,000 changes.
    workload(&source, 0, 64).await;
    p.wait_in_sync(WORKLOAD_TABLES, CATCH_UP).await;
    let (recorded, distinct, stored) = p.audit_applied(WORKLOAD_TOPICS).await;
    assert_eq!(recorded, distinct, "some message was applied twice");
    assert_eq!(recorded, stored, "every stored message applied once");
    assert!(
        recorded >= 53_000,
        "expected at least 53,000 changes, saw {recorded}"
    );

    // The metrics endpoint reports what was done.
    let metrics = reqwest_metrics(p.metrics_port).await;
    let applied: f64 = metric_sum(&metrics, "tidelink_sink_applied_rows_total");
    assert_eq!(
        applied as i64, recorded,
        "applied rows metric matches the audit"
    );
    assert!(metric_sum(&metrics, "tidelink_source_events_total") >= 53_000.0);
    // The one worker holds every partition of the workload's topics (4 each).
    assert_eq!(
        metric_sum(&metrics, "tidelink_sink_assigned_partitions") as usize,
        4 * WORKLOAD_TOPICS.len(),
        "assigned partitions"
    );

    // `tidelink status` agrees: nothing left to apply, no dead letters, the slot streaming.
    let out = std::process::Command::new(tidelink_integration_tests::tidelink_binary())
        .args(["status", "-c", &config.display().to_string(), "--json"])
        .output()
        .expect("tidelink status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let pipeline = &status["pipelines"][0];
    assert_eq!(pipeline["source"]["active"], true, "{status}");
    assert_eq!(pipeline["sinks"][0]["total_lag"], 0, "{status}");
    assert_eq!(pipeline["sinks"][0]["dead_letters"], 0, "{status}");
    let applied: i64 = pipeline["sinks"][0]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["next_offset"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(
        applied, recorded,
        "status offsets account for every applied message"
    );

    let status = daemon
        .terminate(Duration::from_secs(30))
        .expect("daemon exits after SIGTERM");
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
}

async fn reqwest_metrics(port: u16) -> String {
    http_get(port, "/metrics")
        .await
        .expect("metrics endpoint answers")
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_workload_then_restart_loses_nothing_and_applies_nothing_twice() {
    let p = PgPipeline::start(WORKLOAD_SCHEMA).await;
    let config = p.write_config("kill.yaml", "");
    let daemon = p.run_ready(&config, "kill-1.log").await;
    let source = p.source.client("app").await;
    workload(&source, 0, 20).await;
    // Let it get part way through, then kill it hard while the workload continues.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.kill9();
    workload(&source, 20, 20).await;
    let daemon = p.run_ready(&config, "kill-2.log").await;
    workload(&source, 40, 20).await;
    p.wait_in_sync(WORKLOAD_TABLES, CATCH_UP).await;
    let (recorded, distinct, stored) = p.audit_applied(WORKLOAD_TOPICS).await;
    assert_eq!(
        recorded, distinct,
        "some message was applied twice after the restart"
    );
    assert_eq!(
        recorded, stored,
        "every stored message applied exactly once"
    );
    drop(daemon);
}

/// Which member of the group the failover test kills.
#[derive(Clone, Copy, PartialEq)]
enum Victim {
    /// The first worker, which leads the group (assigns partitions).
    Leader,
    /// The second worker.
    Follower,
}

/// Source in one process, two sink workers in two more; after both hold partitions one
/// worker is killed with -9 and the survivor must take its partitions over.
async fn failover(p: PgPipeline, victim: Victim, kafka_properties: &str) {
    let config = p.write_config("workers.yaml", "");
    if !kafka_properties.is_empty() {
        p.set_kafka_properties(&config, kafka_properties);
    }
    let config_s = config.display().to_string();
    let log = |name: &str| p.work.path().join(name);
    let source_proc = Daemon::start(
        &["run", "-c", &config_s, "--role", "source"],
        &log("source.log"),
    );
    // Sink-only processes have no metrics of their own here: disable the endpoint for them.
    let sink_config = p.work.path().join("sink-only.yaml");
    std::fs::write(
        &sink_config,
        std::fs::read_to_string(&config).expect("config").replace(
            &format!("metrics:\n  listen: 127.0.0.1:{}\n", p.metrics_port),
            "metrics:\n  enabled: false\n",
        ),
    )
    .expect("write sink config");
    let sink_s = sink_config.display().to_string();
    p.wait_ready().await;
    // The first worker to join leads the group.
    let first = Daemon::start(
        &["run", "-c", &sink_s, "--role", "sink"],
        &log("worker-first.log"),
    );
    tidelink_integration_tests::wait_until(
        Duration::from_secs(60),
        "the first worker holds partitions",
        || async {
            first
                .output()
                .contains("partitions assigned partitions=[\"")
        },
    )
    .await;
    let second = Daemon::start(
        &["run", "-c", &sink_s, "--role", "sink"],
        &log("worker-second.log"),
    );
    let source = p.source.client("app").await;
    workload(&source, 0, 10).await;
    p.wait_in_sync(WORKLOAD_TABLES, CATCH_UP).await;
    tidelink_integration_tests::wait_until(
        Duration::from_secs(60),
        "the second worker holds partitions",
        || async {
            second
                .output()
                .contains("partitions assigned partitions=[\"")
        },
    )
    .await;
    let assigned = |d: &Daemon| d.output().matches("partitions assigned").count();
    let killed = Instant::now();
    let (survivor, assignments_before) = match victim {
        Victim::Leader => {
            let before = assigned(&second);
            first.kill9();
            (second, before)
        }
        Victim::Follower => {
            let before = assigned(&first);
            second.kill9();
            (first, before)
        }
    };
    // The survivor is given the dead worker's partitions once the session timeout (6 s)
    // has passed: the goal is 10 s; 15 s leaves room for a loaded machine. librdkafka's
    // mock coordinator (tansu runs) takes longer.
    let bound = if tidelink_integration_tests::BrokerSetup::from_env().is_kafka() {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(90)
    };
    tidelink_integration_tests::wait_until(
        bound,
        "the survivor takes the dead worker's partitions over",
        || async { assigned(&survivor) > assignments_before },
    )
    .await;
    eprintln!(
        "sink takeover: the survivor held the dead worker's partitions {:.1} s after kill -9",
        killed.elapsed().as_secs_f64()
    );
    workload(&source, 10, 20).await;
    p.wait_in_sync(WORKLOAD_TABLES, CATCH_UP).await;
    let (recorded, distinct, stored) = p.audit_applied(WORKLOAD_TOPICS).await;
    assert_eq!(
        recorded, distinct,
        "a message was applied twice across workers"
    );
    assert_eq!(recorded, stored);
    drop((survivor, source_proc));
}

/// The second worker to join is killed: the survivor takes its partitions over.
#[tokio::test(flavor = "multi_thread")]
async fn two_sink_workers_split_partitions_and_the_survivor_takes_over() {
    failover(
        PgPipeline::start(WORKLOAD_SCHEMA).await,
        Victim::Follower,
        "",
    )
    .await;
}

/// The group leader is killed: the survivor takes every partition over. On Apache Kafka
/// itself; on tansu (`TIDELINK_BROKER=tansu`), which cannot re-form a group whose leader
/// died (0.6.0 keeps the dead member as leader), against librdkafka's mock cluster, whose
/// group coordinator behaves like Kafka's.
#[tokio::test(flavor = "multi_thread")]
async fn when_the_group_leader_dies_the_other_worker_takes_over() {
    if tidelink_integration_tests::BrokerSetup::from_env().is_kafka() {
        failover(PgPipeline::start(WORKLOAD_SCHEMA).await, Victim::Leader, "").await;
        return;
    }
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    // The mock cluster does not serve CreateTopics; tidelink uses topics that exist.
    for topic in WORKLOAD_TOPICS.iter().chain(&["it.dlq.it.replica"]) {
        mock.create_topic(topic, 4, 1).expect("mock topic");
    }
    mock.create_topic("it.schemas", 1, 1).expect("mock topic");
    mock.create_topic("it.backfill", 1, 1).expect("mock topic");
    let mut p = PgPipeline::start(WORKLOAD_SCHEMA).await;
    p.bootstrap = mock.bootstrap_servers();
    // The mock coordinator waits up to the session timeout in each rebalance round. It
    // keeps at most 5 MiB per partition and drops older messages: lz4 keeps the workload
    // below that.
    failover(
        p,
        Victim::Leader,
        "{ session.timeout.ms: \"10000\", heartbeat.interval.ms: \"1000\", compression.type: lz4 }",
    )
    .await;
    drop(mock);
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toasted_values_keep_their_value_in_the_target() {
    let schema = "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
                  CREATE TABLE docs_full (id int PRIMARY KEY, title text, body text);
                  ALTER TABLE docs_full REPLICA IDENTITY FULL;";
    let p = PgPipeline::start(schema).await;
    let config = p.write_config("toast.yaml", "");
    let _daemon = p.run_ready(&config, "toast.log").await;
    let source = p.source.client("app").await;
    // ~130 kB of incompressible text is stored out of line (TOAST).
    let big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 4000))";
    for table in ["docs", "docs_full"] {
        source
            .batch_execute(&format!(
                "INSERT INTO {table} VALUES (1, 'first', {big}), (2, 'second', {big});
                 UPDATE {table} SET title = 'renamed' WHERE id = 1;
                 UPDATE {table} SET title = 'again' WHERE id = 1;"
            ))
            .await
            .expect("toast workload");
    }
    // A TOASTed value unchanged across separate transactions too.
    source
        .batch_execute("UPDATE docs SET title = 'third' WHERE id = 2")
        .await
        .expect("update");
    p.wait_in_sync(&[("docs", "id"), ("docs_full", "id")], CATCH_UP)
        .await;
    let target = p.target.client("replica").await;
    let lengths: Vec<i32> = first_column(&target, "SELECT length(body) FROM docs ORDER BY id")
        .await
        .expect("lengths");
    assert_eq!(lengths, vec![128_000, 128_000]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_with_wal_level_replica_fails_with_a_clear_error() {
    let source = PgCluster::start_with_wal_level("replica");
    let output = run_against_broken_source(&source, "CREATE TABLE t (id int PRIMARY KEY)").await;
    assert!(
        output.contains("wal_level is `replica`"),
        "error names the setting:\n{output}"
    );
    assert!(
        output.contains("wal_level=logical"),
        "error says what is needed:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_yaml_is_reported_with_file_line_and_key() {
    let work = tempfile::tempdir().expect("work");
    let path = work.path().join("bad.yaml");
    std::fs::write(
        &path,
        "pipelines:\n  - name: shop\n    source:\n      postgres:\n        dsn: postgres://x@h/db\n        tablez: [public.*]\n    kafka:\n      brokers: b:9092\n      topic_prefix: shop\n",
    )
    .expect("write");
    let file = path.display().to_string();
    for command in ["validate", "run"] {
        let mut daemon = Daemon::start(
            &[command, "-c", &file],
            &work.path().join(format!("{command}.log")),
        );
        let status = daemon.wait(Duration::from_secs(10)).expect("exits");
        assert_eq!(
            status.code(),
            Some(2),
            "{command}: invalid configuration exits 2"
        );
        let output = daemon.output();
        assert!(
            output.contains(&format!("{file}:6:9")),
            "{command}: file:line:col in\n{output}"
        );
        assert!(
            output.contains("pipelines[0].source.postgres.tablez"),
            "{command}: key path in\n{output}"
        );
        assert!(
            output.contains("unknown field `tablez`"),
            "{command}: what is wrong in\n{output}"
        );
    }
    // Syntax errors too.
    std::fs::write(&path, "pipelines:\n  - name: [unclosed\n").expect("write");
    let mut daemon = Daemon::start(&["validate", "-c", &file], &work.path().join("syntax.log"));
    assert_eq!(
        daemon.wait(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(2)
    );
    assert!(
        daemon.output().contains(&format!("{file}:")),
        "{}",
        daemon.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_advance_the_slot_while_the_watched_tables_are_idle() {
    let p = PgPipeline::start(
        "CREATE TABLE watched (id int PRIMARY KEY); CREATE SCHEMA other; CREATE TABLE other.noise (id int);",
    )
    .await;
    let config = p.write_config("heartbeat.yaml", "");
    let _daemon = p.run_ready(&config, "heartbeat.log").await;
    let source = p.source.client("app").await;
    // WAL grows through a table the pipeline does not watch.
    source
        .batch_execute("INSERT INTO other.noise SELECT generate_series(1, 20000)")
        .await
        .expect("noise");
    let goal: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    tidelink_integration_tests::wait_until(Duration::from_secs(60), "the slot confirms past the noise", || async {
        source
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'tidelink_it'",
                &[&goal],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_primary_key_is_refused_by_name() {
    let source = PgCluster::start();
    let output = run_against_broken_source(
        &source,
        "CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE loose (a int, b text);
         CREATE TABLE full_row (a int); ALTER TABLE full_row REPLICA IDENTITY FULL;",
    )
    .await;
    assert!(
        output.contains("table public.loose has no primary key"),
        "names the table:\n{output}"
    );
    assert!(
        !output.contains("table public.full_row has no primary key: "),
        "FULL identity is only a warning:\n{output}"
    );
    assert!(
        output.contains("REPLICA IDENTITY FULL"),
        "says how to fix it:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_workload_exits_cleanly_and_a_restart_applies_everything_once() {
    let p = PgPipeline::start(WORKLOAD_SCHEMA).await;
    let config = p.write_config("sigterm.yaml", "");
    let daemon = p.run_ready(&config, "sigterm-1.log").await;
    let source = p.source.client("app").await;
    let writer = {
        let source = p.source.client("app").await;
        tokio::spawn(async move { workload(&source, 0, 40).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = std::time::Instant::now();
    let status = daemon
        .terminate(Duration::from_secs(40))
        .expect("tidelink exits after SIGTERM");
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(35),
        "stopped within the shutdown timeout"
    );
    writer.await.expect("workload");
    let _daemon = p.run_ready(&config, "sigterm-2.log").await;
    workload(&source, 40, 5).await;
    p.wait_in_sync(WORKLOAD_TABLES, CATCH_UP).await;
    let (recorded, distinct, stored) = p.audit_applied(WORKLOAD_TOPICS).await;
    assert_eq!(
        recorded, distinct,
        "a message was applied twice across the restart"
    );
    assert_eq!(recorded, stored);
}

/// Two pipelines in one process: one source has wal_level=replica. That pipeline reports
/// and retries; the other keeps streaming; the process stays up.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_pipeline_does_not_stop_the_others() {
    let p = PgPipeline::start("CREATE TABLE items (id int PRIMARY KEY, name text)").await;
    let broken = PgCluster::start_with_wal_level("replica");
    broken.create_database("app").await;
    broken
        .client("app")
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .expect("schema");
    let config = p.write_config("two.yaml", "");
    let mut yaml = std::fs::read_to_string(&config).expect("config");
    yaml.push_str(&format!(
        "  - name: broken\n    source:\n      postgres:\n        dsn: {}\n        tables: [public.*]\n    kafka:\n      brokers: {}\n      topic_prefix: broken\n",
        broken.dsn("app"),
        p.bootstrap
    ));
    std::fs::write(&config, yaml).expect("write");
    let mut daemon = p.run(&config, &[], "two.log");
    let source = p.source.client("app").await;
    p.wait_source_streaming().await;
    source
        .batch_execute("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 500) g")
        .await
        .expect("insert");
    p.wait_in_sync(&[("items", "id")], CATCH_UP).await;
    assert!(
        daemon.wait(Duration::from_millis(200)).is_none(),
        "the process keeps running"
    );
    let output = daemon.output();
    assert!(
        output.contains("wal_level is `replica`"),
        "the broken pipeline reports:\n{output}"
    );
    assert!(
        output.contains("the other pipelines keep running"),
        "and is retried:\n{output}"
    );
}

/// Creates `schema_sql` in database `app` of `source`, runs `tidelink run` against it (no
/// broker needed: preflight fails first), asserts it exits non-zero on its own and returns
/// what it printed.
async fn run_against_broken_source(source: &PgCluster, schema_sql: &str) -> String {
    source.create_database("app").await;
    source
        .client("app")
        .await
        .batch_execute(schema_sql)
        .await
        .expect("schema");
    let work = tempfile::tempdir().expect("work");
    let config = work.path().join("broken.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  enabled: false\npipelines:\n  - name: broken\n    source:\n      postgres:\n        dsn: {}\n        tables: [public.*]\n    kafka:\n      brokers: 127.0.0.1:1\n      topic_prefix: broken\n",
            source.dsn("app")
        ),
    )
    .expect("config");
    let config = config.display().to_string();
    let mut daemon = Daemon::start(&["run", "-c", &config], &work.path().join("out.log"));
    let status = daemon
        .wait(Duration::from_secs(30))
        .expect("tidelink exits on its own");
    assert!(!status.success(), "exit code must be non-zero");
    daemon.output()
}

/// Passwords in connection strings never reach a log line or a command's output, even at
/// debug level and on error paths that print the connection string.
#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_reach_the_logs() {
    const SECRET: &str = "Sup3rSecretPw";
    let p = PgPipeline::start("CREATE TABLE items (id int PRIMARY KEY)").await;
    let config = p.write_config("secret.yaml", "");
    let mut yaml = std::fs::read_to_string(&config).expect("config").replace(
        "postgres://postgres@",
        &format!("postgres://postgres:{SECRET}@"),
    );
    // A second pipeline whose source refuses connections: its errors print the DSN.
    yaml.push_str(&format!(
        "  - name: unreachable\n    snapshot: never\n    source:\n      postgres:\n        dsn: postgres://postgres:{SECRET}@127.0.0.1:1/app\n        tables: [public.*]\n    kafka:\n      brokers: {}\n      topic_prefix: unreachable\n",
        p.bootstrap
    ));
    std::fs::write(&config, yaml).expect("write");
    let config_s = config.display().to_string();
    let daemon = Daemon::start_with_env(
        &["run", "-c", &config_s],
        &p.work.path().join("secret.log"),
        &[("TIDELINK_LOG", "debug,librdkafka=info,tokio_postgres=debug")],
    );
    p.wait_source_streaming().await;
    let source = p.source.client("app").await;
    source
        .batch_execute("INSERT INTO items SELECT generate_series(1, 100)")
        .await
        .expect("insert");
    p.wait_in_sync(&[("items", "id")], CATCH_UP).await;
    tidelink_integration_tests::wait_until(
        Duration::from_secs(30),
        "the unreachable source is retried",
        || async { daemon.output().contains("postgres:****@127.0.0.1:1") },
    )
    .await;
    let mut outputs = vec![daemon.output()];
    for args in [
        vec!["status", "-c", &config_s],
        vec!["status", "-c", &config_s, "--json"],
        vec!["validate", "-c", &config_s],
    ] {
        let out = std::process::Command::new(tidelink_integration_tests::tidelink_binary())
            .args(&args)
            .output()
            .expect("run tidelink");
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
        outputs.push(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    drop(daemon);
    for output in &outputs {
        assert!(!output.contains(SECRET), "a password leaked:\n{output}");
    }
    assert!(
        outputs.iter().any(|o| o.contains("unreachable")),
        "status reports the broken pipeline"
    );
}
