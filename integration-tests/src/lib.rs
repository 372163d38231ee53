//! The one harness every end-to-end test uses: throwaway PostgreSQL 15 clusters, a broker
//! (Apache Kafka in KRaft mode; tansu with `TIDELINK_BROKER=tansu`), and the `tidelink` binary run as a real process
//! that tests can kill -9, restart and signal. Nothing here is a mock; every server is real
//! and lives in a temporary directory that is removed afterwards.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Directory of PostgreSQL 15's server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests lives in the workspace")
        .to_path_buf()
}

/// Runs one of the project's `scripts/install-*.sh` (each installs once into the cache and
/// prints where on stdout) and returns the path it printed; panics when it fails.
pub(crate) fn installed_by(script: &str, what: &str) -> PathBuf {
    let out = Command::new(workspace_root().join("scripts").join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    assert!(out.status.success(), "installing {what} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A free TCP port on loopback for a server a test starts, below the kernel's ephemeral
/// range: a port in that range (what binding port 0 hands out) can become the local end
/// of any outgoing connection before the server binds it. Ports are taken in turn from a
/// start that differs per process, so tests running side by side in one process never get
/// the same port, and each is checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|&low| low > LOWEST + 1_000 && low <= 65_535)
        .unwrap_or(32_768);
    let span = ephemeral_low - LOWEST;
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        std::process::id().wrapping_mul(7_919).wrapping_add(nanos)
    });
    for _ in 0..span {
        let taken = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + start.wrapping_add(taken) % span;
        let port = u16::try_from(port).expect("ports are below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOWEST} and {ephemeral_low}");
}

/// A PostgreSQL table of every type the type tests cover, `all_types`, and its enum.
pub const TYPES_SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE all_types (
    id int PRIMARY KEY,
    c_int2 int2, c_int4 int4, c_int8 int8,
    c_numeric numeric(30,10), c_numeric_free numeric,
    c_float4 float4, c_float8 float8,
    c_bool bool,
    c_text text, c_varchar varchar(50), c_char char(5),
    c_bytea bytea,
    c_date date, c_time time, c_timetz timetz,
    c_timestamp timestamp(6), c_timestamptz timestamptz,
    c_interval interval,
    c_uuid uuid,
    c_json json, c_jsonb jsonb,
    c_int_array int[], c_text_array text[], c_matrix int[][], c_numeric_array numeric[], c_char_array char(2)[],
    c_enum mood, c_enum_array mood[],
    c_inet inet, c_money money, c_point point, c_bit bit(4), c_tsrange tsrange
);
"#;

pub mod broker;
pub mod debezium;
pub mod mariadb;

pub use broker::{broker_storage, Broker, BrokerEngine, BrokerSetup, OWN_POSTGRES_STORAGE};

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary as the `postgres` user when we are root (initdb refuses root).
fn pg_command(binary: &str) -> Command {
    let path = format!("{PG_BIN}/{binary}");
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory");
    if is_root() {
        let _ = Command::new("chown")
            .args(["postgres:", &dir.path().display().to_string()])
            .status();
        let _ = Command::new("chmod")
            .args(["755", &dir.path().display().to_string()])
            .status();
    }
    dir
}

/// A throwaway PostgreSQL 15 cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// Port on 127.0.0.1.
    pub port: u16,
    wal_level: String,
}

impl PgCluster {
    /// initdb + start with `wal_level=logical`.
    pub fn start() -> Self {
        Self::start_with_wal_level("logical")
    }

    /// initdb + start with the given `wal_level`.
    pub fn start_with_wal_level(wal_level: &str) -> Self {
        let dir = temp_dir("tidelink-pg-");
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .args([
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .expect("run initdb (is postgresql-15 installed? run scripts/install-deps.sh)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let cluster = Self {
            dir,
            port,
            wal_level: wal_level.to_string(),
        };
        cluster.pg_ctl_start();
        cluster
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`).
    pub fn crash(&self) {
        let status = pg_command("pg_ctl")
            .args(["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl stop");
        assert!(status.success(), "pg_ctl stop failed");
    }

    /// Turns TLS on with this certificate and key (clients may still connect without
    /// it), then restarts the server.
    pub fn enable_tls(&self, cert: &Path, key: &Path) {
        let data = self.dir.path().join("data");
        std::fs::copy(cert, data.join("server.crt")).expect("copy the server certificate");
        std::fs::copy(key, data.join("server.key")).expect("copy the server key");
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("postgresql.conf");
        std::io::Write::write_all(
            &mut conf,
            b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )
        .expect("write postgresql.conf");
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:", &data.display().to_string()])
                .status();
        }
        let _ = Command::new("chmod")
            .args(["600", &data.join("server.key").display().to_string()])
            .status();
        self.crash();
        self.restart();
    }

    /// Starts the server again after [`PgCluster::crash`] (crash recovery included).
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    fn pg_ctl_start(&self) {
        let wal_level = &self.wal_level;
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level={wal_level} \
             -c max_wal_senders=10 -c max_replication_slots=10 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let status = pg_command("pg_ctl")
            .args([
                "-D",
                &self.data_dir(),
                "-l",
                &log.display().to_string(),
                "-w",
                "-o",
                &options,
                "start",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(
            status.success(),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Connection string for a database.
    pub fn dsn(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A connected client.
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.dsn(database), tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Creates a database.
    pub async fn create_database(&self, name: &str) {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .args(["-D", &self.data_dir(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The `tidelink` binary, built by `make test` (or `cargo build`) before the tests run.
pub fn tidelink_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TIDELINK_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("debug/tidelink");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p tidelink` first (make test does)",
        path.display()
    );
    path
}

/// A running `tidelink` process with its output captured to a file.
pub struct Daemon {
    child: Child,
    /// Captured stdout and stderr.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `tidelink <args>`; output goes to `log`.
    pub fn start(args: &[&str], log: &Path) -> Self {
        Self::start_with_env(args, log, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        let child = Command::new(tidelink_binary())
            .args(args)
            .env(
                "TIDELINK_LOG",
                std::env::var("TIDELINK_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("start tidelink");
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            // Finely: `bench` times short runs (a backfill) by this wait.
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 250 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads `read` every 500 ms, at most `tries` times, until it returns `expected`; returns
/// the last reading, for the caller's assertion and its message.
pub async fn read_until<T: PartialEq>(
    expected: &T,
    tries: u32,
    mut read: impl AsyncFnMut() -> T,
) -> T {
    let mut last = read().await;
    for _ in 1..tries {
        if last == *expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = read().await;
    }
    last
}

/// Every row of a table as text, ordered by `order_by`: the exact comparison of source and
/// target.
pub async fn table_rows(
    client: &tokio_postgres::Client,
    table: &str,
    order_by: &str,
) -> Vec<String> {
    first_column(
        client,
        &format!("SELECT t::text FROM {table} t ORDER BY {order_by}"),
    )
    .await
    .unwrap_or_else(|e| panic!("reading {table}: {e}"))
}

/// The first column of every row `sql` returns, in order.
pub async fn first_column<T: tokio_postgres::types::FromSqlOwned>(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<T>, tokio_postgres::Error> {
    Ok(client
        .query(sql, &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Row count and an md5 over the ordered rows; `(-1, "missing")` while the table does
/// not exist.
pub async fn table_digest(
    client: &tokio_postgres::Client,
    table: &str,
    order_by: &str,
) -> (i64, String) {
    let result = client
        .query_one(
            &format!("SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY {order_by})), '') FROM {table} t"),
            &[],
        )
        .await;
    match result {
        Ok(row) => (row.get(0), row.get(1)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            (-1, "missing".into())
        }
        Err(e) => panic!("digest of {table}: {e}"),
    }
}

/// A source cluster, a target cluster, a broker and a working directory: what a
/// PostgreSQL → PostgreSQL pipeline test needs.
pub struct PgPipeline {
    /// Source cluster (database `app`).
    pub source: PgCluster,
    /// Target cluster (database `replica`).
    pub target: PgCluster,
    /// Broker.
    pub broker: Broker,
    /// Scratch directory for config and logs.
    pub work: tempfile::TempDir,
    /// Metrics port of the first daemon.
    pub metrics_port: u16,
    /// Bootstrap servers the pipeline uses; the harness broker's unless replaced.
    pub bootstrap: String,
}

impl PgPipeline {
    /// Starts everything and creates `schema_sql` in both databases.
    pub async fn start(schema_sql: &str) -> Self {
        Self::start_with(schema_sql, schema_sql).await
    }

    /// Starts everything with different source and target schemas.
    pub async fn start_with(source_sql: &str, target_sql: &str) -> Self {
        Self::start_on(Broker::start(), source_sql, target_sql).await
    }

    /// Starts the databases beside `broker` (a cluster, or one with TLS or SASL).
    pub async fn start_on(broker: Broker, source_sql: &str, target_sql: &str) -> Self {
        let source = PgCluster::start();
        let target = PgCluster::start();
        source.create_database("app").await;
        target.create_database("replica").await;
        source
            .client("app")
            .await
            .batch_execute(source_sql)
            .await
            .expect("source schema");
        target
            .client("replica")
            .await
            .batch_execute(target_sql)
            .await
            .expect("target schema");
        Self {
            bootstrap: broker.bootstrap(),
            source,
            target,
            broker,
            work: tempfile::tempdir().expect("work dir"),
            metrics_port: free_port(),
        }
    }

    /// Writes a pipeline configuration and returns its path. `sink_extra` is appended to
    /// the sink (indented YAML lines).
    pub fn write_config(&self, name: &str, sink_extra: &str) -> PathBuf {
        let yaml = format!(
            "metrics:\n  listen: 127.0.0.1:{metrics}\npipelines:\n  - name: it\n    source:\n      postgres:\n        dsn: {src}\n        tables: [public.*]\n        status_interval_ms: 500\n    kafka:\n      brokers: {brokers}\n      topic_prefix: it\n      partitions: 4\n    sinks:\n      - name: replica\n        batch_size: 2000\n        postgres:\n          dsn: {dst}\n          record_history: true\n{sink_extra}",
            metrics = self.metrics_port,
            src = self.source.dsn("app"),
            brokers = self.bootstrap,
            dst = self.target.dsn("replica"),
        );
        let path = self.work.path().join(name);
        std::fs::write(&path, yaml).expect("write config");
        path
    }

    /// Adds librdkafka `properties` (a YAML flow mapping such as `{ security.protocol: SSL }`)
    /// to the `kafka` section of the configuration at `config`.
    pub fn set_kafka_properties(&self, config: &Path, properties: &str) {
        let yaml = std::fs::read_to_string(config).expect("config");
        let yaml = yaml.replace(
            "      partitions: 4\n",
            &format!("      partitions: 4\n      properties: {properties}\n"),
        );
        std::fs::write(config, yaml).expect("write config");
    }

    /// Writes a configuration like [`PgPipeline::write_config`] whose pipeline takes no
    /// snapshot of existing rows (`snapshot: never`), for tests that count messages exactly.
    pub fn write_config_without_snapshot(&self, name: &str, sink_extra: &str) -> PathBuf {
        let path = self.write_config(name, sink_extra);
        let yaml = std::fs::read_to_string(&path).expect("config");
        std::fs::write(
            &path,
            yaml.replace("  - name: it\n", "  - name: it\n    snapshot: never\n"),
        )
        .expect("write config");
        path
    }

    /// A copy of `config` named `name` whose metrics listen on a port of their own, for a
    /// second process (`--role sink`) beside the first; returns its path and port.
    pub fn copy_with_own_metrics_port(&self, config: &Path, name: &str) -> (PathBuf, u16) {
        copy_config_with_metrics_port(config, self.metrics_port, &self.work.path().join(name))
    }

    /// Runs `tidelink verify -c <config> --pipeline <pipeline> <extra…>` to its end (up to
    /// two minutes); returns its exit code and output. Logs to `<work>/<log>`.
    pub fn verify(
        &self,
        config: &Path,
        pipeline: &str,
        extra: &[&str],
        log: &str,
    ) -> (Option<i32>, String) {
        run_verify(config, pipeline, extra, &self.work.path().join(log))
    }

    /// Starts `tidelink run` on a config with extra arguments; logs to `<work>/<log>`.
    pub fn run(&self, config: &Path, extra: &[&str], log: &str) -> Daemon {
        let config = config.display().to_string();
        let mut args = vec!["run", "-c", config.as_str()];
        args.extend_from_slice(extra);
        Daemon::start(&args, &self.work.path().join(log))
    }

    /// Waits until `/readyz` on the pipeline's metrics port answers 200; on timeout fails
    /// with the logs.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http_get(self.metrics_port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            assert!(
                Instant::now() < deadline,
                "tidelink did not become ready:\n{}",
                self.logs_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the source of pipeline `it` reports itself up on `/metrics` (for
    /// processes whose `/readyz` also covers pipelines that are meant to fail).
    pub async fn wait_source_streaming(&self) {
        let port = self.metrics_port;
        wait_until(
            Duration::from_secs(60),
            "the source of pipeline it streams",
            || async move {
                http_get(port, "/metrics").await.is_some_and(|m| {
                    m.contains("tidelink_component_up{component=\"source\",pipeline=\"it\"} 1")
                })
            },
        )
        .await;
    }

    /// Starts `tidelink run` and waits until `/readyz` answers 200 (source streaming and
    /// sink worker in its group): changes committed from then on are captured.
    pub async fn run_ready(&self, config: &Path, log: &str) -> Daemon {
        let daemon = self.run(config, &[], log);
        self.wait_ready().await;
        daemon
    }

    /// Waits until every listed table has the same rows on both sides.
    pub async fn wait_in_sync(&self, tables: &[(&str, &str)], timeout: Duration) {
        let source = self.source.client("app").await;
        let target = self.target.client("replica").await;
        let deadline = Instant::now() + timeout;
        loop {
            let mut equal = true;
            let mut report = String::new();
            for (table, order_by) in tables {
                let s = table_digest(&source, table, order_by).await;
                let t = table_digest(&target, table, order_by).await;
                if s != t {
                    equal = false;
                    report.push_str(&match t.0 {
                        -1 => format!("{table}: source {} rows, no target table", s.0),
                        n => format!("{table}: source {} rows, target {n} rows", s.0),
                    });
                    if Instant::now() >= deadline && t.0 >= 0 {
                        let (sr, tr) = (
                            table_rows(&source, table, order_by).await,
                            table_rows(&target, table, order_by).await,
                        );
                        if let Some((a, b)) = sr.iter().zip(&tr).find(|(a, b)| a != b) {
                            report.push_str(&format!(
                                "; first difference:\n  source: {a}\n  target: {b}\n"
                            ));
                        }
                    }
                    report.push_str("; ");
                }
            }
            if equal {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "target did not catch up within {timeout:?}: {report}\n{}",
                self.logs_tail()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The last lines of every log in the work directory, for failure messages.
    pub fn logs_tail(&self) -> String {
        // Keep the full logs where a developer can read them after the test is gone.
        let keep = workspace_root()
            .join("target/test-logs")
            .join(self.work.path().file_name().unwrap_or_default());
        let _ = std::fs::create_dir_all(&keep);
        let mut out = format!("full logs kept in {}\n", keep.display());
        if let Ok(entries) = std::fs::read_dir(self.work.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let _ = std::fs::write(keep.join(entry.file_name()), &text);
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(40)..];
                    out.push_str(&format!(
                        "--- {} ---\n{}\n",
                        path.display(),
                        tail.join("\n")
                    ));
                }
            }
        }
        out
    }

    /// Waits until the sink has applied every message stored in `topics` (up to a minute),
    /// then returns (history rows, distinct messages in the history, messages to apply:
    /// those stored, less the ones the sink skipped as changes a source published again
    /// after a restart). Equal data is not enough to stop waiting: snapshot messages that
    /// change nothing may still be on their way.
    pub async fn audit_applied(&self, topics: &[&str]) -> (i64, i64, i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let to_apply = self.messages_in_topics(topics) - self.replays_skipped() as i64;
            let (recorded, distinct) = self.history_audit().await;
            if recorded >= to_apply || Instant::now() >= deadline {
                return (recorded, distinct, to_apply);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Changes the sink workers skipped as already applied (a source published them again
    /// after a restart): the sum of `skipped=N` in every log of the work directory.
    pub fn replays_skipped(&self) -> u64 {
        let mut total = 0;
        if let Ok(entries) = std::fs::read_dir(self.work.path()) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    total += replays_skipped_in(
                        &std::fs::read_to_string(entry.path()).unwrap_or_default(),
                    );
                }
            }
        }
        total
    }

    /// Audit of the sink's history: (rows recorded, distinct messages recorded).
    pub async fn history_audit(&self) -> (i64, i64) {
        let row = self
            .target
            .client("replica")
            .await
            .query_one(
                "SELECT count(*), count(DISTINCT (topic, partition, kafka_offset)) FROM tidelink.history",
                &[],
            )
            .await
            .expect("history audit");
        (row.get(0), row.get(1))
    }

    /// Messages stored in the pipeline's table topics (sum of high watermarks).
    pub fn messages_in_topics(&self, topics: &[&str]) -> i64 {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", "tidelink-test-watermarks")
            .create()
            .expect("watermark consumer");
        let mut total = 0;
        for topic in topics {
            for partition in 0..4 {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(10))
                    .expect("watermarks");
                total += high - low;
            }
        }
        total
    }
}

/// Runs `tidelink verify -c <config> --pipeline <pipeline> <extra…>` to its end (up to two
/// minutes), logging to `log`; returns its exit code and output.
pub fn run_verify(
    config: &Path,
    pipeline: &str,
    extra: &[&str],
    log: &Path,
) -> (Option<i32>, String) {
    let config = config.display().to_string();
    let mut args = vec!["verify", "-c", config.as_str(), "--pipeline", pipeline];
    args.extend_from_slice(extra);
    let mut run = Daemon::start(&args, log);
    let status = run.wait(Duration::from_secs(120)).expect("verify ends");
    (status.code(), run.output())
}

/// Sum of `skipped=N` in a log's lines about changes a source published again.
pub fn replays_skipped_in(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("published again after a restart"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("skipped="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// The sum of every series of the metric `name` in a `/metrics` text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP GET on 127.0.0.1; the whole response, or `None` if nothing answered.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

/// Copies the config at `config` to `to`, moving its metrics listener from port `from` to a
/// free one (for a second daemon on the same config); returns the copy and the new port.
pub fn copy_config_with_metrics_port(config: &Path, from: u16, to: &Path) -> (PathBuf, u16) {
    let port = free_port();
    std::fs::write(
        to,
        std::fs::read_to_string(config).expect("config").replace(
            &format!("listen: 127.0.0.1:{from}"),
            &format!("listen: 127.0.0.1:{port}"),
        ),
    )
    .expect("write config");
    (to.to_path_buf(), port)
}
