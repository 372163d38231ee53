//! Debezium beside tidelink: a Kafka Connect standalone worker running one of Debezium's
//! source connectors into a test's broker, from the classpaths scripts/install-debezium.sh
//! resolves (Debezium 3.6 for PostgreSQL; Debezium 2.6's MySQL connector with
//! `connector.adapter=mariadb` for MariaDB, the last one that reads MariaDB's binlog).

use crate::mariadb::MariaDb;
use crate::{installed_by, Broker, PgCluster};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The directory scripts/install-debezium.sh fills: `lib/` and `lib-mariadb/` of jars.
pub fn debezium_home() -> &'static PathBuf {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| installed_by("install-debezium.sh", "Debezium"))
}

/// How Connect's JSON converter writes keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonSchemas {
    /// `{"schema": …, "payload": …}`: every field's type travels with the message.
    Enabled,
    /// The bare payload (`schemas.enable=false`).
    Disabled,
}

/// A Debezium source connector's configuration.
pub struct DebeziumSource {
    classpath: &'static str,
    properties: Vec<(String, String)>,
}

impl DebeziumSource {
    /// Debezium's PostgreSQL connector over `pgoutput` on `database`, topics
    /// `<prefix>.<schema>.<table>`, for the tables of `tables` (`public.items,public.other`).
    pub fn postgres(source: &PgCluster, database: &str, prefix: &str, tables: &str) -> Self {
        let properties = [
            (
                "connector.class",
                "io.debezium.connector.postgresql.PostgresConnector",
            ),
            ("plugin.name", "pgoutput"),
            ("database.hostname", "127.0.0.1"),
            ("database.port", &source.port.to_string()),
            ("database.user", "postgres"),
            ("database.password", ""),
            ("database.dbname", database),
            ("topic.prefix", prefix),
            ("table.include.list", tables),
            ("slot.name", &format!("{prefix}_debezium")),
            ("publication.name", &format!("{prefix}_debezium")),
            ("publication.autocreate.mode", "filtered"),
        ];
        Self {
            classpath: "lib",
            properties: owned(&properties),
        }
    }

    /// Debezium's MySQL connector in its MariaDB mode on the databases of `databases`,
    /// topics `<prefix>.<database>.<table>`; its schema history in `history`.
    pub fn mariadb(source: &MariaDb, prefix: &str, databases: &str, history: &Path) -> Self {
        let properties = [
            (
                "connector.class",
                "io.debezium.connector.mysql.MySqlConnector",
            ),
            ("connector.adapter", "mariadb"),
            ("database.protocol", "jdbc:mariadb"),
            ("database.jdbc.driver", "org.mariadb.jdbc.Driver"),
            ("database.ssl.mode", "disabled"),
            ("database.hostname", "127.0.0.1"),
            ("database.port", &source.port.to_string()),
            ("database.user", "root"),
            ("database.password", ""),
            ("database.server.id", "5400"),
            ("database.include.list", databases),
            ("topic.prefix", prefix),
            (
                "schema.history.internal",
                "io.debezium.storage.file.history.FileSchemaHistory",
            ),
            (
                "schema.history.internal.file.filename",
                &history.display().to_string(),
            ),
        ];
        Self {
            classpath: "lib-mariadb",
            properties: owned(&properties),
        }
    }

    /// Sets (or overrides) a connector property: `decimal.handling.mode`, say.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.properties.retain(|(k, _)| k != key);
        self.properties.push((key.into(), value.into()));
        self
    }
}

fn owned(properties: &[(&str, &str)]) -> Vec<(String, String)> {
    properties
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A Kafka Connect standalone worker running one Debezium connector; killed on drop.
pub struct KafkaConnect {
    dir: tempfile::TempDir,
    child: Child,
}

impl KafkaConnect {
    /// Starts the worker on `broker` with the connector, its JSON converter writing
    /// `schemas`; offsets flushed every second into the worker's own file.
    pub fn start(broker: &Broker, connector: DebeziumSource, schemas: JsonSchemas) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tidelink-connect-")
            .tempdir()
            .expect("temporary directory");
        let schemas = (schemas == JsonSchemas::Enabled).to_string();
        let worker = [
            ("bootstrap.servers", broker.bootstrap()),
            (
                "key.converter",
                "org.apache.kafka.connect.json.JsonConverter".into(),
            ),
            (
                "value.converter",
                "org.apache.kafka.connect.json.JsonConverter".into(),
            ),
            ("key.converter.schemas.enable", schemas.clone()),
            ("value.converter.schemas.enable", schemas),
            (
                "offset.storage.file.filename",
                dir.path().join("offsets").display().to_string(),
            ),
            ("offset.flush.interval.ms", "1000".into()),
            // The REST API on a port of the kernel's choosing: nothing here uses it.
            ("listeners", "http://127.0.0.1:0".into()),
        ];
        write_properties(&dir.path().join("worker.properties"), &worker);
        // Connect creates the topics it writes itself (through the admin API) rather than
        // leaving that to the broker's auto-creation, which tansu does not do.
        let mut connector_properties = owned(&[
            ("name", "debezium"),
            ("topic.creation.default.replication.factor", "-1"),
            ("topic.creation.default.partitions", "1"),
        ]);
        connector_properties.extend(connector.properties);
        write_properties(
            &dir.path().join("connector.properties"),
            &connector_properties,
        );
        std::fs::write(
            dir.path().join("log4j.properties"),
            "log4j.rootLogger=INFO, stdout\n\
             log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n\
             log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n\
             log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n",
        )
        .expect("log4j.properties");
        let log = std::fs::File::create(dir.path().join("connect.log")).expect("connect.log");
        let classpath = debezium_home().join(connector.classpath).join("*");
        // The heap connect-standalone.sh gives a worker unless told otherwise.
        let child = Command::new("java")
            .args(["-Xms256m", "-Xmx2g"])
            .arg("-cp")
            .arg(classpath)
            .arg(format!(
                "-Dlog4j.configuration=file:{}",
                dir.path().join("log4j.properties").display()
            ))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(dir.path().join("worker.properties"))
            .arg(dir.path().join("connector.properties"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start Kafka Connect (java)");
        Self { dir, child }
    }

    /// The worker's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("connect.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the worker's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.logs(), lines)
    }

    /// The worker's process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the connector has finished its snapshot and streams; panics with the
    /// worker's log when it stopped or did not get there in time.
    pub fn wait_streaming(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if logs.contains("Starting streaming") || logs.contains("Connected to binlog") {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "Debezium did not start streaming ({exited:?}):\n{}",
                tail(&logs, 60)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for KafkaConnect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_properties<K: AsRef<str>, V: AsRef<str>>(path: &Path, properties: &[(K, V)]) {
    let text: String = properties
        .iter()
        .map(|(k, v)| format!("{}={}\n", k.as_ref(), v.as_ref()))
        .collect();
    std::fs::write(path, text).expect("write properties");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
