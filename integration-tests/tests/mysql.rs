//! MySQL-family pipelines end to end against real servers: throwaway MariaDB 10.11
//! instances, PostgreSQL 15 clusters and a tansu broker. Every test compares the target's
//! rows with the source's (or with the exact values expected across engines).

use std::path::PathBuf;
use std::time::Duration;
use tidelink_integration_tests::mariadb::{mariadb_rows, MariaDb};
use tidelink_integration_tests::{free_port, http_get, Broker, Daemon, PgCluster};

/// The pieces of one test: a source, a target of either engine, a broker.
struct Setup {
    source: MariaDb,
    broker: Broker,
    work: tempfile::TempDir,
    metrics_port: u16,
}

impl Setup {
    fn start() -> Self {
        Self {
            source: MariaDb::start(1),
            broker: Broker::start(),
            work: tempfile::tempdir().expect("work dir"),
            metrics_port: free_port(),
        }
    }

    fn config(&self, source: &str, sink: &str, extra: &str) -> PathBuf {
        let yaml = format!(
            "metrics:\n  listen: 127.0.0.1:{metrics}\npipelines:\n  - name: my\n{extra}    source:\n{source}    kafka:\n      brokers: {brokers}\n      topic_prefix: my\n      partitions: 4\n    sinks:\n      - name: target\n        batch_size: 2000\n{sink}",
            metrics = self.metrics_port,
            brokers = self.broker.bootstrap(),
        );
        let path = self.work.path().join("pipeline.yaml");
        std::fs::write(&path, yaml).expect("write config");
        path
    }

    fn mysql_source(&self) -> String {
        format!(
            "      mysql:\n        dsn: {}\n        tables: [shop.*]\n        heartbeat_ms: 500\n",
            self.source.dsn("shop")
        )
    }

    fn run(&self, config: &std::path::Path, log: &str) -> Daemon {
        let config = config.display().to_string();
        Daemon::start(&["run", "-c", &config], &self.work.path().join(log))
    }

    async fn wait_ready(&self) {
        let port = self.metrics_port;
        let logs = self.logs();
        let mut tries = 0;
        while !http_get(port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            tries += 1;
            assert!(
                tries < 300,
                "tidelink did not become ready:\n{logs}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self) -> String {
        let keep = tidelink_integration_tests::workspace_root()
            .join("target/test-logs")
            .join(self.work.path().file_name().unwrap_or_default());
        let _ = std::fs::create_dir_all(&keep);
        let mut out = format!("full logs kept in {}\n", keep.display());
        for entry in std::fs::read_dir(self.work.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let _ = std::fs::write(keep.join(entry.file_name()), &text);
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "--- {} ---\n{}\n",
                    path.display(),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                ));
            }
        }
        out
    }
}

const TYPES_TABLE: &str = "CREATE TABLE shop.types (
    id int NOT NULL PRIMARY KEY,
    t_tiny tinyint, t_tiny_u tinyint unsigned, t_small smallint, t_small_u smallint unsigned,
    t_medium mediumint, t_medium_u mediumint unsigned, t_int int, t_int_u int unsigned,
    t_big bigint, t_big_u bigint unsigned,
    t_dec decimal(20,6), t_float float, t_double double, t_bit bit(10),
    t_date date, t_time time(3), t_datetime datetime(6), t_ts timestamp(3) NULL, t_year year,
    t_char char(5), t_varchar varchar(40), t_text text, t_latin varchar(20) CHARACTER SET latin1,
    t_binary binary(4), t_blob blob, t_enum enum('small','medium','large'), t_set set('red','green','blue'),
    t_json json
) ENGINE=InnoDB";

const TYPES_ROWS: &str = "INSERT INTO shop.types VALUES
 (1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
  -9223372036854775808, 18446744073709551615,
  '-12345678901234.123456', 1.5, 2.25, b'1010101010',
  '2024-02-29', '-12:34:56.789', '2024-02-29 23:59:59.123456', '2024-03-01 01:02:03.456', 2024,
  'ab', 'héllo wörld ✓ 🐬', 'long text', 'café €',
  X'00FF1020', X'DEADBEEF', 'medium', 'red,blue',
  '{\"a\": [1, 2, {\"b\": null}]}');
INSERT INTO shop.types (id) VALUES (2);
INSERT INTO shop.types VALUES
 (3, 127, 0, 32767, 0, 8388607, 0, 2147483647, 0, 9223372036854775807, 0,
  '0.000001', -0.5, 1e300, b'0', '1000-01-01', '838:59:59', '1000-01-01 00:00:00', '1970-01-01 00:00:01', 1901,
  '', '', '', '', X'00000000', X'', 'small', '', '[]')";

/// MariaDB → PostgreSQL: every listed type arrives with its exact value, inserted while
/// streaming and then updated; a row deleted on the source is deleted on the target.
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_to_postgres_types_round_trip() {
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup.source.execute("shop", TYPES_TABLE).await;
    let target = PgCluster::start();
    target.create_database("replica").await;
    let sink = format!(
        "        postgres:\n          dsn: {}\n          create_tables: true\n",
        target.dsn("replica")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "");
    let _daemon = setup.run(&config, "run.log");
    setup.wait_ready().await;
    setup.source.execute("shop", TYPES_ROWS).await;
    setup
        .source
        .execute("shop", "UPDATE shop.types SET t_varchar = 'updated ✓', t_big_u = 18446744073709551614 WHERE id = 3;\nINSERT INTO shop.types (id, t_int) VALUES (4, 4);\nDELETE FROM shop.types WHERE id = 4")
        .await;
    let client = target.client("replica").await;
    for _ in 0..360 {
        let arrived = client
            .query_one(
                "SELECT count(*) FROM shop.types WHERE id <> 3 OR t_varchar = 'updated ✓'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 3);
        if arrived {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows: Vec<String> = client
        .query("SELECT t::text FROM shop.types t ORDER BY id", &[])
        .await
        .expect("read target")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        vec![
            "(1,-128,255,-32768,65535,-8388608,16777215,-2147483648,4294967295,-9223372036854775808,18446744073709551615,-12345678901234.123456,1.5,2.25,1010101010,2024-02-29,-12:34:56.789,\"2024-02-29 23:59:59.123456\",\"2024-03-01 01:02:03.456+00\",2024,\"ab   \",\"héllo wörld ✓ 🐬\",\"long text\",\"café €\",\"\\\\x00ff1020\",\"\\\\xdeadbeef\",medium,\"red,blue\",\"{\"\"a\"\": [1, 2, {\"\"b\"\": null}]}\")".to_string(),
            "(2,,,,,,,,,,,,,,,,,,,,,,,,,,,,)".to_string(),
            "(3,127,0,32767,0,8388607,0,2147483647,0,9223372036854775807,18446744073709551614,0.000001,-0.5,1e+300,0000000000,1000-01-01,838:59:59,\"1000-01-01 00:00:00\",\"1970-01-01 00:00:01+00\",1901,\"     \",\"updated ✓\",\"\",\"\",\"\\\\x00000000\",\"\\\\x\",small,\"\",[])".to_string(),
        ],
        "{}",
        setup.logs()
    );
}
