//! Chaos: a PostgreSQL → Kafka → PostgreSQL pipeline, its source and sink in separate
//! processes, under a continuous workload of inserts, updates and deletes, while faults
//! strike at random: kill -9 of the source process, kill -9 of the sink worker, kill -9 of
//! the Kafka node leading a partition (a 3-node cluster, replication factor 3,
//! `min.insync.replicas=2`), a restart of the whole cluster, a crash and restart of the
//! target database and of the source database. Afterwards the pipeline catches up and
//! - `tidelink verify` finds no differing row;
//! - the sink's history holds exactly one applied change per change the source committed
//!   (counted by a trigger in the source), and no Kafka message applied twice.
//!
//! `make test` runs one round of each fault. `make chaos` runs more rounds
//! (`CHAOS_ROUNDS`, default 30) and writes the report to docs/reliability.md
//! (`CHAOS_REPORT`). `CHAOS_SEED` replays a run's fault sequence.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidelink_core::fuzz::Mutator;
use tidelink_integration_tests::{
    http_get, replays_skipped_in, Broker, BrokerSetup, Daemon, PgPipeline,
};

const SOURCE_SCHEMA: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, qty int NOT NULL, note text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE SCHEMA audit;
CREATE TABLE audit.changes (n bigserial PRIMARY KEY, op text NOT NULL);
CREATE FUNCTION audit.count_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit.changes (op) VALUES (TG_OP); RETURN NULL; END $$;
CREATE TRIGGER count_changes AFTER INSERT OR UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION audit.count_change();
";

const TARGET_SCHEMA: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, qty int NOT NULL, note text, updated_at timestamptz NOT NULL DEFAULT now());
";

/// The fixed part of the report: how to read it, and what the run does not cover.
const NOTES: &str = "## How to read it

- *Published again*: after a kill -9 of the source process or a crash of the source
  database, the source resumes from the last position it stored after Kafka acknowledged
  the events, so it publishes the changes after that position a second time (delivery is
  at least once; nothing is lost). Each event carries its place in the source log
  (`source.lsn` + `source.seq`); the sink worker skips an event whose place is not past the
  highest one it recorded for the partition, in the same transaction as its offsets. Hence
  *changes applied* equals *row changes committed*: each change applied exactly once.
- *Kafka messages applied twice*: history rows with the same topic, partition and offset.
  Offsets are recorded in the target in the same transaction as the rows, so it is 0.
- Killing the sink worker and starting it again costs about the session timeout (6 s):
  the coordinator waits that long for the dead member before it re-forms the group. With
  two workers the survivor takes the dead one's partitions over in the same time
  (tests/pg_to_pg.rs). tansu 0.6 (`TIDELINK_BROKER=tansu`) does not re-form a group whose
  leader died; a worker that holds no partition while a partition's messages wait
  unapplied for 30 s rejoins the group, which recovers it.
- Backpressure is tested separately (integration-tests/tests/backpressure.rs): with the
  target down while 100k changes (about 100 MB) arrive, the sink worker pauses fetching
  after 10 s behind and stays under 70 MiB, its consumer lag metric shows the backlog, and
  it keeps its partitions (`make test` keeps the target down 45 s; a run by hand with
  `BACKPRESSURE_DOWN_SECS=400` stayed at 58 MiB with its partitions kept); with the broker
  down, `tidelink_source_retained_wal_bytes` and `status` show the WAL the slot retains.
- Killing the node that leads a partition moves leadership to another in-sync replica;
  with two of three replicas left, `acks=all` writes go on (`min.insync.replicas=2`). The
  idempotent producer resends what the dead leader had not acknowledged, without
  duplicating what it had; the consumer group's coordinator may move too.
- Not covered: network partitions (no packet loss or delay is injected), a full disk,
  losing two Kafka nodes at once, MySQL-family sources under chaos (their kill -9 and
  restart is tested in tests/mysql.rs).

## Bad input

- Decoders never panic: seeded mutation runs (truncations, bit flips, insertions, splices of
  valid inputs, and random bytes; `tidelink_core::fuzz::Mutator`) of 30,000 inputs each run
  in `make test` for the pgoutput decoder (crates/postgres/src/source/pgoutput.rs), the
  PostgreSQL value parser (types.rs), the binlog value conversion and the MariaDB GTID
  event, GTID state and file-name parsers (crates/mysql/src/values.rs, source/position.rs),
  the envelope codec (crates/kafka/src/envelope.rs) and the configuration parser
  (crates/config/src/tests.rs). The same seed gives the same inputs, so a failure
  reproduces exactly.
- A message that cannot be decoded, or that the target rejects, goes to the dead-letter
  topic with the reason and its origin (tests/dead_letters.rs); the pipeline goes on.
- Wrong credentials, unreachable hosts, missing privileges and server settings give one
  error line naming the server (tests/pg_to_pg.rs, mysql.rs, tls.rs, kafka_security.rs);
  what can recover (a server restarting, a broker away) is retried, what cannot (a
  certificate that does not verify, a missing privilege) stops the pipeline.
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillSource,
    KillSink,
    KillPartitionLeader,
    RestartBroker,
    CrashTarget,
    CrashSource,
}

/// Every fault; killing a partition's leader needs a cluster (Apache Kafka).
fn faults(cluster: bool) -> Vec<Fault> {
    let mut faults = vec![
        Fault::KillSource,
        Fault::KillSink,
        Fault::RestartBroker,
        Fault::CrashTarget,
        Fault::CrashSource,
    ];
    if cluster {
        faults.insert(2, Fault::KillPartitionLeader);
    }
    faults
}

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::KillSource => "kill -9 the source process",
            Fault::KillSink => "kill -9 the sink worker",
            Fault::KillPartitionLeader => {
                "kill -9 the Kafka node leading a partition, start it again"
            }
            Fault::RestartBroker => "kill -9 and restart every broker",
            Fault::CrashTarget => "crash and restart the target database",
            Fault::CrashSource => "crash and restart the source database",
        }
    }
}

/// The two tidelink processes of the pipeline.
struct Processes {
    source_config: String,
    sink_config: String,
    source: Option<Daemon>,
    sink: Option<Daemon>,
}

impl Processes {
    fn start_source(&mut self, p: &PgPipeline) {
        self.source = Some(p.run(
            Path::new(&self.source_config),
            &["--role", "source"],
            "source.log",
        ));
    }

    fn start_sink(&mut self, p: &PgPipeline) {
        self.sink = Some(p.run(
            Path::new(&self.sink_config),
            &["--role", "sink"],
            "sink.log",
        ));
    }
}

/// Inserts, updates and deletes in small transactions until `stop`; returns the number of
/// transactions committed. Connection errors (the source database crashing) are waited
/// out; the trigger counts what really committed.
async fn workload(dsn: String, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut random = Mutator::new(seed);
    let mut next_id: i64 = 1;
    let mut committed = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok((client, connection)) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = connection.await;
        });
        while !stop.load(Ordering::Relaxed) {
            let first = next_id;
            let inserts = 10 + random.below(20) as i64;
            let update_from = 1 + random.below(first as usize) as i64;
            let delete_from = 1 + random.below(first as usize) as i64;
            let sql = format!(
                "BEGIN;
                 INSERT INTO orders (id, qty, note) SELECT g, g % 100, 'new ' || g FROM generate_series({first}, {last}) g;
                 UPDATE orders SET qty = qty + 1, note = 'updated in tx {first}', updated_at = now()
                   WHERE id BETWEEN {update_from} AND {update_to};
                 DELETE FROM orders WHERE id BETWEEN {delete_from} AND {delete_to};
                 COMMIT;",
                last = first + inserts - 1,
                update_to = update_from + random.below(40) as i64,
                delete_to = delete_from + random.below(4) as i64,
            );
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    next_id += inserts;
                    committed += 1;
                }
                Err(_) => {
                    // The ids may or may not be used now: skip past them either way.
                    next_id += inserts;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10 + random.below(30) as u64)).await;
        }
    }
    committed
}

async fn wait_ready(port: u16, what: &str, p: &PgPipeline) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !http_get(port, "/readyz")
        .await
        .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        assert!(
            Instant::now() < deadline,
            "{what} did not become ready:\n{}",
            p.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn count(p: &PgPipeline, database_is_source: bool, sql: &str) -> i64 {
    let client = if database_is_source {
        p.source.client("app").await
    } else {
        p.target.client("replica").await
    };
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Waits until the sink applies changes again (its history grows twice: past what was in
/// flight during the fault); fails the test with the logs after `timeout`.
async fn wait_for_progress(p: &PgPipeline, timeout: Duration) -> Duration {
    let started = Instant::now();
    let history = "SELECT count(*) FROM tidelink.history";
    let mut last = None;
    let mut grew = 0;
    while grew < 2 {
        assert!(
            started.elapsed() < timeout,
            "the pipeline did not recover within {timeout:?}\n{}",
            p.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let dsn = p.target.dsn("replica");
        let connect = tokio_postgres::connect(&dsn, tokio_postgres::NoTls);
        let Ok(Ok((client, connection))) =
            tokio::time::timeout(Duration::from_secs(5), connect).await
        else {
            continue;
        };
        tokio::spawn(connection);
        let Ok(row) = client.query_one(history, &[]).await else {
            continue;
        };
        let n: i64 = row.get(0);
        if last.is_some_and(|l| n > l) {
            grew += 1;
        }
        if last.is_none_or(|l| n > l) {
            last = Some(n);
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_lose_nothing_and_apply_each_change_once() {
    // Three Kafka nodes, each topic on all three, two in sync required; tansu runs alone.
    let cluster = BrokerSetup::from_env().is_kafka();
    let faults = faults(cluster);
    let rounds: usize = std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(faults.len());
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
    eprintln!("chaos: {rounds} rounds, CHAOS_SEED={seed}");
    let started = Instant::now();
    let broker = if cluster {
        Broker::start_cluster(3)
    } else {
        Broker::start()
    };
    let mut p = PgPipeline::start_on(broker, SOURCE_SCHEMA, TARGET_SCHEMA).await;
    let source_config = p.write_config_without_snapshot("source.yaml", "");
    let (sink_config, sink_port) = p.copy_with_own_metrics_port(&source_config, "sink.yaml");
    let mut processes = Processes {
        source_config: source_config.display().to_string(),
        sink_config: sink_config.display().to_string(),
        source: None,
        sink: None,
    };
    processes.start_source(&p);
    processes.start_sink(&p);
    wait_ready(p.metrics_port, "the source process", &p).await;
    wait_ready(sink_port, "the sink process", &p).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload(p.source.dsn("app"), stop.clone(), seed ^ 0x5eed));

    let mut random = Mutator::new(seed);
    // Every kind once (in a random order), then at random.
    let mut schedule: Vec<Fault> = faults.clone();
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, random.below(i + 1));
    }
    while schedule.len() < rounds {
        schedule.push(faults[random.below(faults.len())]);
    }
    schedule.truncate(rounds);
    let mut log = String::new();
    for (round, fault) in schedule.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(2000 + random.below(4000) as u64)).await;
        let down = Duration::from_millis(500 + random.below(5000) as u64);
        eprintln!(
            "chaos round {}: {} (down {down:?})",
            round + 1,
            fault.describe()
        );
        match fault {
            Fault::KillSource => {
                processes.source.take().expect("source runs").kill9();
                tokio::time::sleep(down).await;
                processes.start_source(&p);
            }
            Fault::KillSink => {
                processes.sink.take().expect("sink runs").kill9();
                tokio::time::sleep(down).await;
                processes.start_sink(&p);
            }
            Fault::KillPartitionLeader => {
                let partition = random.below(4) as i32;
                let node = p.broker.node_leading("it.public.orders", partition);
                eprintln!("  node {} leads it.public.orders[{partition}]", node + 1);
                p.broker.kill_node(node);
                tokio::time::sleep(down).await;
                p.broker.start_node_again(node);
            }
            Fault::RestartBroker => {
                p.broker.restart();
            }
            Fault::CrashTarget => {
                p.target.crash();
                tokio::time::sleep(down).await;
                p.target.restart();
            }
            Fault::CrashSource => {
                p.source.crash();
                tokio::time::sleep(down).await;
                p.source.restart();
            }
        }
        // The next fault strikes a recovered pipeline: new changes reach the target.
        let recovered = wait_for_progress(&p, Duration::from_secs(180)).await;
        let _ = writeln!(
            log,
            "| {} | {} | {:.1} s | {:.1} s |",
            round + 1,
            fault.describe(),
            down.as_secs_f64(),
            recovered.as_secs_f64()
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let transactions = load.await.expect("workload");
    let changes = count(&p, true, "SELECT count(*) FROM audit.changes").await;
    assert!(changes > 0, "the workload committed nothing");

    p.wait_in_sync(&[("orders", "id")], Duration::from_secs(300))
        .await;
    // Equal data first; then every change's history row (the last batches may still be
    // on their way when the final states already match).
    let deadline = Instant::now() + Duration::from_secs(120);
    let history_sql = "SELECT count(*) FROM tidelink.history WHERE target_table = 'public.orders'";
    let mut applied = count(&p, false, history_sql).await;
    while applied < changes && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        applied = count(&p, false, history_sql).await;
    }
    let (recorded, distinct) = p.history_audit().await;
    let stored = p.messages_in_topics(&["it.public.orders"]);

    let mut verify = Daemon::start(
        &["verify", "-c", &processes.sink_config, "--pipeline", "it"],
        &p.work.path().join("verify.log"),
    );
    let verified = verify.wait(Duration::from_secs(120)).expect("verify ends");
    let verify_output = verify.output();
    let sink_log = std::fs::read_to_string(p.work.path().join("sink.log")).unwrap_or_default();
    let skipped = replays_skipped_in(&sink_log);
    let rows = count(&p, true, "SELECT count(*) FROM orders").await;

    let report = format!(
        "# Reliability: chaos run\n\n\
         Written by `make chaos` (integration-tests/tests/chaos.rs) on {date}. A PostgreSQL → \
         Kafka ({broker}) → PostgreSQL pipeline with its source and its sink worker \
         in separate `tidelink run --role …` processes, under a continuous workload of small \
         transactions (10–29 inserts, 0–40 updates, 0–4 deletes each), while one fault strikes \
         every 2–6 s. Replay the same fault sequence with `CHAOS_SEED={seed}`.\n\n\
         | | |\n|---|---|\n\
         | rounds | {rounds} |\n\
         | faults | {faults} |\n\
         | transactions committed | {transactions} |\n\
         | row changes committed (source trigger) | {changes} |\n\
         | messages in the Kafka topic | {stored} (the source published {republished} again after restarts) |\n\
         | changes skipped by the sink as already applied | {skipped} |\n\
         | changes applied (sink history) | {applied} |\n\
         | Kafka messages applied twice | {twice} |\n\
         | rows at the end | {rows} |\n\
         | `tidelink verify` | {verdict} |\n\
         | wall time | {minutes:.1} min |\n\n\
         ## Rounds\n\n\
         *down for*: how long the process or server stayed down; *applying again after*: from \
         its restart until the sink applied changes committed after it.\n\n\
         | round | fault | down for | applying again after |\n|---|---|---|---|\n{log}\n\
         ## `tidelink verify`\n\n```\n{verify}```\n\n{NOTES}",
        date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        faults = faults
            .iter()
            .map(|f| format!(
                "{}: {}",
                f.describe(),
                schedule.iter().filter(|s| *s == f).count()
            ))
            .collect::<Vec<_>>()
            .join("; "),
        republished = stored - changes,
        twice = recorded - distinct,
        verdict = if verified.code() == Some(0) {
            "equal: 0 differing rows"
        } else {
            "DIFFERENCES FOUND"
        },
        minutes = started.elapsed().as_secs_f64() / 60.0,
        verify = verify_output,
        broker = {
            let setup = BrokerSetup::from_env();
            if cluster {
                format!(
                    "{}, 3 nodes, replication factor 3, min.insync.replicas=2",
                    setup.version()
                )
            } else {
                format!("{}, {}", setup.version(), setup.storage())
            }
        },
    );
    eprintln!("{report}");
    if let Ok(path) = std::env::var("CHAOS_REPORT") {
        std::fs::write(&path, &report).expect("write the chaos report");
    }
    assert_eq!(verified.code(), Some(0), "verify: {verify_output}");
    assert_eq!(
        applied,
        changes,
        "each committed change must be applied exactly once\n{}",
        p.logs_tail()
    );
    assert_eq!(recorded, distinct, "a Kafka message was applied twice");
}
