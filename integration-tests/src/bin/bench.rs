//! `make bench` / `make bench-quick`: measures tidelink against its ceilings and against
//! native replication, all in one run on throwaway local servers, prints a table and writes
//! docs/benchmarks.md. A benchmark, not a test: nothing here asserts a timing.
//!
//! Usage: `bench [--rows N] [--out FILE] [--only e2e|debezium|direct|mariadb-direct|big-transaction|idle|mariadb|broker|apply|second-broker]` (N inserts,
//! N updates, N/25 deletes; the big transaction inserts 2N rows at once). For tuning,
//! environment variables change the pipelines (BENCH_KAFKA_PROPERTIES, BENCH_BATCH_WAIT_MS,
//! BENCH_SPLIT_ROLES, and TIDELINK_BROKER_STORAGE and TIDELINK_BROKER_BIN for the broker),
//! add the runs on nisshi (TIDELINK_NISSHI_BIN) or record what they do (BENCH_TIMELINE).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidelink_integration_tests::mariadb::MariaDb;
use tidelink_integration_tests::{
    copy_config_with_metrics_port, free_port, http_get, metric_sum, Broker, BrokerEngine,
    BrokerSetup, Daemon, PgCluster, PG_BIN,
};
use tokio_postgres::Client;

/// A broker storage that is not durable but fast: the end-to-end run repeated on it shows
/// what bounds tidelink when the broker does not.
const UNBOUND_BROKER: &str = "memory://tansu/";

const TABLE: &str = "CREATE TABLE bench (id bigint PRIMARY KEY, account text NOT NULL, amount numeric(12,2) NOT NULL, \
                     status text NOT NULL, updated timestamptz NOT NULL)";

/// The line of a report below which `bench` keeps what an earlier report had when it
/// writes a new one (scripts/bench-chart.py draws only what is above it).
const KEPT_MARKER: &str =
    "<!-- Everything below this line is kept when `bench` rewrites this report. -->";

struct Results {
    lines: Vec<(String, String, String)>,
}

impl Results {
    fn add(&mut self, what: &str, value: String, note: &str) {
        println!("  {what:<58} {value:>16}  {note}");
        self.lines.push((what.to_string(), value, note.to_string()));
    }

    /// A line for `rows` moved in `seconds`: the rate, and the time as its note.
    fn timed(&mut self, what: &str, rows: u64, seconds: f64) {
        self.add(what, rate(rows, seconds), &format!("{seconds:.1} s"));
    }

    /// A line for a ratio of two measurements, such as tidelink's time against a baseline's.
    fn ratio(&mut self, what: &str, ratio: f64) {
        self.add(what, format!("{ratio:.2}×"), "");
    }
}

fn rate(changes: u64, seconds: f64) -> String {
    format!("{:.0}/s", changes as f64 / seconds.max(1e-9))
}

/// The workload: `rows` inserts in 1000-row transactions, `rows` updates, `rows/25`
/// deletes. Returns the number of changes.
async fn pg_workload(client: &Client, rows: u64) -> u64 {
    let mut start = 1;
    while start <= rows {
        let end = (start + 999).min(rows);
        client
            .batch_execute(&format!(
                "INSERT INTO bench SELECT g, 'account ' || (g % 5000), (g % 100000) / 100.0, 'new', now() FROM generate_series({start}, {end}) g"
            ))
            .await
            .expect("insert");
        start = end + 1;
    }
    let mut start = 1;
    while start <= rows {
        let end = (start + 999).min(rows);
        client
            .batch_execute(&format!(
                "UPDATE bench SET amount = amount + 1, status = 'paid', updated = now() WHERE id BETWEEN {start} AND {end}"
            ))
            .await
            .expect("update");
        start = end + 1;
    }
    // Every 25th row, 1,000 per transaction.
    let deletes = rows / 25;
    let mut start = 1;
    while start <= deletes {
        let end = (start + 999).min(deletes);
        client
            .batch_execute(&format!(
                "DELETE FROM bench WHERE id BETWEEN {} AND {} AND id % 25 = 0",
                start * 25,
                end * 25
            ))
            .await
            .expect("delete");
        start = end + 1;
    }
    // The rates below divide by this count: check that it is what the workload did.
    let left: i64 = client
        .query_one("SELECT count(*) FROM bench", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left as u64, rows - deletes, "the workload's row count");
    workload_changes(rows)
}

/// The number of changes [`pg_workload`] makes.
fn workload_changes(rows: u64) -> u64 {
    rows * 2 + rows / 25
}

async fn digest(client: &Client) -> (i64, String) {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum(amount), 0)::text FROM bench",
            &[],
        )
        .await
        .expect("digest");
    (row.get(0), row.get(1))
}

/// The source's highest row, `(id, amount as text)`: the probe the waits look up first.
async fn probe_row(client: &Client) -> Option<(i64, String)> {
    client
        .query_opt(
            "SELECT id, amount::text FROM bench ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .expect("probe row")
        .map(|row| (row.get(0), row.get(1)))
}

/// Waits until the target's digest equals the source's (see [`poll_probe_then_digest`]).
async fn wait_equal(source: &Client, target: &Client, timeout: Duration) -> bool {
    let expected = digest(source).await;
    let probe = probe_row(source).await;
    poll_probe_then_digest(
        &mut (),
        Instant::now() + timeout,
        probe,
        async |_, id| {
            target
                .query_opt("SELECT amount::text FROM bench WHERE id = $1", &[&id])
                .await
                .ok()
                .flatten()
                .map(|row| row.get(0))
        },
        async |_| digest(target).await == expected,
    )
    .await
}

/// Polls a target every 100 ms until `deadline` for its digest to be the source's, true
/// once it is. A digest scans the whole table (50–100 ms at a million rows): polled every
/// 100 ms from the start it took a third of a core from the pipeline being measured. So
/// the target is first polled by one index lookup, `amount_of`, until it holds the
/// source's highest row `probe`, `(id, amount as text)`, as the source has it now; only
/// then is `digest_matches` polled.
async fn poll_probe_then_digest<T>(
    target: &mut T,
    deadline: Instant,
    probe: Option<(i64, String)>,
    mut amount_of: impl AsyncFnMut(&mut T, i64) -> Option<String>,
    mut digest_matches: impl AsyncFnMut(&mut T) -> bool,
) -> bool {
    if let Some((id, amount)) = probe {
        while Instant::now() < deadline {
            if amount_of(target, id).await.as_deref() == Some(amount.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    while Instant::now() < deadline {
        if digest_matches(target).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

async fn two_clusters() -> (PgCluster, PgCluster, Client, Client) {
    let source = PgCluster::start();
    let target = PgCluster::start();
    source.create_database("app").await;
    target.create_database("replica").await;
    let s = source.client("app").await;
    let t = target.client("replica").await;
    s.batch_execute(TABLE).await.expect("source table");
    t.batch_execute(TABLE).await.expect("target table");
    (source, target, s, t)
}

/// The librdkafka properties of the benchmark's pipelines and broker ceilings' clients:
/// the broker's own (`client_properties`), then, for tuning,
/// BENCH_KAFKA_PROPERTIES="linger.ms=50,batch.size=1000000".
fn tuning_properties(broker: &BrokerSetup) -> Vec<(String, String)> {
    let mut properties = broker.client_properties.clone();
    properties.extend(tuning_env_properties());
    properties
}

fn tuning_env_properties() -> Vec<(String, String)> {
    match std::env::var("BENCH_KAFKA_PROPERTIES") {
        Ok(list) if !list.is_empty() => list
            .split(',')
            .map(|pair| {
                let (k, v) = pair
                    .split_once('=')
                    .expect("BENCH_KAFKA_PROPERTIES: key=value,…");
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// [`tuning_properties`] as the `properties` block of a pipeline's `kafka`.
fn tuning_kafka_properties(broker: &BrokerSetup) -> String {
    let properties = tuning_properties(broker);
    if properties.is_empty() {
        return String::new();
    }
    let mut block = String::from("      properties:\n");
    for (k, v) in properties {
        block.push_str(&format!("        {k}: \"{v}\"\n"));
    }
    block
}

/// For tuning: BENCH_BATCH_WAIT_MS sets the sinks' batch_wait_ms (a line of a sink block).
fn tuning_batch_wait() -> String {
    match std::env::var("BENCH_BATCH_WAIT_MS") {
        Ok(ms) if !ms.is_empty() => format!("        batch_wait_ms: {ms}\n"),
        _ => String::new(),
    }
}

fn write_config(
    dir: &std::path::Path,
    metrics: u16,
    source: &str,
    broker: &BrokerSetup,
    brokers: &str,
    target: &str,
) -> PathBuf {
    write_config_with_prefix(dir, metrics, source, broker, brokers, target, "bench")
}

/// [`write_config`] with topics `<prefix>.<schema>.<table>`.
fn write_config_with_prefix(
    dir: &std::path::Path,
    metrics: u16,
    source: &str,
    broker: &BrokerSetup,
    brokers: &str,
    target: &str,
    prefix: &str,
) -> PathBuf {
    let properties = tuning_kafka_properties(broker);
    let batch_wait = tuning_batch_wait();
    let yaml = format!(
        "metrics:\n  listen: 127.0.0.1:{metrics}\npipelines:\n  - name: bench\n    snapshot: never\n    source:\n      postgres:\n        dsn: {source}\n        tables: [public.*]\n    kafka:\n      brokers: {brokers}\n      topic_prefix: {prefix}\n      partitions: 4\n{properties}    sinks:\n      - name: target\n        batch_size: 5000\n{batch_wait}        postgres:\n          dsn: {target}\n"
    );
    let path = dir.join("bench.yaml");
    std::fs::write(&path, yaml).expect("config");
    path
}

async fn wait_ready(port: u16) {
    for _ in 0..600 {
        if http_get(port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("tidelink did not become ready");
}

/// Waits until the daemon's sink worker has partitions: a new consumer group's first join
/// can take seconds (3 s on nisshi and Kafka), which native replication, set up before its
/// workload starts, does not pay either.
async fn wait_assigned(port: u16) {
    for _ in 0..600 {
        let metrics = http_get(port, "/metrics").await.unwrap_or_default();
        if metric_sum(&metrics, "tidelink_sink_assigned_partitions") > 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the sink worker got no partitions within a minute");
}

struct EndToEnd {
    seconds: f64,
    /// From the first commit until Kafka held every change (the source's part).
    source_seconds: Option<f64>,
    changes: u64,
    cpu: f64,
    rss: f64,
    p50_ms: f64,
    p99_ms: f64,
    latency_rate: u64,
}

const LATENCY_TABLE: &str =
    "CREATE TABLE latency (id bigint PRIMARY KEY, created timestamptz NOT NULL)";

/// The latency table on both sides; the target's copy stamps each row as it is applied.
async fn latency_tables(s: &Client, t: &Client) {
    s.batch_execute(LATENCY_TABLE).await.expect("latency table");
    t.batch_execute(&format!("{LATENCY_TABLE}; ALTER TABLE latency ADD COLUMN applied timestamptz DEFAULT clock_timestamp()"))
        .await
        .expect("latency target");
}

/// Commit-to-apply latency (p50, p99 in ms) and the rate it was taken at: single-row
/// transactions at half of `changes / seconds` (100 to 20,000 per second) for 15 s.
async fn commit_to_apply_latency(
    s: &Client,
    t: &Client,
    changes: u64,
    seconds: f64,
) -> (f64, f64, u64) {
    let latency_rate = ((changes as f64 / seconds) / 2.0).clamp(100.0, 20_000.0) as u64;
    let per_tick = (latency_rate / 100).max(1);
    let steady = Instant::now();
    let mut id = 0u64;
    while steady.elapsed() < Duration::from_secs(15) {
        let tick = Instant::now();
        let mut sql = String::new();
        for _ in 0..per_tick {
            id += 1;
            let _ = write!(sql, "INSERT INTO latency VALUES ({id}, clock_timestamp());");
        }
        s.batch_execute(&sql).await.expect("latency insert");
        if let Some(rest) = Duration::from_millis(10).checked_sub(tick.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    for _ in 0..600 {
        let n: i64 = t
            .query_one("SELECT count(*) FROM latency", &[])
            .await
            .expect("count")
            .get(0);
        if n as u64 >= id {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = t
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM applied - created)), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM applied - created)) FROM latency",
            &[],
        )
        .await
        .expect("latency");
    let (p50, p99): (f64, f64) = (row.get(0), row.get(1));
    latency_timeline(t).await;
    (p50 * 1000.0, p99 * 1000.0, per_tick * 100)
}

/// The file named by `BENCH_TIMELINE`, opened to append; `None` when it is not set.
fn timeline_file() -> Option<std::fs::File> {
    let path = std::env::var("BENCH_TIMELINE")
        .ok()
        .filter(|p| !p.is_empty())?;
    Some(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("BENCH_TIMELINE file"),
    )
}

/// With `BENCH_TIMELINE`, the latency run's p50, p99 and worst per 100 ms of insert time,
/// to tell a steady tail from spikes (and spikes' period).
async fn latency_timeline(t: &Client) {
    let Some(mut file) = timeline_file() else {
        return;
    };
    let rows = t
        .query(
            "WITH l AS (SELECT extract(epoch FROM created - min(created) OVER ()) AS at, \
                               extract(epoch FROM applied - created) * 1000 AS ms FROM latency) \
             SELECT floor(at * 10)::int, count(*), \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms)::float8 \
             FROM l GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("latency timeline");
    use std::io::Write as _;
    let _ = writeln!(
        file,
        "# latency: seconds rows p50_ms p99_ms max_ms (per 100 ms)"
    );
    for row in rows {
        let (tenth, n, p50, p99, max): (i32, i64, f64, f64, f64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let _ = writeln!(
            file,
            "latency {:.1} {n} {p50:.1} {p99:.1} {max:.1}",
            f64::from(tenth) / 10.0
        );
    }
}

/// Watches `topic` from `started` until its partitions hold `expected` messages, polling
/// the high watermarks every 50 ms; the seconds that took (`None` after an hour).
fn watch_topic_filled(
    brokers: String,
    topic: String,
    expected: u64,
    started: Instant,
) -> tokio::task::JoinHandle<Option<f64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("watermark client");
        let timeout = Duration::from_secs(5);
        while started.elapsed() < Duration::from_secs(3600) {
            let partitions = consumer
                .fetch_metadata(Some(&topic), timeout)
                .ok()
                .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
                .unwrap_or(0);
            let held: i64 = (0..partitions as i32)
                .filter_map(|p| consumer.fetch_watermarks(&topic, p, timeout).ok())
                .map(|(low, high)| high - low)
                .sum();
            if partitions > 0 && held as u64 >= expected {
                return Some(started.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
}

/// [`pg_workload`] on `s`, timed from its first commit until `t` equals `s` and until
/// `topic` holds every change.
struct TimedWorkload {
    changes: u64,
    seconds: f64,
    source_seconds: Option<f64>,
    /// Whether `t` came to equal `s` within an hour.
    caught_up: bool,
}

async fn timed_workload(
    s: &Client,
    t: &Client,
    rows: u64,
    brokers: String,
    topic: &str,
) -> TimedWorkload {
    let started = Instant::now();
    let filled = watch_topic_filled(brokers, topic.into(), workload_changes(rows), started);
    let changes = pg_workload(s, rows).await;
    let caught_up = wait_equal(s, t, Duration::from_secs(3600)).await;
    let seconds = started.elapsed().as_secs_f64();
    TimedWorkload {
        changes,
        seconds,
        source_seconds: filled.await.ok().flatten(),
        caught_up,
    }
}

/// PostgreSQL → tidelink → PostgreSQL, then commit-to-apply latency at half that rate.
async fn tidelink_pg(rows: u64, work: &std::path::Path, setup: &BrokerSetup) -> EndToEnd {
    let (source, target, s, t) = two_clusters().await;
    latency_tables(&s, &t).await;
    let broker = Broker::start_with(setup);
    let metrics = free_port();
    let config = write_config(
        work,
        metrics,
        &source.dsn("app"),
        setup,
        &broker.bootstrap(),
        &target.dsn("replica"),
    );
    // For tuning: BENCH_SPLIT_ROLES=1 runs the source and the sink in two processes and
    // prints each one's peak RSS.
    let split = std::env::var("BENCH_SPLIT_ROLES").is_ok_and(|v| v == "1");
    let config_text = config.display().to_string();
    let role = if split { "source" } else { "all" };
    let daemon = Daemon::start(
        &["run", "-c", &config_text, "--role", role],
        &work.join("tidelink.log"),
    );
    wait_ready(metrics).await;
    let sink_daemon = split.then(|| {
        let (sink_config, sink_metrics) =
            copy_config_with_metrics_port(&config, metrics, &work.join("bench-sink.yaml"));
        let daemon = Daemon::start(
            &[
                "run",
                "-c",
                &sink_config.display().to_string(),
                "--role",
                "sink",
            ],
            &work.join("tidelink-sink.log"),
        );
        (daemon, sink_metrics)
    });
    if let Some((_, port)) = &sink_daemon {
        wait_ready(*port).await;
    }
    wait_assigned(sink_daemon.as_ref().map_or(metrics, |(_, port)| *port)).await;
    let pids: Vec<u32> = std::iter::once(daemon.pid())
        .chain(sink_daemon.as_ref().map(|(d, _)| d.pid()))
        .collect();
    let cpu_before: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let timeline = sample_timeline(metrics, "pg");
    let timed = timed_workload(&s, &t, rows, broker.bootstrap(), "bench.public.bench").await;
    assert!(timed.caught_up, "tidelink did not catch up");
    let (changes, seconds, source_seconds) = (timed.changes, timed.seconds, timed.source_seconds);
    if let Some(timeline) = timeline {
        timeline.abort();
    }
    let cpu = pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>() - cpu_before;
    let rss = peak_rss_mib(daemon.pid());
    if let Some((sink, _)) = &sink_daemon {
        println!(
            "split roles: source process peak RSS {rss:.0} MiB, sink process {:.0} MiB",
            peak_rss_mib(sink.pid())
        );
    }
    let (p50_ms, p99_ms, latency_rate) = commit_to_apply_latency(&s, &t, changes, seconds).await;
    if let Some((sink, _)) = sink_daemon {
        let _ = sink.terminate(Duration::from_secs(30));
    }
    let _ = daemon.terminate(Duration::from_secs(30));
    EndToEnd {
        seconds,
        source_seconds,
        changes,
        cpu,
        rss,
        p50_ms,
        p99_ms,
        latency_rate,
    }
}

/// Debezium's run of the same workload: its PostgreSQL connector in Kafka Connect
/// standalone (JSON without schemas, decimals as text, no tombstones: the messages tidelink
/// writes) into topics of 4 partitions made beforehand, applied by tidelink's sink (no
/// Debezium sink is served here). CPU and RSS are the Connect JVM's; `sink_cpu` the sink's.
struct DebeziumRun {
    run: EndToEnd,
    sink_cpu: f64,
}

async fn debezium_pg(rows: u64, work: &std::path::Path, setup: &BrokerSetup) -> DebeziumRun {
    use tidelink_integration_tests::debezium::{DebeziumSource, JsonSchemas, KafkaConnect};
    let (source, target, s, t) = two_clusters().await;
    latency_tables(&s, &t).await;
    let broker = Broker::start_with(setup);
    let kafka = ceiling_kafka(setup, &broker, "dbz").await;
    let mut kafka_4 = kafka.clone();
    kafka_4.partitions = 4;
    tidelink_kafka::admin::ensure_topics(
        &kafka_4,
        &[
            "dbz.public.bench".to_string(),
            "dbz.public.latency".to_string(),
        ],
    )
    .await
    .expect("Debezium's topics");
    let connector = DebeziumSource::postgres(&source, "app", "dbz", "public.bench,public.latency")
        .with("decimal.handling.mode", "string")
        .with("tombstones.on.delete", "false");
    let mut connect = KafkaConnect::start(&broker, connector, JsonSchemas::Disabled);
    connect.wait_streaming(Duration::from_secs(180));
    let metrics = free_port();
    let config = write_config_with_prefix(
        work,
        metrics,
        &source.dsn("app"),
        setup,
        &broker.bootstrap(),
        &target.dsn("replica"),
        "dbz",
    );
    let sink = Daemon::start(
        &["run", "-c", &config.display().to_string(), "--role", "sink"],
        &work.join("debezium-sink.log"),
    );
    wait_ready(metrics).await;
    wait_assigned(metrics).await;
    let cpu_before = cpu_seconds(connect.pid());
    let sink_cpu_before = cpu_seconds(sink.pid());
    let timed = timed_workload(&s, &t, rows, broker.bootstrap(), "dbz.public.bench").await;
    assert!(
        timed.caught_up,
        "Debezium and tidelink's sink did not catch up:\n{}",
        connect.log_tail(30)
    );
    let (changes, seconds, source_seconds) = (timed.changes, timed.seconds, timed.source_seconds);
    let cpu = cpu_seconds(connect.pid()) - cpu_before;
    let sink_cpu = cpu_seconds(sink.pid()) - sink_cpu_before;
    let rss = peak_rss_mib(connect.pid());
    let (p50_ms, p99_ms, latency_rate) = commit_to_apply_latency(&s, &t, changes, seconds).await;
    let _ = sink.terminate(Duration::from_secs(30));
    DebeziumRun {
        run: EndToEnd {
            seconds,
            source_seconds,
            changes,
            cpu,
            rss,
            p50_ms,
            p99_ms,
            latency_rate,
        },
        sink_cpu,
    }
}

/// The end-to-end run's rows, for the `--only` runs that make it without the rest.
fn report_e2e_alone(r: &mut Results, e2e: &EndToEnd) {
    r.timed(
        "PG → tidelink → PG, first commit until equal",
        e2e.changes,
        e2e.seconds,
    );
    r.add(
        "CPU per change, source + sink",
        format!("{:.1} µs", e2e.cpu * 1e6 / e2e.changes as f64),
        &format!("{:.1} CPU s", e2e.cpu),
    );
    r.add("peak RSS of the daemon", format!("{:.0} MiB", e2e.rss), "");
    r.add(
        &format!("commit → apply latency p50 / p99 at {}/s", e2e.latency_rate),
        format!("{:.0} / {:.0} ms", e2e.p50_ms, e2e.p99_ms),
        "",
    );
}

/// Debezium's rows beside tidelink's run `e2e`, with the ratios of the goals: tidelink
/// ≥ 3× Debezium's rate, ≤ 1/5 of its CPU per change, ≤ 1/10 of its RSS.
async fn report_debezium(
    r: &mut Results,
    e2e: &EndToEnd,
    rows: u64,
    work: &std::path::Path,
    setup: &BrokerSetup,
) {
    let dbz = debezium_pg(rows, work, setup).await;
    let d = &dbz.run;
    let per_change = |cpu: f64, changes: u64| cpu * 1e6 / changes as f64;
    match (d.source_seconds, e2e.source_seconds) {
        (Some(theirs), Some(ours)) => {
            r.add(
                "Debezium PG connector → Kafka: every change in Kafka",
                rate(d.changes, theirs),
                &format!("{theirs:.1} s"),
            );
            r.add(
                "tidelink PG source → Kafka: every change in Kafka",
                rate(e2e.changes, ours),
                &format!("{ours:.1} s, from the end-to-end run"),
            );
            r.ratio(
                "  tidelink / Debezium, source rate (goal ≥ 3×)",
                theirs / ours,
            );
        }
        _ => println!("  (the topic watch did not see every change in Kafka)"),
    }
    r.timed(
        "Debezium → Kafka → tidelink sink → PG, first commit until equal",
        d.changes,
        d.seconds,
    );
    r.ratio(
        "  tidelink end to end / Debezium end to end",
        d.seconds / e2e.seconds,
    );
    let theirs = per_change(d.cpu, d.changes);
    let ours = per_change(e2e.cpu, e2e.changes);
    r.add(
        "CPU per change, Debezium's Connect worker (source only)",
        format!("{theirs:.1} µs"),
        &format!(
            "{:.1} CPU s; its tidelink sink {:.1} µs",
            d.cpu,
            per_change(dbz.sink_cpu, d.changes)
        ),
    );
    r.ratio(
        "  Debezium / tidelink source + sink (goal ≥ 5×)",
        theirs / ours,
    );
    r.add(
        "peak RSS of Debezium's Connect worker (-Xms256m -Xmx2g)",
        format!("{:.0} MiB", d.rss),
        "",
    );
    r.ratio("  Debezium / tidelink (goal ≥ 10×)", d.rss / e2e.rss);
    r.add(
        &format!(
            "commit → apply latency p50 / p99 via Debezium at {}/s",
            d.latency_rate
        ),
        format!("{:.0} / {:.0} ms", d.p50_ms, d.p99_ms),
        "Debezium's defaults (poll.interval.ms 500)",
    );
}

/// A fresh PostgreSQL → broker → PostgreSQL pipeline with its daemon running and ready; its
/// config and log live in `dir`. Fields drop in order: the daemon first, the servers last.
/// Bind it whole (`let p = …`): a destructuring `let` would drop the servers at once.
struct FreshPipeline {
    daemon: Daemon,
    _broker: Broker,
    s: Client,
    t: Client,
    _source: PgCluster,
    _target: PgCluster,
}

impl FreshPipeline {
    async fn start(dir: &std::path::Path) -> Self {
        let (source, target, s, t) = two_clusters().await;
        let setup = BrokerSetup::from_env();
        let broker = Broker::start_with(&setup);
        let metrics = free_port();
        std::fs::create_dir_all(dir).expect("dir");
        let config = write_config(
            dir,
            metrics,
            &source.dsn("app"),
            &setup,
            &broker.bootstrap(),
            &target.dsn("replica"),
        );
        let daemon = Daemon::start(
            &["run", "-c", &config.display().to_string()],
            &dir.join("tidelink.log"),
        );
        wait_ready(metrics).await;
        wait_assigned(metrics).await;
        Self {
            daemon,
            _broker: broker,
            s,
            t,
            _source: source,
            _target: target,
        }
    }
}

/// One transaction inserting `rows` rows through a fresh pipeline: the daemon's peak RSS
/// until the target holds them all, and the seconds that took.
async fn big_transaction(rows: u64, work: &std::path::Path) -> (f64, f64) {
    let p = FreshPipeline::start(&work.join("big-transaction")).await;
    let started = Instant::now();
    p.s.batch_execute(&format!(
        "INSERT INTO bench SELECT g, 'account ' || (g % 5000), (g % 100000) / 100.0, 'new', now() FROM generate_series(1, {rows}) g"
    ))
    .await
    .expect("one big transaction");
    assert!(
        wait_equal(&p.s, &p.t, Duration::from_secs(3600)).await,
        "tidelink did not catch up with the big transaction"
    );
    let seconds = started.elapsed().as_secs_f64();
    let rss = peak_rss_mib(p.daemon.pid());
    let _ = p.daemon.terminate(Duration::from_secs(30));
    (rss, seconds)
}

/// CPU the daemon spends while nothing changes: a PostgreSQL pipeline with one sink that
/// has replayed a few rows, measured over 30 s (after 5 s to settle). Spinning threads,
/// such as a poll loop that stops blocking near its deadline, show up here first.
async fn idle_cpu(work: &std::path::Path) -> f64 {
    const SECONDS: u64 = 30;
    let p = FreshPipeline::start(&work.join("idle")).await;
    p.s.batch_execute(
        "INSERT INTO bench SELECT g, 'account', 1.0, 'new', now() FROM generate_series(1, 10) g",
    )
    .await
    .expect("a few rows");
    assert!(
        wait_equal(&p.s, &p.t, Duration::from_secs(120)).await,
        "tidelink did not replay the first rows"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = cpu_seconds(p.daemon.pid());
    tokio::time::sleep(Duration::from_secs(SECONDS)).await;
    let used = cpu_seconds(p.daemon.pid()) - before;
    let _ = p.daemon.terminate(Duration::from_secs(30));
    used * 1000.0 / SECONDS as f64
}

/// The same workload through native logical replication (publication + subscription).
async fn native_pg(rows: u64) -> (f64, u64) {
    let (source, _target, s, t) = two_clusters().await;
    s.batch_execute("CREATE PUBLICATION p FOR TABLE bench")
        .await
        .expect("publication");
    t.batch_execute(&format!(
        "CREATE SUBSCRIPTION s CONNECTION '{}' PUBLICATION p WITH (copy_data = false)",
        source
            .dsn("app")
            .replace(
                "postgres://postgres@127.0.0.1:",
                "host=127.0.0.1 user=postgres dbname=app port="
            )
            .replace("/app", "")
    ))
    .await
    .expect("subscription");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let changes = pg_workload(&s, rows).await;
    assert!(
        wait_equal(&s, &t, Duration::from_secs(3600)).await,
        "native replication did not catch up"
    );
    (started.elapsed().as_secs_f64(), changes)
}

/// Source ceiling: pg_recvlogical streaming the workload's pgoutput to /dev/null.
async fn decode_ceiling(rows: u64) -> (f64, u64) {
    let source = PgCluster::start();
    source.create_database("app").await;
    let s = source.client("app").await;
    s.batch_execute(TABLE).await.expect("table");
    s.batch_execute("CREATE PUBLICATION p FOR TABLE bench")
        .await
        .expect("publication");
    s.batch_execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        .await
        .expect("slot");
    let changes = pg_workload(&s, rows).await;
    let end: String = s
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let started = Instant::now();
    let status = Command::new(format!("{PG_BIN}/pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &source.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "app",
            "--slot",
            "s",
            "--start",
            "--endpos",
            &end,
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=p",
            "-f",
            "/dev/null",
            "--no-loop",
        ])
        .stderr(Stdio::null())
        .status()
        .expect("pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed");
    (started.elapsed().as_secs_f64(), changes)
}

/// Broker ceiling: produce then consume `count` messages of `size` bytes with tidelink's
/// client settings. Returns (produce seconds, consume seconds).
async fn broker_ceiling(setup: &BrokerSetup, count: u64, size: usize) -> (f64, f64) {
    use rdkafka::consumer::Consumer;
    let broker = Broker::start_with(setup);
    let kafka = ceiling_kafka(setup, &broker, "ceiling").await;
    let started = Instant::now();
    produce_messages(&kafka, "ceiling.t", count, size).await;
    let produce = started.elapsed().as_secs_f64();
    let consumer = ceiling_consumer(&kafka);
    // Partitions assigned directly, from the start: joining a group is not part of the
    // ceiling (nisshi, like Kafka, holds a new group's first join for 3 s).
    let metadata = consumer
        .fetch_metadata(Some("ceiling.t"), Duration::from_secs(10))
        .expect("metadata");
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        partitions
            .add_partition_offset("ceiling.t", p.id(), rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&partitions).expect("assign");
    let started = Instant::now();
    consume_messages(&consumer, count, started);
    (produce, started.elapsed().as_secs_f64())
}

/// The broker as a pipeline uses it: a consumer (already assigned its partitions) reads
/// the topic while the producer writes it. Seconds from the first message sent until the
/// last one is read. With tansu this is lower than either alone: one process (its sqlite
/// storage) serves both.
async fn broker_streaming(setup: &BrokerSetup, count: u64, size: usize) -> f64 {
    use rdkafka::consumer::Consumer;
    let broker = Broker::start_with(setup);
    let kafka = ceiling_kafka(setup, &broker, "streaming").await;
    let (assigned_tx, assigned_rx) = std::sync::mpsc::channel();
    let (start_tx, start_rx) = std::sync::mpsc::channel::<Instant>();
    let reader_kafka = kafka.clone();
    let reader = std::thread::spawn(move || {
        let consumer = ceiling_consumer(&reader_kafka);
        consumer.subscribe(&["streaming.t"]).expect("subscribe");
        let joining = Instant::now();
        while consumer.assignment().map_or(true, |a| a.count() == 0)
            && joining.elapsed() < Duration::from_secs(120)
        {
            let _ = consumer.poll(Duration::from_millis(100));
        }
        assigned_tx.send(()).expect("main waits");
        let started = start_rx.recv().expect("start");
        consume_messages(&consumer, count, started);
        started.elapsed().as_secs_f64()
    });
    assigned_rx.recv().expect("consumer joined");
    start_tx.send(Instant::now()).expect("reader waits");
    produce_messages(&kafka, "streaming.t", count, size).await;
    tokio::task::spawn_blocking(move || reader.join().expect("reader"))
        .await
        .expect("join")
}

async fn ceiling_kafka(
    setup: &BrokerSetup,
    broker: &Broker,
    prefix: &str,
) -> tidelink_config::KafkaConfig {
    let mut kafka: tidelink_config::KafkaConfig = serde_yaml_ng::from_str(&format!(
        "brokers: {}\ntopic_prefix: {prefix}\n",
        broker.bootstrap()
    ))
    .expect("kafka config");
    // The same client settings as the pipelines'.
    kafka.properties.extend(tuning_properties(setup));
    tidelink_kafka::admin::ensure_topics(&kafka, &[format!("{prefix}.t")])
        .await
        .expect("topic");
    kafka
}

fn ceiling_consumer(kafka: &tidelink_config::KafkaConfig) -> rdkafka::consumer::BaseConsumer {
    tidelink_kafka::client_config::consumer(kafka, "ceiling")
        .expect("config")
        .create()
        .expect("consumer")
}

/// Sends `count` messages of `size` bytes with the pipeline's producer settings and waits
/// for every acknowledgement (at most 100k outstanding).
async fn produce_messages(
    kafka: &tidelink_config::KafkaConfig,
    topic: &str,
    count: u64,
    size: usize,
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = tidelink_kafka::client_config::producer(kafka)
        .expect("config")
        .create()
        .expect("producer");
    let payload = vec![b'x'; size];
    let mut pending = std::collections::VecDeque::new();
    for i in 0..count {
        let key = i.to_string();
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        let delivery = loop {
            match producer.send_result(record) {
                Ok(d) => break d,
                Err((_, returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        pending.push_back(delivery);
        if pending.len() > 100_000 {
            let _ = pending.pop_front().expect("pending").await;
        }
    }
    for d in pending {
        let _ = d.await;
    }
}

/// Polls until `count` messages arrived (or 30 minutes from `started` passed).
fn consume_messages(consumer: &rdkafka::consumer::BaseConsumer, count: u64, started: Instant) {
    let mut received = 0;
    while received < count && started.elapsed() < Duration::from_secs(1800) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            received += 1;
        }
    }
}

/// Target ceiling: the sink's batched apply of prepared batches (the same inserts, updates
/// and deletes), in process.
async fn apply_ceiling(rows: u64) -> (f64, u64) {
    use tidelink_core::{
        MessageOrigin, OffsetAdvance, Op, Row, Sink, SinkChange, TableId, TopicPartition,
    };
    let target = PgCluster::start();
    target.create_database("replica").await;
    target
        .client("replica")
        .await
        .batch_execute(TABLE)
        .await
        .expect("table");
    let mut sink = tidelink_postgres::PgSink::connect(tidelink_postgres::sink::PgSinkSettings {
        dsn: target.dsn("replica"),
        group: "ceiling".into(),
        state_schema: "tidelink".into(),
        record_history: false,
        create_tables: false,
    })
    .await
    .expect("sink");
    let table = TableId::new("public", "bench");
    let change = |id: u64, op: Op, offset: i64| {
        let mut key = Row::new();
        key.insert("id", id.into());
        let after = (op != Op::Delete).then(|| {
            let mut row = key.clone();
            row.insert("account", format!("account {}", id % 5000).into());
            row.insert("amount", format!("{}.{:02}", id % 1000, id % 100).into());
            row.insert(
                "status",
                if op == Op::Create { "new" } else { "paid" }.into(),
            );
            row.insert("updated", "2026-11-25 10:00:00.123456+00".into());
            row
        });
        SinkChange {
            table: table.clone(),
            op,
            key,
            after,
            origin: MessageOrigin {
                topic: "t".into(),
                partition: 0,
                offset,
            },
            source_columns: None,
            barrier: None,
        }
    };
    let mut changes = Vec::new();
    for id in 1..=rows {
        changes.push(change(id, Op::Create, changes.len() as i64));
    }
    for id in 1..=rows {
        changes.push(change(id, Op::Update, changes.len() as i64));
    }
    for id in 1..=rows / 25 {
        changes.push(change(id * 25, Op::Delete, changes.len() as i64));
    }
    let partition = TopicPartition {
        topic: "t".into(),
        partition: 0,
    };
    let started = Instant::now();
    let mut expected = None;
    for batch in changes.chunks(5000) {
        let next = batch.last().map(|c| c.origin.offset + 1).unwrap_or(0);
        sink.apply(
            batch,
            &[OffsetAdvance {
                applied_through: None,
                partition: partition.clone(),
                expected,
                next,
            }],
        )
        .await
        .expect("apply");
        expected = Some(next);
    }
    (started.elapsed().as_secs_f64(), changes.len() as u64)
}

/// Seconds taken by backfill `--direct`, by `COPY … TO STDOUT | COPY … FROM STDIN` of the
/// same table, and by the same pipe in binary format.
struct DirectTimes {
    direct: f64,
    copy_text: f64,
    copy_binary: f64,
}

/// Backfill `--direct` versus `COPY … TO STDOUT | COPY … FROM STDIN` of the same table, in
/// text (the goal's baseline) and in binary format.
async fn direct_versus_copy(rows: u64, work: &std::path::Path) -> DirectTimes {
    let (source, target, s, t) = two_clusters().await;
    s.batch_execute(&format!(
        "INSERT INTO bench SELECT g, 'account ' || (g % 5000), (g % 100000) / 100.0, 'new', now() FROM generate_series(1, {rows}) g"
    ))
    .await
    .expect("preload");
    // The first reader of freshly inserted rows sets their hint bits (writing every page),
    // and autovacuum would visit the table during whichever copy came first: settle the
    // table once, so that every copy reads it alike.
    for settle in ["VACUUM (FREEZE, ANALYZE) bench", "CHECKPOINT"] {
        s.batch_execute(settle)
            .await
            .expect("settle the source table");
    }
    let psql = format!("{PG_BIN}/psql");
    let copy_pipe = async |options: &str| {
        t.batch_execute("CHECKPOINT").await.expect("checkpoint");
        let started = Instant::now();
        let status = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{psql} -X -q -h 127.0.0.1 -p {} -U postgres -d app -c 'COPY bench TO STDOUT{options}' | {psql} -X -q -h 127.0.0.1 -p {} -U postgres -d replica -c 'COPY bench FROM STDIN{options}'",
                source.port, target.port
            ))
            .status()
            .expect("copy pipe");
        assert!(status.success(), "COPY pipe failed");
        let seconds = started.elapsed().as_secs_f64();
        t.batch_execute("TRUNCATE bench").await.expect("truncate");
        seconds
    };
    let copy_text = copy_pipe("").await;
    let copy_binary = copy_pipe(" (FORMAT binary)").await;
    let setup = BrokerSetup::from_env();
    let broker = Broker::start_with(&setup);
    let config = write_config(
        work,
        free_port(),
        &source.dsn("app"),
        &setup,
        &broker.bootstrap(),
        &target.dsn("replica"),
    );
    // The backfill reads the pipeline's publication, which the source creates: create it.
    s.batch_execute("CREATE PUBLICATION tidelink_bench FOR TABLE bench")
        .await
        .expect("publication");
    t.batch_execute("CHECKPOINT").await.expect("checkpoint");
    let started = Instant::now();
    let mut direct = Daemon::start(
        &[
            "backfill",
            "-c",
            &config.display().to_string(),
            "--pipeline",
            "bench",
            "--direct",
            "target",
            "--chunk-size",
            "100000",
        ],
        &work.join("direct.log"),
    );
    let status = direct
        .wait(Duration::from_secs(3600))
        .expect("direct backfill finishes");
    assert!(
        status.success(),
        "direct backfill failed: {}",
        direct.output()
    );
    let direct_seconds = started.elapsed().as_secs_f64();
    assert_eq!(
        digest(&s).await,
        digest(&t).await,
        "direct backfill copied everything"
    );
    DirectTimes {
        direct: direct_seconds,
        copy_text,
        copy_binary,
    }
}

/// Seconds of a MariaDB `backfill --direct`, and of the baseline it is held against.
struct MariaDbDirectTimes {
    direct: f64,
    /// `mariadb --batch` writing the source table into a file.
    dump: f64,
    /// `mariadb --local-infile` loading that file with `LOAD DATA LOCAL INFILE`.
    load: f64,
}

/// MariaDB → MariaDB `backfill --direct` (`LOAD DATA LOCAL INFILE` fed from memory) versus
/// loading a dump of the same table the same way with the `mariadb` client.
async fn direct_mariadb_versus_load_data(rows: u64, work: &std::path::Path) -> MariaDbDirectTimes {
    use mysql_async::prelude::Queryable;
    // Each load gets a fresh target: on one that an earlier load filled, InnoDB would
    // still be flushing that load's pages.
    let source = MariaDb::start(1);
    let dump_target = MariaDb::start(2);
    let target = MariaDb::start(3);
    for server in [&source, &dump_target, &target] {
        server.execute("mysql", "CREATE DATABASE shop").await;
        server.execute("shop", MARIADB_TABLE).await;
    }
    let mut a = source.conn("shop").await;
    a.query_drop(format!(
        "INSERT INTO bench SELECT seq, CONCAT('account ', seq % 5000), (seq % 100000) / 100, 'new' FROM seq_1_to_{rows}"
    ))
    .await
    .expect("preload");
    let client = |port: u16, options: &str, sql: &str| {
        format!("mariadb --no-defaults -h 127.0.0.1 -P {port} -u root {options} shop -e \"{sql}\"")
    };
    let shell = |command: String| {
        let started = Instant::now();
        let status = Command::new("bash")
            .arg("-c")
            .arg(&command)
            .status()
            .expect("run the mariadb client");
        assert!(status.success(), "{command} failed");
        started.elapsed().as_secs_f64()
    };
    let dump_file = work.join("bench.tsv");
    let dump = shell(format!(
        "{} > {}",
        client(
            source.port,
            "--batch --skip-column-names",
            "SELECT * FROM bench"
        ),
        dump_file.display()
    ));
    let load = shell(client(
        dump_target.port,
        "--local-infile=1",
        &format!(
            "LOAD DATA LOCAL INFILE '{}' INTO TABLE bench",
            dump_file.display()
        ),
    ));
    assert_eq!(
        mdigest(&mut a).await,
        mdigest(&mut dump_target.conn("shop").await).await,
        "the dump loaded everything"
    );
    drop(dump_target);
    let _ = std::fs::remove_file(&dump_file);
    let mut b = target.conn("shop").await;
    // The pipeline's Kafka is named but never used by a direct backfill.
    let yaml = format!(
        "pipelines:\n  - name: mdirect\n    source:\n      mysql:\n        dsn: {}\n        tables: [shop.bench]\n    kafka:\n      brokers: 127.0.0.1:9\n      topic_prefix: mdirect\n    sinks:\n      - name: target\n        mysql:\n          dsn: {}\n",
        source.dsn("shop"),
        target.dsn("shop")
    );
    let config = work.join("mariadb-direct.yaml");
    std::fs::write(&config, yaml).expect("config");
    let started = Instant::now();
    let mut direct = Daemon::start(
        &[
            "backfill",
            "-c",
            &config.display().to_string(),
            "--pipeline",
            "mdirect",
            "--direct",
            "target",
            "--chunk-size",
            "100000",
        ],
        &work.join("mariadb-direct.log"),
    );
    let status = direct
        .wait(Duration::from_secs(3600))
        .expect("direct backfill finishes");
    assert!(
        status.success(),
        "direct backfill failed: {}",
        direct.output()
    );
    let direct_seconds = started.elapsed().as_secs_f64();
    assert_eq!(
        mdigest(&mut a).await,
        mdigest(&mut b).await,
        "direct backfill copied everything"
    );
    assert!(
        !direct.output().contains("INSERTs"),
        "every chunk went in with LOAD DATA: {}",
        direct.output()
    );
    MariaDbDirectTimes {
        direct: direct_seconds,
        dump,
        load,
    }
}

/// MariaDB → tidelink → MariaDB versus native MariaDB replication, and MariaDB →
/// tidelink → PostgreSQL, same workload; adds their rates to the report, and the first one
/// against the broker's producing-and-consuming-at-once rate when that was measured.
/// Returns native replication's rate.
async fn report_mariadb(
    r: &mut Results,
    rows: u64,
    work: &std::path::Path,
    broker: &BrokerSetup,
    broker_streaming_rate: Option<f64>,
) -> f64 {
    let (m_tidelink, m_changes) =
        mariadb_tidelink(rows, work, MariaDbTarget::MariaDb, broker).await;
    r.add(
        "MariaDB → tidelink → MariaDB",
        rate(m_changes, m_tidelink),
        &format!("{m_tidelink:.1} s"),
    );
    let (m_native, native_changes) = native_mariadb(rows).await;
    r.add(
        "MariaDB native replication (GTID), same workload",
        rate(native_changes, m_native),
        &format!("{m_native:.1} s"),
    );
    r.ratio(
        "  tidelink / native MariaDB (goal ≥ 1.0)",
        m_native / m_tidelink,
    );
    if let Some(streaming) = broker_streaming_rate {
        r.ratio(
            "  MariaDB / broker producing and consuming at once",
            m_changes as f64 / m_tidelink / streaming,
        );
    }
    let (to_pg, to_pg_changes) =
        mariadb_tidelink(rows, work, MariaDbTarget::Postgres, broker).await;
    r.add(
        "MariaDB → tidelink → PostgreSQL",
        rate(to_pg_changes, to_pg),
        &format!("{to_pg:.1} s"),
    );
    native_changes as f64 / m_native
}

const MARIADB_TABLE: &str = "CREATE TABLE shop.bench (id bigint PRIMARY KEY, account varchar(40) NOT NULL, amount decimal(12,2) NOT NULL, status varchar(10) NOT NULL) ENGINE=InnoDB";

/// The MariaDB workload, as [`pg_workload`]'s: returns the number of changes.
async fn mariadb_workload(conn: &mut mysql_async::Conn, rows: u64) -> u64 {
    use mysql_async::prelude::Queryable;
    conn.query_drop("SET SESSION cte_max_recursion_depth = 4294967295")
        .await
        .ok();
    let mut start = 1;
    while start <= rows {
        let end = (start + 999).min(rows);
        conn.query_drop(format!("INSERT INTO shop.bench SELECT seq, CONCAT('account ', seq % 5000), (seq % 100000) / 100, 'new' FROM seq_{start}_to_{end}")).await.expect("insert");
        start = end + 1;
    }
    let mut start = 1;
    while start <= rows {
        let end = (start + 999).min(rows);
        conn.query_drop(format!("UPDATE shop.bench SET amount = amount + 1, status = 'paid' WHERE id BETWEEN {start} AND {end}")).await.expect("update");
        start = end + 1;
    }
    // Every 25th row, 1,000 per transaction.
    let deletes = rows / 25;
    let mut start = 1;
    while start <= deletes {
        let end = (start + 999).min(deletes);
        conn.query_drop(format!(
            "DELETE FROM shop.bench WHERE id BETWEEN {} AND {} AND id % 25 = 0",
            start * 25,
            end * 25
        ))
        .await
        .expect("delete");
        start = end + 1;
    }
    let left: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM shop.bench")
        .await
        .expect("count");
    assert_eq!(left, Some(rows - deletes), "the workload's row count");
    workload_changes(rows)
}

/// Which program reads the MariaDB binlog in [`mariadb_source_rate`].
#[derive(Clone, Copy, PartialEq)]
enum BinlogReader {
    Tidelink,
    /// Debezium's MySQL connector 2.6 in its MariaDB mode (3.x refuses MariaDB).
    Debezium,
}

/// A source alone: the MariaDB workload from its first commit until Kafka holds every
/// change, and the reader's CPU seconds and peak RSS meanwhile.
struct SourceRun {
    seconds: f64,
    changes: u64,
    cpu: f64,
    rss: f64,
}

async fn mariadb_source_rate(
    rows: u64,
    work: &std::path::Path,
    setup: &BrokerSetup,
    reader: BinlogReader,
) -> SourceRun {
    use tidelink_integration_tests::debezium::{DebeziumSource, JsonSchemas, KafkaConnect};
    let source = MariaDb::start(1);
    source.execute("mysql", "CREATE DATABASE shop").await;
    source.execute("shop", MARIADB_TABLE).await;
    let mut conn = source.conn("shop").await;
    let broker = Broker::start_with(setup);
    let prefix = match reader {
        BinlogReader::Tidelink => "msrc",
        BinlogReader::Debezium => "dbzmy",
    };
    let topic = format!("{prefix}.shop.bench");
    let mut kafka = ceiling_kafka(setup, &broker, prefix).await;
    kafka.partitions = 4;
    tidelink_kafka::admin::ensure_topics(&kafka, std::slice::from_ref(&topic))
        .await
        .expect("the table's topic");
    let (pid, _connect, _daemon) = match reader {
        BinlogReader::Tidelink => {
            let metrics = free_port();
            // The sink is never started (`--role source`); validation wants one.
            let yaml = format!(
                "metrics:\n  listen: 127.0.0.1:{metrics}\npipelines:\n  - name: msrc\n    snapshot: never\n    source:\n      mysql:\n        dsn: {}\n        tables: [shop.*]\n    kafka:\n      brokers: {}\n      topic_prefix: {prefix}\n      partitions: 4\n{}    sinks:\n      - name: unused\n        mysql:\n          dsn: {}\n",
                source.dsn("shop"),
                broker.bootstrap(),
                tuning_kafka_properties(setup),
                source.dsn("shop"),
            );
            let config = work.join("mariadb-source.yaml");
            std::fs::write(&config, yaml).expect("config");
            let daemon = Daemon::start(
                &[
                    "run",
                    "-c",
                    &config.display().to_string(),
                    "--role",
                    "source",
                ],
                &work.join("mariadb-source.log"),
            );
            wait_ready(metrics).await;
            (daemon.pid(), None, Some(daemon))
        }
        BinlogReader::Debezium => {
            let connector =
                DebeziumSource::mariadb(&source, prefix, "shop", &work.join("dbz-history"))
                    .with("decimal.handling.mode", "string")
                    .with("tombstones.on.delete", "false");
            let mut connect = KafkaConnect::start(&broker, connector, JsonSchemas::Disabled);
            connect.wait_streaming(Duration::from_secs(180));
            (connect.pid(), Some(connect), None)
        }
    };
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let filled = watch_topic_filled(broker.bootstrap(), topic, workload_changes(rows), started);
    let changes = mariadb_workload(&mut conn, rows).await;
    let seconds = filled
        .await
        .ok()
        .flatten()
        .expect("every change of the MariaDB workload reached Kafka within an hour");
    SourceRun {
        seconds,
        changes,
        cpu: cpu_seconds(pid) - cpu_before,
        rss: peak_rss_mib(pid),
    }
}

/// The MariaDB sources alone, tidelink's and Debezium's, with the goal ratios.
async fn report_mariadb_sources(
    r: &mut Results,
    rows: u64,
    work: &std::path::Path,
    setup: &BrokerSetup,
) {
    let ours = mariadb_source_rate(rows, work, setup, BinlogReader::Tidelink).await;
    let theirs = mariadb_source_rate(rows, work, setup, BinlogReader::Debezium).await;
    let per_change = |run: &SourceRun| run.cpu * 1e6 / run.changes as f64;
    for (label, run) in [
        ("MariaDB → tidelink source → Kafka", &ours),
        (
            "MariaDB → Debezium 2.6 MySQL connector (MariaDB mode) → Kafka",
            &theirs,
        ),
    ] {
        r.add(
            label,
            rate(run.changes, run.seconds),
            &format!(
                "{:.1} s, {:.1} µs CPU per change, peak RSS {:.0} MiB",
                run.seconds,
                per_change(run),
                run.rss
            ),
        );
    }
    r.add(
        "  tidelink / Debezium on MariaDB: rate (≥ 3×), CPU (≥ 5×), RSS (≥ 10×)",
        format!(
            "{:.2}× / {:.2}× / {:.2}×",
            theirs.seconds / ours.seconds,
            per_change(&theirs) / per_change(&ours),
            theirs.rss / ours.rss
        ),
        "",
    );
}

/// The MariaDB source's highest row, `(id, amount as text)`: the probe [`TargetDigest`]
/// looks up first.
async fn mprobe(conn: &mut mysql_async::Conn) -> Option<(i64, String)> {
    use mysql_async::prelude::Queryable;
    conn.query_first("SELECT id, CAST(amount AS CHAR) FROM shop.bench ORDER BY id DESC LIMIT 1")
        .await
        .ok()
        .flatten()
}

/// Row count and sum of amounts of shop.bench, or None while it cannot be read.
async fn mdigest(conn: &mut mysql_async::Conn) -> Option<(i64, String)> {
    use mysql_async::prelude::Queryable;
    conn.query_first("SELECT COUNT(*), CAST(IFNULL(SUM(amount), 0) AS CHAR) FROM shop.bench")
        .await
        .ok()
        .flatten()
}

/// The MariaDB workload through native replication to a replica (by GTID); returns the
/// seconds from the first commit until the replica's digest equals the source's, and the
/// changes made.
async fn native_mariadb(rows: u64) -> (f64, u64) {
    use mysql_async::prelude::Queryable;
    // Native: the target replicates from the source by GTID.
    let source = MariaDb::start(1);
    let replica = MariaDb::start(2);
    source.execute("mysql", "CREATE DATABASE shop").await;
    source.execute("shop", MARIADB_TABLE).await;
    replica.execute("mysql", &format!(
        "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USER='root', MASTER_USE_GTID=slave_pos;\nSTART SLAVE",
        source.port
    )).await;
    let mut a = source.conn("shop").await;
    let mut b = replica.conn("mysql").await;
    for _ in 0..200 {
        if b.query_first::<i64, _>(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'shop'",
        )
        .await
        .ok()
        .flatten()
            == Some(1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let changes = mariadb_workload(&mut a, rows).await;
    let expected = mdigest(&mut a).await;
    let probe = mprobe(&mut a).await;
    let mut replica_digest = TargetDigest::MariaDb(b);
    assert!(
        replica_digest.wait_for(&expected, probe).await,
        "MariaDB target did not catch up"
    );
    let native = started.elapsed().as_secs_f64();
    drop((a, replica_digest, source, replica));
    (native, changes)
}

/// Where a MariaDB pipeline of the benchmark writes.
enum MariaDbTarget {
    MariaDb,
    Postgres,
}

/// MariaDB → tidelink → `target` with the MariaDB workload; returns the seconds from the
/// first commit until the target's count and amount sum equal the source's, and the changes.
async fn mariadb_tidelink(
    rows: u64,
    work: &std::path::Path,
    target: MariaDbTarget,
    setup: &BrokerSetup,
) -> (f64, u64) {
    let source = MariaDb::start(1);
    source.execute("mysql", "CREATE DATABASE shop").await;
    source.execute("shop", MARIADB_TABLE).await;
    let mut a = source.conn("shop").await;
    let broker = Broker::start_with(setup);
    let metrics = free_port();
    // Digest of the target: row count and the amounts' sum as text, as mdigest gives it.
    let (sink, label, _mariadb, _cluster, mut target_digest) = match target {
        MariaDbTarget::MariaDb => {
            let target = MariaDb::start(2);
            target.execute("mysql", "CREATE DATABASE shop").await;
            target.execute("shop", MARIADB_TABLE).await;
            let conn = target.conn("shop").await;
            let sink = format!("        mysql:\n          dsn: {}\n", target.dsn("shop"));
            (
                sink,
                "mariadb",
                Some(target),
                None,
                TargetDigest::MariaDb(conn),
            )
        }
        MariaDbTarget::Postgres => {
            let cluster = PgCluster::start();
            cluster.create_database("replica").await;
            let client = cluster.client("replica").await;
            client
                .batch_execute("CREATE SCHEMA shop; CREATE TABLE shop.bench (id bigint PRIMARY KEY, account varchar(40) NOT NULL, amount numeric(12,2) NOT NULL, status varchar(10) NOT NULL)")
                .await
                .expect("PostgreSQL target table");
            let sink = format!(
                "        postgres:\n          dsn: {}\n",
                cluster.dsn("replica")
            );
            (
                sink,
                "mariadb-to-pg",
                None,
                Some(cluster),
                TargetDigest::Postgres(client),
            )
        }
    };
    let yaml = format!(
        "metrics:\n  listen: 127.0.0.1:{metrics}\npipelines:\n  - name: mbench\n    snapshot: never\n    source:\n      mysql:\n        dsn: {}\n        tables: [shop.*]\n    kafka:\n      brokers: {}\n      topic_prefix: mbench\n      partitions: 4\n{}    sinks:\n      - name: target\n        batch_size: 5000\n{}{sink}",
        source.dsn("shop"), broker.bootstrap(), tuning_kafka_properties(setup), tuning_batch_wait()
    );
    let config = work.join(format!("{label}.yaml"));
    std::fs::write(&config, yaml).expect("config");
    let daemon = Daemon::start(
        &["run", "-c", &config.display().to_string()],
        &work.join(format!("{label}.log")),
    );
    wait_ready(metrics).await;
    wait_assigned(metrics).await;
    let timeline = sample_timeline(metrics, label);
    let started = Instant::now();
    let changes = mariadb_workload(&mut a, rows).await;
    let expected = mdigest(&mut a).await;
    let probe = mprobe(&mut a).await;
    assert!(
        target_digest.wait_for(&expected, probe).await,
        "the {label} target did not catch up"
    );
    let seconds = started.elapsed().as_secs_f64();
    if let Some(timeline) = timeline {
        timeline.abort();
    }
    let _ = daemon.terminate(Duration::from_secs(30));
    // The work directory goes away with the run; the log stays for a look afterwards.
    let _ = std::fs::copy(
        work.join(format!("{label}.log")),
        format!("target/bench-{label}.log"),
    );
    drop(a);
    (seconds, changes)
}

/// A target's row count and sum of amounts, in MariaDB or PostgreSQL.
enum TargetDigest {
    MariaDb(mysql_async::Conn),
    Postgres(Client),
}

impl TargetDigest {
    /// Polls for up to an hour until the digest is `expected`, probing the source's highest
    /// row first ([`poll_probe_then_digest`]); false if it never was.
    async fn wait_for(
        &mut self,
        expected: &Option<(i64, String)>,
        probe: Option<(i64, String)>,
    ) -> bool {
        poll_probe_then_digest(
            self,
            Instant::now() + Duration::from_secs(3600),
            probe,
            async |target, id| target.amount_of(id).await,
            async |target| target.get().await == *expected,
        )
        .await
    }

    /// The target's amount of row `id`, as text.
    async fn amount_of(&mut self, id: i64) -> Option<String> {
        match self {
            TargetDigest::MariaDb(conn) => {
                use mysql_async::prelude::Queryable;
                conn.exec_first(
                    "SELECT CAST(amount AS CHAR) FROM shop.bench WHERE id = ?",
                    (id,),
                )
                .await
                .ok()
                .flatten()
            }
            TargetDigest::Postgres(client) => client
                .query_opt("SELECT amount::text FROM shop.bench WHERE id = $1", &[&id])
                .await
                .ok()
                .flatten()
                .map(|row| row.get(0)),
        }
    }

    async fn get(&mut self) -> Option<(i64, String)> {
        match self {
            TargetDigest::MariaDb(conn) => mdigest(conn).await,
            TargetDigest::Postgres(client) => client
                .query_one(
                    "SELECT count(*), coalesce(sum(amount), 0)::text FROM shop.bench",
                    &[],
                )
                .await
                .ok()
                .map(|row| (row.get(0), row.get(1))),
        }
    }
}

/// For tuning: with BENCH_TIMELINE=FILE, appends to FILE once a second while a pipeline
/// runs the totals of changes the source read, Kafka acknowledged and the sinks applied,
/// and the sinks' batches and seconds spent applying them (from the daemon's metrics), so
/// a slow run shows which stage falls behind.
fn sample_timeline(port: u16, label: &str) -> Option<tokio::task::JoinHandle<()>> {
    let mut file = timeline_file()?;
    let label = label.to_string();
    Some(tokio::spawn(async move {
        use std::io::Write as _;
        let _ = writeln!(
            file,
            "# {label}: seconds source_events kafka_produced sink_applied sink_batches sink_apply_seconds"
        );
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(text) = http_get(port, "/metrics").await else {
                continue;
            };
            let total = |name: &str| metric_sum(&text, name);
            let _ = writeln!(
                file,
                "{label} {:.0} {} {} {} {} {:.2}",
                started.elapsed().as_secs_f64(),
                total("tidelink_source_events_total"),
                total("tidelink_kafka_produced_events_total"),
                total("tidelink_sink_applied_rows_total"),
                total("tidelink_sink_batches_total"),
                total("tidelink_sink_apply_duration_seconds_sum"),
            );
        }
    }))
}

/// Measures the broker's ceilings on `changes` messages (at most 200k) and adds their three
/// lines of the table; returns the lower of producing and consuming alone, and the rate of
/// both at once.
async fn report_broker(
    r: &mut Results,
    setup: &BrokerSetup,
    label: &str,
    changes: u64,
) -> (f64, f64) {
    // Envelope of a workload row: about 420 bytes. tansu's sqlite storage slows down badly
    // past a million messages in one topic (a 2M-message consume ran for over 10 minutes at
    // 100% CPU), so there the broker's rate is measured on at most 200k messages; Kafka
    // gets the workload's count (200k lasts it two seconds, too short to read steadily).
    let broker_messages = match setup.engine {
        BrokerEngine::Kafka { .. } => changes,
        BrokerEngine::Tansu { .. } => changes.min(200_000),
    };
    let (produce_s, consume_s) = broker_ceiling(setup, broker_messages, 420).await;
    let broker_rate = (broker_messages as f64 / produce_s).min(broker_messages as f64 / consume_s);
    r.add(
        &format!("{label}ceiling: broker produce ({broker_messages} × 420-byte messages)"),
        rate(broker_messages, produce_s),
        &format!("{produce_s:.1} s"),
    );
    r.add(
        &format!("{label}ceiling: broker consume"),
        rate(broker_messages, consume_s),
        &format!("{consume_s:.1} s"),
    );
    let streaming_s = broker_streaming(setup, broker_messages, 420).await;
    let streaming_rate = broker_messages as f64 / streaming_s;
    r.add(
        &format!("{label}ceiling: broker, produce and consume at once"),
        rate(broker_messages, streaming_s),
        &format!("{streaming_s:.1} s"),
    );
    (broker_rate, streaming_rate)
}

/// The PostgreSQL and MariaDB pipelines again, and the broker's ceilings, on a second
/// broker (nisshi on PostgreSQL storage: durable, and faster than tansu on sqlite), so the
/// goals can be read where the broker binds less.
async fn report_second_broker(
    r: &mut Results,
    broker: &BrokerSetup,
    rows: u64,
    work: &std::path::Path,
    decode_or_apply: f64,
    mariadb_native: f64,
) {
    let name = broker.version();
    let e2e = tidelink_pg(rows, work, broker).await;
    let e2e_rate = e2e.changes as f64 / e2e.seconds;
    r.add(
        &format!("PG → tidelink → PG on {name} + PostgreSQL storage"),
        rate(e2e.changes, e2e.seconds),
        &format!(
            "{:.1} s, {:.1} µs CPU per change, p50/p99 {:.0}/{:.0} ms at {}/s",
            e2e.seconds,
            e2e.cpu * 1e6 / e2e.changes as f64,
            e2e.p50_ms,
            e2e.p99_ms,
            e2e.latency_rate
        ),
    );
    let (broker_rate, streaming_rate) =
        report_broker(r, broker, &format!("  {name}: "), e2e.changes).await;
    r.ratio(
        &format!("  end to end on {name} / lowest ceiling (goal ≥ 0.8)"),
        e2e_rate / broker_rate.min(decode_or_apply),
    );
    r.ratio(
        &format!("  end to end on {name} / its producing and consuming at once"),
        e2e_rate / streaming_rate,
    );
    let (seconds, changes) = mariadb_tidelink(rows, work, MariaDbTarget::MariaDb, broker).await;
    r.add(
        &format!("MariaDB → tidelink → MariaDB on {name} + PostgreSQL storage"),
        rate(changes, seconds),
        &format!("{seconds:.1} s"),
    );
    r.ratio(
        "  that / native MariaDB (goal ≥ 1.0)",
        changes as f64 / seconds / mariadb_native,
    );
}

/// Measures the idle daemon's CPU and adds its line of the table.
async fn report_idle(r: &mut Results, work: &std::path::Path) {
    let ms_per_s = idle_cpu(work).await;
    r.add(
        "CPU of the idle daemon (one pipeline, one sink)",
        format!("{ms_per_s:.1} ms/s"),
        "",
    );
}

/// Measures `--direct` against the COPY pipes and adds their lines to the table.
async fn report_direct(r: &mut Results, rows: u64, work: &std::path::Path) {
    let times = direct_versus_copy(rows, work).await;
    r.timed(
        &format!("backfill --direct of {rows} rows"),
        rows,
        times.direct,
    );
    r.timed(
        "COPY TO STDOUT | COPY FROM STDIN, same table",
        rows,
        times.copy_text,
    );
    r.ratio(
        "  --direct / COPY pipe (goal ≥ 0.8)",
        times.copy_text / times.direct,
    );
    r.timed("the same pipe in binary format", rows, times.copy_binary);
    r.ratio(
        "  --direct / binary COPY pipe",
        times.copy_binary / times.direct,
    );
}

async fn report_mariadb_direct(r: &mut Results, rows: u64, work: &std::path::Path) {
    let times = direct_mariadb_versus_load_data(rows, work).await;
    r.timed(
        &format!("MariaDB backfill --direct of {rows} rows"),
        rows,
        times.direct,
    );
    r.timed("mariadb --batch dump of the same table", rows, times.dump);
    r.timed(
        "LOAD DATA LOCAL INFILE of that dump (mariadb client)",
        rows,
        times.load,
    );
    r.ratio(
        "  --direct / loading the dump (goal ≥ 0.8)",
        times.load / times.direct,
    );
    r.ratio(
        "  --direct / dump and load",
        (times.dump + times.load) / times.direct,
    );
}

/// A broker's storage as the report's setup names it.
fn storage_description(storage: &str) -> String {
    match storage {
        "kafka-log" => {
            "Kafka's own log directory (durable; flushed by the OS, Kafka's default)".to_string()
        }
        sqlite if sqlite.starts_with("sqlite:") => format!("`{sqlite}` (durable)"),
        own if own == tidelink_integration_tests::OWN_POSTGRES_STORAGE => {
            "a PostgreSQL 15 cluster of its own (durable; fsync off like the other clusters)"
                .to_string()
        }
        other => format!("`{other}` (TIDELINK_BROKER_STORAGE)"),
    }
}

/// The Debezium line of the setup: its version and Kafka Connect's, from the jars.
fn debezium_version() -> String {
    let home = tidelink_integration_tests::debezium::debezium_home();
    let jar_version = |lib: &str, prefix: &str| {
        std::fs::read_dir(home.join(lib))
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .find_map(|name| {
                name.strip_prefix(prefix)?
                    .strip_suffix(".jar")
                    .map(str::to_owned)
            })
    };
    let java = Command::new("java")
        .arg("-version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    format!(
        "- Debezium: PostgreSQL connector {} on Kafka Connect {} standalone; for MariaDB, the MySQL connector {} (MariaDB mode) on Kafka Connect {}; {java}, -Xms256m -Xmx2g\n",
        jar_version("lib", "debezium-connector-postgres-").unwrap_or_default(),
        jar_version("lib", "connect-runtime-").unwrap_or_default(),
        jar_version("lib-mariadb", "debezium-connector-mysql-").unwrap_or_default(),
        jar_version("lib-mariadb", "connect-runtime-").unwrap_or_default(),
    )
}

fn versions(broker: &BrokerSetup, second: Option<&BrokerSetup>) -> String {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    format!(
        "- machine: {cpu}, {cores} cores, {mem}\n- {}\n- {}\n- {}\n- broker: {}, storage {}, 4 partitions, uncompressed (the default), idempotent producer, acks=all\n- tidelink: release build, one process (source and sink), batch_size 5000\n",
        run(&format!("{PG_BIN}/postgres"), &["--version"]),
        run("mariadbd", &["--version"]),
        run("rustc", &["--version"]),
        broker.version(),
        storage_description(broker.storage()),
    ) + &debezium_version()
        + &second.map_or_else(String::new, |b| {
        format!(
            "- second broker, where the table says so: {}, storage {}; its clients set {}\n",
            b.version(),
            storage_description(b.storage()),
            b.client_properties
                .iter()
                .map(|(k, v)| format!("`{k}={v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rows: u64 = arg("--rows")
        .and_then(|r| r.parse().ok())
        .unwrap_or(1_000_000);
    let out = arg("--out");
    let work = tempfile::tempdir().expect("work dir");
    println!(
        "tidelink benchmark: {rows} inserts, {rows} updates, {} deletes",
        rows / 25
    );
    let mut r = Results { lines: Vec::new() };
    let broker = BrokerSetup::from_env();
    // nisshi on PostgreSQL storage, when scripts/install-nisshi.sh could build it.
    let nisshi = std::env::var_os("TIDELINK_NISSHI_BIN")
        .filter(|p| !p.is_empty())
        .map(|binary| BrokerSetup {
            engine: BrokerEngine::Tansu {
                binary: binary.into(),
                storage: tidelink_integration_tests::OWN_POSTGRES_STORAGE.into(),
            },
            // nisshi answers a fetch as soon as it has data, like Kafka, so a longer wait
            // costs no latency there; with tidelink's 20 ms (chosen for tansu, which holds
            // every fetch for the whole wait) the sink's fetches starved behind the
            // producer in about half the runs (docs/tuning.md).
            client_properties: vec![("fetch.wait.max.ms".into(), "100".into())],
        });

    if arg("--only").as_deref() == Some("direct") {
        report_direct(&mut r, rows, work.path()).await;
        report_mariadb_direct(&mut r, rows, work.path()).await;
        return;
    }
    if arg("--only").as_deref() == Some("mariadb-direct") {
        report_mariadb_direct(&mut r, rows, work.path()).await;
        return;
    }
    if arg("--only").as_deref() == Some("big-transaction") {
        let (rss, seconds) = big_transaction(rows * 2, work.path()).await;
        r.add(
            &format!(
                "peak RSS with one {}-row transaction (goal ≤ 128 MiB)",
                rows * 2
            ),
            format!("{rss:.0} MiB"),
            &format!("{seconds:.1} s until applied"),
        );
        return;
    }
    if arg("--only").as_deref() == Some("idle") {
        report_idle(&mut r, work.path()).await;
        return;
    }
    if arg("--only").as_deref() == Some("broker") {
        // For tuning: the broker's three ceilings alone, on the workload's changes.
        report_broker(&mut r, &broker, "", rows * 2 + rows / 25).await;
        return;
    }
    if arg("--only").as_deref() == Some("second-broker") {
        // For tuning: the runs on nisshi, with the ceilings they are read against.
        let nisshi = nisshi
            .as_ref()
            .expect("set TIDELINK_NISSHI_BIN (scripts/install-nisshi.sh prints it)");
        let (decode_s, decode_changes) = decode_ceiling(rows).await;
        let (apply_s, apply_changes) = apply_ceiling(rows).await;
        let decode_or_apply =
            (decode_changes as f64 / decode_s).min(apply_changes as f64 / apply_s);
        let (native_s, native_changes) = native_mariadb(rows).await;
        let native = native_changes as f64 / native_s;
        report_second_broker(&mut r, nisshi, rows, work.path(), decode_or_apply, native).await;
        return;
    }
    if arg("--only").as_deref() == Some("apply") {
        // For tuning: the sink's batched apply alone (profile its target backend).
        let (seconds, changes) = apply_ceiling(rows).await;
        r.add(
            "target apply (prepared in-memory batches)",
            rate(changes, seconds),
            &format!("{seconds:.1} s"),
        );
        return;
    }
    if arg("--only").as_deref() == Some("mariadb") {
        report_mariadb(&mut r, rows, work.path(), &broker, None).await;
        return;
    }
    if arg("--only").as_deref() == Some("e2e") {
        // For tuning: the end-to-end run alone.
        let e2e = tidelink_pg(rows, work.path(), &broker).await;
        report_e2e_alone(&mut r, &e2e);
        let keep = std::path::Path::new("target/bench-e2e.log");
        let _ = std::fs::copy(work.path().join("tidelink.log"), keep);
        return;
    }
    if arg("--only").as_deref() == Some("debezium") {
        // Debezium's rows and the tidelink run they are read against.
        let e2e = tidelink_pg(rows, work.path(), &broker).await;
        report_e2e_alone(&mut r, &e2e);
        report_debezium(&mut r, &e2e, rows, work.path(), &broker).await;
        report_mariadb_sources(&mut r, rows, work.path(), &broker).await;
        return;
    }
    let e2e = tidelink_pg(rows, work.path(), &broker).await;
    let tidelink_rate = e2e.changes as f64 / e2e.seconds;
    r.timed(
        "PG → tidelink → PG, first commit until equal",
        e2e.changes,
        e2e.seconds,
    );
    let (native_s, native_changes) = native_pg(rows).await;
    r.timed(
        "PG native logical replication, same workload",
        native_changes,
        native_s,
    );
    r.ratio(
        "  tidelink / native",
        tidelink_rate / (native_changes as f64 / native_s),
    );
    let (decode_s, decode_changes) = decode_ceiling(rows).await;
    let decode_rate = decode_changes as f64 / decode_s;
    r.add(
        "ceiling: source decode (pg_recvlogical → /dev/null)",
        rate(decode_changes, decode_s),
        &format!("{decode_s:.1} s"),
    );
    let (broker_rate, streaming_rate) = report_broker(&mut r, &broker, "", e2e.changes).await;
    let (apply_s, apply_changes) = apply_ceiling(rows).await;
    let apply_rate = apply_changes as f64 / apply_s;
    r.add(
        "ceiling: target apply (PgSink, prepared batches of 5000)",
        rate(apply_changes, apply_s),
        &format!("{apply_s:.1} s"),
    );
    let lowest = decode_rate.min(broker_rate).min(apply_rate);
    r.ratio(
        "  end to end / lowest ceiling (goal ≥ 0.8)",
        tidelink_rate / lowest,
    );
    r.ratio(
        "  end to end / broker producing and consuming at once",
        tidelink_rate / streaming_rate,
    );
    // On tansu, the same run on its in-memory storage, which is not durable (so not a
    // setting to run with) but fast enough to take the broker off the bound: what is left
    // is tidelink, the databases and the machine they share. Kafka needs no such run: it
    // does not fsync per request, and its ceilings above are well over tidelink's.
    if matches!(broker.engine, BrokerEngine::Tansu { .. }) {
        let unbound = tidelink_pg(rows, work.path(), &BrokerSetup::tansu_on(UNBOUND_BROKER)).await;
        r.add(
            "PG → tidelink → PG on tansu memory:// (not durable)",
            rate(unbound.changes, unbound.seconds),
            &format!(
                "{:.1} s, {:.1} µs CPU per change",
                unbound.seconds,
                unbound.cpu * 1e6 / unbound.changes as f64
            ),
        );
        r.add(
            "  that / lowest ceiling of source decode and target apply",
            format!(
                "{:.2}×",
                unbound.changes as f64 / unbound.seconds / decode_rate.min(apply_rate)
            ),
            "",
        );
    }
    r.add(
        "CPU per change, source + sink (goal ≤ 5 µs)",
        format!("{:.1} µs", e2e.cpu * 1e6 / e2e.changes as f64),
        &format!("{:.1} CPU s", e2e.cpu),
    );
    r.add(
        "peak RSS of the daemon during the run (goal ≤ 128 MiB)",
        format!("{:.0} MiB", e2e.rss),
        "",
    );
    let (big_rss, big_seconds) = big_transaction(rows * 2, work.path()).await;
    r.add(
        &format!(
            "peak RSS with one {}-row transaction (goal ≤ 128 MiB)",
            rows * 2
        ),
        format!("{big_rss:.0} MiB"),
        &format!("{big_seconds:.1} s until applied"),
    );
    r.add(
        &format!("commit → apply latency p50 at {}/s", e2e.latency_rate),
        format!("{:.0} ms", e2e.p50_ms),
        "",
    );
    r.add(
        &format!(
            "commit → apply latency p99 at {}/s (goal ≤ 100 ms)",
            e2e.latency_rate
        ),
        format!("{:.0} ms", e2e.p99_ms),
        "",
    );
    report_debezium(&mut r, &e2e, rows, work.path(), &broker).await;
    report_mariadb_sources(&mut r, rows, work.path(), &broker).await;
    report_idle(&mut r, work.path()).await;
    report_direct(&mut r, rows, work.path()).await;
    report_mariadb_direct(&mut r, rows, work.path()).await;
    let mariadb_native =
        report_mariadb(&mut r, rows, work.path(), &broker, Some(streaming_rate)).await;
    if let Some(nisshi) = &nisshi {
        report_second_broker(
            &mut r,
            nisshi,
            rows,
            work.path(),
            decode_rate.min(apply_rate),
            mariadb_native,
        )
        .await;
    } else {
        println!("  (no runs on nisshi: TIDELINK_NISSHI_BIN is not set; `make bench BENCH_NISSHI=1` builds it where a toolchain can)");
    }

    if let Some(out) = out {
        // What people wrote below the marker in an earlier report (runs, analyses) stays.
        let kept = std::fs::read_to_string(&out)
            .ok()
            .and_then(|old| old.find(KEPT_MARKER).map(|at| old[at..].to_string()));
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmarks\n\nWritten by `make bench` (`bench --rows {rows}`); every number below was measured in the same run, on throwaway local servers. Workload: {rows} inserts in 1,000-row transactions, then {rows} updates and {} deletes in 1,000-row transactions.\n\n## Setup\n\n{}\n## Results\n\n| measurement | value | |\n|---|---:|---|", rows / 25, versions(&broker, nisshi.as_ref()));
        for (what, value, note) in &r.lines {
            let _ = writeln!(
                md,
                "| {} | {value} | {note} |",
                what.trim().replace('|', "\\|")
            );
        }
        // `make bench` draws the rates as a PNG beside the report (scripts/bench-chart.py).
        let chart = std::path::Path::new(&out).with_extension("png");
        if let Some(name) = chart.file_name() {
            let _ = writeln!(
                md,
                "\n![Rates of this run, log scale]({})",
                name.to_string_lossy()
            );
        }
        let _ = writeln!(md, "\nHow each number is taken: `integration-tests/src/bin/bench.rs`. The end-to-end time runs from the first workload commit until the target's row count and amount sum equal the source's (polled every 100 ms). Ceilings are measured alone on the same machine, and the goal ratio uses the lowest of those; the broker is also measured producing and consuming at once, as a pipeline uses it (one broker process serves both, so this is lower than either alone), and the end-to-end rate is shown against that too. Debezium's rows run its PostgreSQL connector in a Kafka Connect standalone worker on the same workload and broker, JSON without schemas, applied by tidelink's sink; their CPU and RSS are the Connect JVM's. The consume ceiling reads partitions assigned directly, so joining a group is not part of it. Rows naming nisshi repeat the pipelines and the broker ceilings on nisshi with a PostgreSQL cluster of its own as storage, read against the same decode, apply and native ceilings. CPU is the daemon's user + system time during the run (databases and broker excluded). Latency inserts single-row transactions at half the measured end-to-end rate for 15 s into a table whose target copy stamps `clock_timestamp()` on apply. `--direct` is timed as a whole process (start, connections, catalog reads, 100k-row chunks) against `psql` pipes of the whole table, the source table vacuumed and every target checkpointed before each: in text format, goal (5)'s baseline, and in binary format, which `--direct` uses where both sides' column types match. The MariaDB `--direct` (`LOAD DATA LOCAL INFILE` fed from memory, 100k-row chunks) is timed the same way against the `mariadb` client loading a `mariadb --batch` dump of the table with `LOAD DATA LOCAL INFILE` (goal (6)'s baseline), each load into a fresh target server.");
        // The kept part ends in exactly one newline, so rewrites do not pile up blank lines.
        let kept = kept.unwrap_or_else(|| KEPT_MARKER.to_string());
        let _ = writeln!(md, "\n{}", kept.trim_end());
        std::fs::write(&out, md).expect("write results");
        println!("written to {out}");
    }
}
