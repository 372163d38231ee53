//! MySQL-family pipelines end to end against real servers: throwaway MariaDB 10.11
//! instances, PostgreSQL 15 clusters and a broker (Apache Kafka unless `TIDELINK_BROKER=tansu`). Every test compares the target's
//! rows with the source's (or with the exact values expected across engines).

use std::path::PathBuf;
use std::time::Duration;
use tidelink_integration_tests::mariadb::{mariadb_rows, MariaDb, TYPES_ROWS, TYPES_TABLE};
use tidelink_integration_tests::{
    first_column, free_port, http_get, read_until, run_verify, Broker, Daemon, PgCluster,
};

/// The pieces of one test: a source, a target of either engine, a broker.
struct Setup {
    source: MariaDb,
    broker: Broker,
    work: tempfile::TempDir,
    metrics_port: u16,
}

impl Setup {
    /// A source that logs full row metadata (`binlog_row_metadata=FULL`): column names,
    /// so rows are read by name after a later ALTER.
    fn start_with_full_row_metadata() -> Self {
        Self {
            source: MariaDb::start_with(
                1,
                &[
                    "--binlog-format=ROW",
                    "--binlog-row-image=FULL",
                    "--binlog-row-metadata=FULL",
                ],
            ),
            broker: Broker::start(),
            work: tempfile::tempdir().expect("work dir"),
            metrics_port: free_port(),
        }
    }

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

    /// `backfill --direct SINK` of pipeline `my` in chunks of `chunk_size` rows: how it
    /// exited and what it logged.
    fn direct_backfill(
        &self,
        config: &std::path::Path,
        chunk_size: usize,
        sink: &str,
        log: &str,
    ) -> (std::process::ExitStatus, String) {
        let config = config.display().to_string();
        let chunk_size = chunk_size.to_string();
        let mut run = Daemon::start(
            &[
                "backfill",
                "-c",
                &config,
                "--pipeline",
                "my",
                "--chunk-size",
                &chunk_size,
                "--direct",
                sink,
            ],
            &self.work.path().join(log),
        );
        let status = run
            .wait(Duration::from_secs(120))
            .expect("the direct load finishes");
        (status, run.output())
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

    /// Whether the source has stored (so Kafka has acknowledged) a position at the end of
    /// the server's binlog, as `tidelink status` reports both.
    fn published_to_the_binlog_end(&self) -> bool {
        let config = self.work.path().join("pipeline.yaml");
        let Ok(out) = std::process::Command::new(tidelink_integration_tests::tidelink_binary())
            .args(["status", "-c", &config.display().to_string(), "--json"])
            .output()
        else {
            return false;
        };
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        let source = &status["pipelines"][0]["source"];
        // Stored: `file:pos (gtid …)`; current: `file:pos`.
        let stored = source["stored_position"]
            .as_str()
            .and_then(|p| p.split(' ').next());
        stored.is_some() && stored == source["current_position"].as_str()
    }

    /// Waits (up to a minute) until the pipeline's snapshot is complete, the source has
    /// published every change up to the end of the server's binlog, and the sink has
    /// recorded, as `recorded` reads it from the target, a next offset at the high watermark
    /// of every partition of `topic`. Equal rows are not enough before the target is changed
    /// on purpose: a snapshot row or a streamed change may still be on its way, and would
    /// undo the change. (The snapshot copies the final rows, so the target can equal the
    /// source before the streamed changes are in Kafka at all.)
    async fn wait_all_applied<F, Fut>(&self, topic: &str, mut recorded: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = i64>,
    {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap())
            .set("group.id", "tidelink-test-watermarks")
            .create()
            .expect("watermark consumer");
        for _ in 0..120 {
            let run_log =
                std::fs::read_to_string(self.work.path().join("run.log")).unwrap_or_default();
            if run_log.contains("snapshot complete") && self.published_to_the_binlog_end() {
                let metadata = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(10))
                    .expect("topic metadata");
                let partitions: Vec<i32> = metadata
                    .topics()
                    .iter()
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect();
                let stored: i64 = partitions
                    .into_iter()
                    .map(|partition| {
                        consumer
                            .fetch_watermarks(topic, partition, Duration::from_secs(10))
                            .expect("watermarks")
                            .1
                    })
                    .sum();
                if recorded().await >= stored {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "the sink did not apply every message of {topic}\n{}",
            self.logs()
        );
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
    let rows: Vec<String> = first_column(&client, "SELECT t::text FROM shop.types t ORDER BY id")
        .await
        .expect("read target");
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
    let pg = &client;
    setup
        .wait_all_applied("my.shop.types", move || {
            pg_recorded_offsets(pg, "my.shop.types")
        })
        .await;
    // `tidelink verify` agrees across engines, then finds each kind of difference.
    let verify = |log: &str| run_verify(&config, "my", &[], &setup.work.path().join(log));
    let (code, output) = verify("verify-1.log");
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("equal      shop.types → shop.types (target): 3 rows"),
        "{output}"
    );
    client
        .batch_execute(
            "UPDATE shop.types SET t_varchar = 'drift' WHERE id = 1; DELETE FROM shop.types WHERE id = 2; \
             INSERT INTO shop.types (id) VALUES (99)",
        )
        .await
        .expect("drift");
    let (code, output) = verify("verify-2.log");
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("1 missing, 1 extra, 1 different"),
        "{output}"
    );
    assert!(output.contains("column t_varchar"), "{output}");
}

/// A small deterministic random generator for workloads.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below.max(1)
    }
}

const ORDERS_MARIADB: &str = "CREATE TABLE shop.orders (
    id int NOT NULL PRIMARY KEY,
    customer varchar(40) NOT NULL,
    amount decimal(12,2) NOT NULL,
    status enum('new','paid','shipped') NOT NULL,
    updated datetime(6) NOT NULL
) ENGINE=InnoDB";

/// One round of the workload on MariaDB: a transaction inserting 50 rows, updating up to
/// 30 and deleting up to 5. Returns the next free id.
async fn mariadb_round(
    conn: &mut mysql_async::Conn,
    rng: &mut Lcg,
    next_id: u64,
    with_note: bool,
) -> u64 {
    use mysql_async::prelude::Queryable;
    let mut sql = String::from("START TRANSACTION;");
    let rows: Vec<String> = (next_id..next_id + 50)
        .map(|id| {
            let note = if with_note {
                format!(", 'note {id} ✓'")
            } else {
                String::new()
            };
            format!(
                "({id}, 'customer {}', {}.{:02}, 'new', NOW(6){note})",
                rng.next(1000),
                rng.next(10_000),
                rng.next(100)
            )
        })
        .collect();
    let columns = if with_note {
        "id, customer, amount, status, updated, note"
    } else {
        "id, customer, amount, status, updated"
    };
    sql.push_str(&format!(
        "INSERT INTO shop.orders ({columns}) VALUES {};",
        rows.join(", ")
    ));
    let updated: Vec<String> = (0..30)
        .map(|_| (1 + rng.next(next_id)).to_string())
        .collect();
    sql.push_str(&format!(
        "UPDATE shop.orders SET amount = amount + 1, status = ELT(1 + (id + {}) % 3, 'new', 'paid', 'shipped'), updated = NOW(6) WHERE id IN ({});",
        rng.next(3),
        updated.join(", ")
    ));
    let deleted: Vec<String> = (0..5)
        .map(|_| (1 + rng.next(next_id)).to_string())
        .collect();
    sql.push_str(&format!(
        "DELETE FROM shop.orders WHERE id IN ({});",
        deleted.join(", ")
    ));
    sql.push_str("COMMIT");
    conn.query_drop(sql).await.expect("workload round");
    next_id + 50
}

async fn mariadb_orders(conn: &mut mysql_async::Conn) -> Vec<String> {
    use mysql_async::prelude::Queryable;
    conn.query(
        "SELECT CONCAT_WS('|', id, customer, amount, status, DATE_FORMAT(updated, '%Y-%m-%d %H:%i:%s.%f'), IFNULL(note, '-')) FROM shop.orders ORDER BY id",
    )
    .await
    .expect("read source orders")
}

/// The sum of the next offsets a PostgreSQL sink has recorded for `topic`.
async fn pg_recorded_offsets(client: &tokio_postgres::Client, topic: &str) -> i64 {
    client
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM tidelink.offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .map_or(0, |r| r.get(0))
}

/// A PostgreSQL cluster whose database `replica` has the `shop.orders` table that MariaDB's
/// `shop.orders` goes into, and a client of that database.
async fn postgres_orders_target() -> (PgCluster, tokio_postgres::Client) {
    let target = PgCluster::start();
    target.create_database("replica").await;
    let client = target.client("replica").await;
    client
        .batch_execute(
            "CREATE SCHEMA shop; CREATE TABLE shop.orders (id integer PRIMARY KEY, customer varchar(40) NOT NULL, \
             amount numeric(12,2) NOT NULL, status text NOT NULL, updated timestamp(6) NOT NULL)",
        )
        .await
        .expect("target table");
    (target, client)
}

async fn postgres_orders(client: &tokio_postgres::Client) -> Vec<String> {
    first_column(
        client,
        "SELECT concat_ws('|', id, customer, amount, status, to_char(updated, 'YYYY-MM-DD HH24:MI:SS.US'), coalesce(note, '-')) FROM shop.orders ORDER BY id",
    )
    .await
    .unwrap_or_default()
}

/// MariaDB → PostgreSQL under a 50k-change workload: existing rows are snapshotted, the
/// daemon is killed with -9 mid-workload and restarted from its stored position, and an
/// `ALTER TABLE … ADD COLUMN` lands mid-stream. The target ends equal to the source and
/// the rows after the ALTER carry the new column.
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_to_postgres_workload_kill9_and_alter() {
    use mysql_async::prelude::Queryable;
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup.source.execute("shop", ORDERS_MARIADB).await;
    let mut conn = setup.source.conn("shop").await;
    let mut rng = Lcg(7);
    let mut next_id = 1;
    // Rows that exist before the pipeline: the initial snapshot copies them.
    for _ in 0..40 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    let (target, client) = postgres_orders_target().await;
    let sink = format!(
        "        postgres:\n          dsn: {}\n          record_history: true\n",
        target.dsn("replica")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "");
    let daemon = setup.run(&config, "first.log");
    setup.wait_ready().await;
    for _ in 0..250 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    daemon.kill9();
    for _ in 0..100 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    let _daemon = setup.run(&config, "second.log");
    for _ in 0..100 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    // The operator adds the column on the target first, then on the source.
    client
        .batch_execute("ALTER TABLE shop.orders ADD COLUMN note text")
        .await
        .expect("target alter");
    conn.query_drop("ALTER TABLE shop.orders ADD COLUMN note varchar(60) NULL")
        .await
        .expect("source alter");
    for _ in 0..150 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, true).await;
    }
    let expected = mariadb_orders(&mut conn).await;
    assert!(
        expected.len() > 20_000,
        "workload too small: {}",
        expected.len()
    );
    let actual = read_until(&expected, 240, async || postgres_orders(&client).await).await;
    let first_difference = expected.iter().zip(&actual).find(|(a, b)| a != b);
    assert!(
        actual == expected,
        "target differs: source {} rows, target {} rows, first difference {first_difference:?}\n{}",
        expected.len(),
        actual.len(),
        setup.logs()
    );
    let with_note = actual.iter().filter(|r| r.contains("note ")).count();
    assert!(
        with_note >= 7_000,
        "rows after the ALTER carry the note: {with_note}"
    );
    assert!(
        setup.logs().contains("DDL in the binlog"),
        "{}",
        setup.logs()
    );
    let second = std::fs::read_to_string(setup.work.path().join("second.log")).unwrap_or_default();
    assert!(
        second.contains("fresh=false") && second.contains("gtid 0-1-"),
        "the restart resumes from the stored GTID position:\n{second}"
    );
    // Each message applied once, though the restart redelivered some.
    let audit = client
        .query_one(
            "SELECT count(*), count(DISTINCT (topic, partition, kafka_offset)) FROM tidelink.history",
            &[],
        )
        .await
        .expect("history audit");
    assert_eq!(audit.get::<_, i64>(0), audit.get::<_, i64>(1));
}

/// A source that logs statements instead of rows is refused with the setting's name.
#[tokio::test(flavor = "multi_thread")]
async fn statement_binlog_format_is_refused_by_name() {
    let source = MariaDb::start_with(1, &["--binlog-format=STATEMENT"]);
    let setup = Setup {
        source,
        broker: Broker::start(),
        work: tempfile::tempdir().expect("work dir"),
        metrics_port: free_port(),
    };
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    let target = PgCluster::start();
    let sink = format!(
        "        postgres:\n          dsn: {}\n",
        target.dsn("postgres")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "");
    let mut daemon = setup.run(&config, "run.log");
    let status = daemon.wait(Duration::from_secs(60));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", setup.logs());
    let output = daemon.output();
    assert!(
        output.contains("binlog_format is STATEMENT") && output.contains("binlog_format=ROW"),
        "{output}"
    );
}

/// MariaDB → MariaDB: every listed type is identical on the target (created by the sink
/// from the source's definitions), and a 50k-change workload ends equal.
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_to_mariadb_types_and_workload() {
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup.source.execute("shop", TYPES_TABLE).await;
    setup.source.execute("shop", ORDERS_MARIADB).await;
    let target = MariaDb::start(2);
    let sink = format!(
        "        mysql:\n          dsn: {}\n          create_tables: true\n          record_history: true\n",
        target.dsn("mysql")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "");
    let _daemon = setup.run(&config, "run.log");
    setup.wait_ready().await;
    // The sink subscribed after the source created its tables' topics, so it consumes
    // them from its first metadata on (not one refresh later, with a backlog built).
    let log = std::fs::read_to_string(setup.work.path().join("run.log")).unwrap_or_default();
    let created = log.find("created topic topic=my.shop.orders");
    let joined = log.find("sink worker joined its consumer group");
    assert!(
        created.is_some() && joined.is_some() && created < joined,
        "the sink subscribed before the source's topics existed\n{}",
        setup.logs()
    );
    setup.source.execute("shop", TYPES_ROWS).await;
    setup
        .source
        .execute(
            "shop",
            "UPDATE shop.types SET t_varchar = 'updated ✓' WHERE id = 3",
        )
        .await;
    let mut conn = setup.source.conn("shop").await;
    let mut rng = Lcg(11);
    let mut next_id = 1;
    for _ in 0..600 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    let mut source_conn = setup.source.conn("shop").await;
    let mut target_conn = target.conn("mysql").await;
    use mysql_async::prelude::Queryable;
    let expected_types = mariadb_rows(&mut source_conn, "shop.types", "id").await;
    let expected_orders = mariadb_rows(&mut source_conn, "shop.orders", "id").await;
    assert!(expected_orders.len() > 20_000);
    let mut synced = false;
    for _ in 0..240 {
        let exists: Option<i64> = target_conn
            .query_first(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'shop'",
            )
            .await
            .expect("tables");
        if exists == Some(2)
            && mariadb_rows(&mut target_conn, "shop.types", "id").await == expected_types
            && mariadb_rows(&mut target_conn, "shop.orders", "id").await == expected_orders
        {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let actual_types = mariadb_rows(&mut target_conn, "shop.types", "id").await;
    assert_eq!(actual_types, expected_types, "{}", setup.logs());
    assert!(synced, "orders differ\n{}", setup.logs());
    let audit: Option<(i64, i64)> = target_conn
        .query_first("SELECT COUNT(*), COUNT(DISTINCT topic, `partition`, kafka_offset) FROM tidelink.history")
        .await
        .expect("history audit");
    let (recorded, distinct) = audit.expect("one row");
    assert_eq!(recorded, distinct, "each message applied once");
    let mariadb = &target;
    setup
        .wait_all_applied("my.shop.orders", move || async move {
            let mut conn = mariadb.conn("mysql").await;
            conn.query_first::<i64, _>(
                "SELECT CAST(COALESCE(SUM(next_offset), 0) AS SIGNED) FROM tidelink.offsets WHERE topic = 'my.shop.orders'",
            )
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
        })
        .await;

    // `tidelink verify` MariaDB → MariaDB: checksums in both servers, then drift found.
    let verify = |log: &str| {
        run_verify(
            &config,
            "my",
            &["--table", "shop.orders", "--chunk-size", "1000"],
            &setup.work.path().join(log),
        )
    };
    let (code, output) = verify("verify-1.log");
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("ranges checksummed in both databases, 0 ranges read row by row"),
        "{output}"
    );
    target_conn
        .query_drop("UPDATE shop.orders SET amount = amount + 1 ORDER BY id LIMIT 1")
        .await
        .expect("drift");
    target_conn
        .query_drop("DELETE FROM shop.orders ORDER BY id DESC LIMIT 1")
        .await
        .expect("drift");
    let (code, output) = verify("verify-2.log");
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("1 missing, 0 extra, 1 different"),
        "{output}"
    );
    assert!(output.contains("column amount"), "{output}");
}

const PG_TYPES: &str = "CREATE TABLE public.types (
    id integer PRIMARY KEY, small smallint, big bigint, num numeric(20,6), r real, d double precision,
    b boolean, txt text, vc varchar(30), ch char(4), bin bytea, ts timestamp(6), tstz timestamptz(3),
    dt date, tm time(3), js json, jb jsonb, u uuid, bits bit(5), arr integer[]
)";

/// PostgreSQL → MariaDB: the sink creates the table with mapped types and every value
/// arrives as the README's table says; a 50k-change workload ends equal.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_to_mariadb_types_and_workload() {
    use mysql_async::prelude::Queryable;
    let source = PgCluster::start();
    source.create_database("app").await;
    let pg = source.client("app").await;
    pg.batch_execute(PG_TYPES).await.expect("source types");
    pg.batch_execute(
        "CREATE TABLE public.orders (id integer PRIMARY KEY, customer varchar(40) NOT NULL, \
         amount numeric(12,2) NOT NULL, status text NOT NULL)",
    )
    .await
    .expect("source orders");
    let target = MariaDb::start(2);
    let broker = Broker::start();
    let work = tempfile::tempdir().expect("work dir");
    let metrics_port = free_port();
    let yaml = format!(
        "metrics:\n  listen: 127.0.0.1:{metrics_port}\npipelines:\n  - name: pg\n    source:\n      postgres:\n        dsn: {}\n        tables: [public.*]\n    kafka:\n      brokers: {}\n      topic_prefix: pg\n    sinks:\n      - name: maria\n        mysql:\n          dsn: {}\n          create_tables: true\n",
        source.dsn("app"),
        broker.bootstrap(),
        target.dsn("mysql")
    );
    let config = work.path().join("pipeline.yaml");
    std::fs::write(&config, yaml).expect("config");
    let log = work.path().join("run.log");
    let _daemon = Daemon::start(&["run", "-c", &config.display().to_string()], &log);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut ready = false;
    for _ in 0..300 {
        if http_get(metrics_port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "{}", logs());
    pg.batch_execute(
        "INSERT INTO public.types VALUES
         (1, -32768, 9223372036854775807, -12345678901234.123456, 1.5, 2.25, true, 'héllo ✓ 🐬', 'varchar', 'ab',
          '\\x00ff10', '2024-02-29 23:59:59.123456', '2024-03-01 01:02:03.456+02', '2024-02-29', '12:34:56.789',
          '{\"a\": [1, 2]}', '{\"b\": {\"c\": null}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', B'10101', '{1,2,3}'),
         (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         UPDATE public.types SET vc = 'updated' WHERE id = 2;",
    )
    .await
    .expect("insert types");
    let mut rng = Lcg(5);
    let mut next_id: u64 = 1;
    for _ in 0..600 {
        let rows: Vec<String> = (next_id..next_id + 50)
            .map(|id| {
                format!(
                    "({id}, 'customer {}', {}.{:02}, 'new')",
                    rng.next(1000),
                    rng.next(10_000),
                    rng.next(100)
                )
            })
            .collect();
        let updated: Vec<String> = (0..30)
            .map(|_| (1 + rng.next(next_id)).to_string())
            .collect();
        let deleted: Vec<String> = (0..5)
            .map(|_| (1 + rng.next(next_id)).to_string())
            .collect();
        pg.batch_execute(&format!(
            "BEGIN; INSERT INTO public.orders VALUES {}; \
             UPDATE public.orders SET amount = amount + 1, status = 'paid' WHERE id IN ({}); \
             DELETE FROM public.orders WHERE id IN ({}); COMMIT;",
            rows.join(", "),
            updated.join(", "),
            deleted.join(", ")
        ))
        .await
        .expect("workload round");
        next_id += 50;
    }
    let expected: Vec<String> = first_column(
        &pg,
        "SELECT concat_ws('|', id, customer, amount, status) FROM public.orders ORDER BY id",
    )
    .await
    .expect("source orders");
    let mut conn = target.conn("mysql").await;
    let actual: Vec<String> = read_until(&expected, 240, async || {
        conn.query(
            "SELECT CONCAT_WS('|', id, customer, amount, status) FROM public.orders ORDER BY id",
        )
        .await
        .unwrap_or_default()
    })
    .await;
    assert!(
        actual == expected,
        "orders differ: source {} rows, target {}\n{}",
        expected.len(),
        actual.len(),
        logs()
    );
    let types = mariadb_rows(&mut conn, "public.types", "id").await;
    assert_eq!(
        types,
        vec![
            "1|-32768|9223372036854775807|-12345678901234.123456|1.5|2.25|1|héllo ✓ 🐬|varchar|ab|0x00ff10|2024-02-29 23:59:59.123456|2024-02-29 23:02:03.456000|2024-02-29|12:34:56.789000|{\"a\": [1, 2]}|{\"b\": {\"c\": null}}|a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11|\u{15}|[1,2,3]".to_string(),
            "2|∅|∅|∅|∅|∅|∅|∅|updated|∅|∅|∅|∅|∅|∅|∅|∅|∅|∅|∅".to_string(),
        ],
        "{}",
        logs()
    );
}

/// With `binlog_row_metadata=FULL` the source reads rows by the column names the server
/// logged: rows written before an `ALTER TABLE … ADD COLUMN … AFTER` (which shifts the
/// columns) are decoded correctly even when tidelink reads them only after the ALTER.
#[tokio::test(flavor = "multi_thread")]
async fn full_row_metadata_reads_rows_from_before_a_reshaping_alter() {
    use mysql_async::prelude::Queryable;
    let setup = Setup::start_with_full_row_metadata();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup.source.execute("shop", ORDERS_MARIADB).await;
    let target = PgCluster::start();
    target.create_database("replica").await;
    let client = target.client("replica").await;
    client
        .batch_execute(
            "CREATE SCHEMA shop; CREATE TABLE shop.orders (id integer PRIMARY KEY, customer varchar(40) NOT NULL, \
             note text, amount numeric(12,2) NOT NULL, status text NOT NULL, updated timestamp(6) NOT NULL)",
        )
        .await
        .expect("target table");
    let sink = format!(
        "        postgres:\n          dsn: {}\n",
        target.dsn("replica")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "    snapshot: never\n");
    let daemon = setup.run(&config, "first.log");
    setup.wait_ready().await;
    let mut conn = setup.source.conn("shop").await;
    let mut rng = Lcg(3);
    let mut next_id = 1;
    for _ in 0..20 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    daemon.terminate(Duration::from_secs(30));
    // Written while tidelink is down, read only after the ALTER below.
    for _ in 0..20 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    conn.query_drop("ALTER TABLE shop.orders ADD COLUMN note varchar(60) NULL AFTER customer")
        .await
        .expect("alter");
    for _ in 0..20 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, true).await;
    }
    let _daemon = setup.run(&config, "second.log");
    let expected = mariadb_orders(&mut conn).await;
    let actual = read_until(&expected, 240, async || postgres_orders(&client).await).await;
    assert!(
        actual == expected,
        "target differs: first difference {:?}\n{}",
        expected.iter().zip(&actual).find(|(a, b)| a != b),
        setup.logs()
    );
}

/// A source user without replication grants is refused with the missing grant named, and
/// its password appears nowhere in the output.
#[tokio::test(flavor = "multi_thread")]
async fn missing_replication_grants_are_named_and_the_password_is_not_logged() {
    let setup = Setup::start();
    setup
        .source
        .execute(
            "mysql",
            "CREATE DATABASE shop;\nCREATE TABLE shop.t (id int PRIMARY KEY);\nCREATE USER 'weak'@'%' IDENTIFIED BY 'S3cretPw-91';\nGRANT SELECT ON shop.* TO 'weak'@'%'",
        )
        .await;
    let target = PgCluster::start();
    let sink = format!(
        "        postgres:\n          dsn: {}\n",
        target.dsn("postgres")
    );
    let source = format!(
        "      mysql:\n        dsn: mysql://weak:S3cretPw-91@127.0.0.1:{}/shop\n        tables: [shop.*]\n",
        setup.source.port
    );
    let config = setup.config(&source, &sink, "");
    let mut daemon = setup.run(&config, "run.log");
    let status = daemon.wait(Duration::from_secs(60));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", setup.logs());
    let output = daemon.output();
    assert!(output.contains("GRANT REPLICATION CLIENT"), "{output}");
    assert!(
        !output.contains("S3cretPw-91"),
        "the password leaked:\n{output}"
    );
}

/// MariaDB → PostgreSQL with a sink's transforms: a `tinyint(1)` flag and a decimal in the
/// filter, a hashed column, a dropped one; the snapshot, inserts, updates into and out of
/// the filter and deletes all end as the filter says, and `verify` across engines applies
/// the same transforms.
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_to_postgres_transforms_and_cross_engine_verify() {
    use mysql_async::prelude::Queryable;
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup
        .source
        .execute(
            "shop",
            "CREATE TABLE shop.customers (id int NOT NULL PRIMARY KEY, email varchar(80),
                 secret varchar(20), active tinyint(1) NOT NULL, amount decimal(10,2))",
        )
        .await;
    let insert = |from: u32, to: u32| {
        (from..=to)
            .map(|i| {
                format!(
                    "({i}, 'user{i}@example.com', 'pw{i}', {}, {})",
                    u32::from(i % 4 != 0),
                    i % 30
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    setup
        .source
        .execute(
            "shop",
            &format!("INSERT INTO shop.customers VALUES {}", insert(1, 200)),
        )
        .await;
    let target = PgCluster::start();
    target.create_database("replica").await;
    let sink = format!(
        "        postgres:\n          dsn: {}\n          create_tables: true\n        transforms:\n          - tables: [shop.customers]\n            drop_columns: [secret]\n            mask: {{ email: hash }}\n            filter: \"active and amount >= 5\"\n",
        target.dsn("replica")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "");
    let _daemon = setup.run(&config, "run.log");
    setup.wait_ready().await;
    setup
        .source
        .execute(
            "shop",
            &format!(
                "INSERT INTO shop.customers VALUES {};
                 UPDATE shop.customers SET active = 1, amount = 20 WHERE id IN (4, 8, 204);
                 UPDATE shop.customers SET active = 0 WHERE id IN (5, 6, 205);
                 UPDATE shop.customers SET amount = 1 WHERE id IN (7, 207);
                 UPDATE shop.customers SET email = CONCAT('new', id, '@example.com') WHERE id BETWEEN 10 AND 20;
                 DELETE FROM shop.customers WHERE id IN (9, 209);",
                insert(201, 400)
            ),
        )
        .await;
    let mut source = setup.source.conn("shop").await;
    let expected: Vec<String> = source
        .query(
            "SELECT CONCAT(id, '|', SHA2(email, 256), '|', amount) FROM shop.customers
              WHERE active AND amount >= 5 ORDER BY id",
        )
        .await
        .expect("expected rows");
    assert!(expected.len() > 200);
    let client = target.client("replica").await;
    let actual: Vec<String> = read_until(&expected, 240, async || {
        first_column(
            &client,
            "SELECT id || '|' || email || '|' || amount FROM shop.customers ORDER BY id",
        )
        .await
        .unwrap_or_default()
    })
    .await;
    assert_eq!(actual, expected, "{}", setup.logs());
    let secret_columns: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'secret'",
            &[],
        )
        .await
        .expect("columns")
        .get(0);
    assert_eq!(secret_columns, 0, "the dropped column is not created");

    let pg = &client;
    setup
        .wait_all_applied("my.shop.customers", move || {
            pg_recorded_offsets(pg, "my.shop.customers")
        })
        .await;
    let verify = |log: &str| run_verify(&config, "my", &[], &setup.work.path().join(log));
    let (code, output) = verify("verify-1.log");
    assert_eq!(code, Some(0), "{output}");
    // A hashed value tampered with, and a row the filter rejects (id 212 is inactive in
    // the source).
    client
        .batch_execute(
            "UPDATE shop.customers SET email = 'plain' WHERE id = 11;
             INSERT INTO shop.customers (id, email, active, amount) VALUES (212, 'x', 1, 2)",
        )
        .await
        .expect("drift");
    let (code, output) = verify("verify-2.log");
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("0 missing, 1 extra, 1 different"),
        "{output}"
    );
    assert!(output.contains("column email"), "{output}");
}

/// `backfill --direct` from a MariaDB source into a MariaDB target (`LOAD DATA LOCAL
/// INFILE` in chunks, each committed with its last key): every type and a table of several chunks
/// arrive equal, and a second run finds the tables loaded and copies nothing again. The
/// types with an exact text form (`plain_types`, and the orders) go in as the source's
/// text; the others are converted value by value. The same source into a PostgreSQL target
/// (COPY of rows read from MariaDB) ends equal too.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_backfill_from_mariadb_copies_every_row_into_either_engine() {
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup.source.execute("shop", TYPES_TABLE).await;
    setup.source.execute("shop", TYPES_ROWS).await;
    // Every type of TYPES_TABLE that passes as text: extremes, NULLs, negative times,
    // latin1, multibyte text, empty strings.
    const PLAIN_TYPES: &str = "CREATE TABLE shop.plain_types LIKE shop.types;
        ALTER TABLE shop.plain_types DROP COLUMN t_float, DROP COLUMN t_double,
            DROP COLUMN t_bit, DROP COLUMN t_binary, DROP COLUMN t_blob, DROP COLUMN t_json";
    setup.source.execute("shop", PLAIN_TYPES).await;
    setup
        .source
        .execute(
            "shop",
            "INSERT INTO shop.plain_types SELECT id, t_tiny, t_tiny_u, t_small, t_small_u, \
             t_medium, t_medium_u, t_int, t_int_u, t_big, t_big_u, t_dec, t_date, t_time, \
             t_datetime, t_ts, t_year, t_char, t_varchar, t_text, t_latin, t_enum, t_set \
             FROM shop.types; \
             INSERT INTO shop.plain_types (id, t_varchar, t_text) VALUES \
             (4, 'tab\\there', 'back\\\\slash, new\\nline, \\\\N, cr\\r')",
        )
        .await;
    setup.source.execute("shop", ORDERS_MARIADB).await;
    let mut conn = setup.source.conn("shop").await;
    let mut rng = Lcg(5);
    let mut next_id = 1;
    for _ in 0..60 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    let target = MariaDb::start(2);
    target.execute("mysql", "CREATE DATABASE shop").await;
    target.execute("shop", TYPES_TABLE).await;
    target.execute("shop", PLAIN_TYPES).await;
    target.execute("shop", ORDERS_MARIADB).await;
    let (pg, pg_client) = postgres_orders_target().await;
    let sink = format!(
        "        mysql:\n          dsn: {}\n      - name: pg\n        tables: [shop.orders]\n        postgres:\n          dsn: {}\n",
        target.dsn("mysql"),
        pg.dsn("replica")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "");
    let direct = |sink: &str, log: &str| {
        let (status, output) = setup.direct_backfill(&config, 500, sink, log);
        assert!(status.success(), "{output}");
        output
    };
    let first = direct("target", "direct-1.log");
    assert!(
        !first.contains("did not store the chunk exactly") && !first.contains("refuses LOAD DATA"),
        "every chunk went in with LOAD DATA LOCAL INFILE: {first}"
    );
    let converted: Vec<&str> = first
        .lines()
        .filter(|l| l.contains("loading rows converted value by value"))
        .collect();
    assert!(
        converted.len() == 1 && converted[0].contains("shop.types"),
        "only the table with types that have no exact text form is converted: {first}"
    );
    let mut source_conn = setup.source.conn("shop").await;
    let mut target_conn = target.conn("mysql").await;
    assert_eq!(
        mariadb_rows(&mut target_conn, "shop.plain_types", "id").await,
        mariadb_rows(&mut source_conn, "shop.plain_types", "id").await
    );
    let expected_types = mariadb_rows(&mut source_conn, "shop.types", "id").await;
    let expected_orders = mariadb_rows(&mut source_conn, "shop.orders", "id").await;
    assert!(expected_orders.len() > 2_000, "several chunks of orders");
    assert_eq!(
        mariadb_rows(&mut target_conn, "shop.types", "id").await,
        expected_types
    );
    assert_eq!(
        mariadb_rows(&mut target_conn, "shop.orders", "id").await,
        expected_orders
    );
    let again = direct("target", "direct-2.log");
    assert_eq!(
        again.matches("already loaded by an earlier run").count(),
        3,
        "{again}"
    );
    assert_eq!(
        mariadb_rows(&mut target_conn, "shop.orders", "id").await,
        expected_orders
    );
    direct("pg", "direct-pg.log");
    use mysql_async::prelude::Queryable;
    let in_mariadb: Vec<String> = source_conn
        .query(
            "SELECT CONCAT_WS('|', id, customer, amount, status, DATE_FORMAT(updated, '%Y-%m-%d %H:%i:%s.%f')) FROM shop.orders ORDER BY id",
        )
        .await
        .expect("source orders");
    let in_postgres: Vec<String> = first_column(
        &pg_client,
        "SELECT concat_ws('|', id, customer, amount, status, to_char(updated, 'YYYY-MM-DD HH24:MI:SS.US')) FROM shop.orders ORDER BY id",
    )
    .await
    .expect("target orders");
    assert_eq!(in_postgres, in_mariadb);
}

/// `backfill --direct` into MariaDB loads each chunk with `LOAD DATA LOCAL INFILE`. A
/// target that refuses LOCAL (`local_infile=OFF`) is told in the log and loaded with
/// INSERTs, equal all the same. A row already in the target is not skipped, as LOCAL's
/// implied IGNORE would: the chunk is rolled back and the load stops with the duplicate
/// key named, that row left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_backfill_into_mariadb_falls_back_to_inserts_and_never_skips_a_row() {
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup.source.execute("shop", ORDERS_MARIADB).await;
    let mut conn = setup.source.conn("shop").await;
    let mut rng = Lcg(11);
    let mut next_id = 1;
    for _ in 0..30 {
        next_id = mariadb_round(&mut conn, &mut rng, next_id, false).await;
    }
    let refusing = MariaDb::start_with(
        2,
        &[
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            "--local-infile=0",
        ],
    );
    let holding = MariaDb::start(3);
    for target in [&refusing, &holding] {
        target.execute("mysql", "CREATE DATABASE shop").await;
        target.execute("shop", ORDERS_MARIADB).await;
    }
    // The 700th row by key, a few chunks in.
    use mysql_async::prelude::Queryable;
    let nth_id = async |conn: &mut mysql_async::Conn, n: u32| -> i64 {
        conn.query_first(format!(
            "SELECT id FROM orders ORDER BY id LIMIT 1 OFFSET {}",
            n - 1
        ))
        .await
        .expect("read an id")
        .expect("enough rows")
    };
    let held = nth_id(&mut conn, 700).await;
    holding
        .execute(
            "shop",
            &format!("INSERT INTO orders VALUES ({held}, 'already here', 1.00, 'new', '2020-01-01 00:00:00')"),
        )
        .await;
    let sink = format!(
        "        mysql:\n          dsn: {}\n      - name: holding\n        mysql:\n          dsn: {}\n",
        refusing.dsn("mysql"),
        holding.dsn("mysql")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "");
    let direct = |sink: &str, log: &str| setup.direct_backfill(&config, 300, sink, log);
    let (status, output) = direct("target", "direct-refusing.log");
    assert!(status.success(), "{output}");
    assert!(
        output.contains("refuses LOAD DATA LOCAL INFILE"),
        "the fallback is told: {output}"
    );
    let mut source_conn = setup.source.conn("shop").await;
    let expected = mariadb_rows(&mut source_conn, "shop.orders", "id").await;
    assert!(expected.len() > 1_000, "several chunks");
    let mut refusing_conn = refusing.conn("mysql").await;
    assert_eq!(
        mariadb_rows(&mut refusing_conn, "shop.orders", "id").await,
        expected
    );

    let (status, output) = direct("holding", "direct-holding.log");
    assert!(
        !status.success(),
        "a duplicate key stops the load: {output}"
    );
    assert!(
        output.contains("did not store the chunk exactly") && output.contains("Duplicate entry"),
        "LOAD DATA's skipped row is caught and the INSERT names it: {output}"
    );
    let mut holding_conn = holding.conn("shop").await;
    let kept: Option<String> = holding_conn
        .query_first(format!("SELECT customer FROM orders WHERE id = {held}"))
        .await
        .expect("read the held row");
    assert_eq!(kept.as_deref(), Some("already here"));
    let (loaded, highest): (i64, Option<i64>) = holding_conn
        .query_first(format!(
            "SELECT COUNT(*), MAX(id) FROM orders WHERE id <> {held}"
        ))
        .await
        .expect("count")
        .expect("a row");
    let highest = highest.expect("the chunks before the held row are loaded");
    assert!(highest < held, "the chunk holding the row is not loaded");
    let source_below: i64 = conn
        .query_first(format!("SELECT COUNT(*) FROM orders WHERE id <= {highest}"))
        .await
        .expect("count")
        .expect("a row");
    assert_eq!(loaded, source_below, "whole chunks, each committed once");
}

/// A MariaDB table without a key, with equal rows and NULLs, beside a keyed one: the
/// snapshot copies it in one consistent read, the stream leaves out what that read saw,
/// and a MariaDB target and a PostgreSQL target (created without a key) end equal to the
/// source under a workload that inserts equal rows, deletes one of two and updates others.
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_table_without_a_key_is_snapshotted_and_streamed_into_both_engines() {
    use mysql_async::prelude::Queryable;
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup
        .source
        .execute(
            "shop",
            "CREATE TABLE keyed (id int PRIMARY KEY, v int NOT NULL);
             CREATE TABLE log (who int, what varchar(20), amount decimal(10,2) NOT NULL, at datetime NULL);
             INSERT INTO keyed SELECT seq, 0 FROM seq_1_to_500;
             INSERT INTO log SELECT seq % 10, IF(seq % 3 = 0, NULL, 'w'), seq % 5, NULL FROM seq_1_to_2000;",
        )
        .await;
    let maria = MariaDb::start(2);
    let postgres = PgCluster::start();
    postgres.create_database("replica").await;
    let sinks = format!(
        "        mysql:\n          dsn: {}\n          create_tables: true\n      - name: pg\n        postgres:\n          dsn: {}\n          create_tables: true\n",
        maria.dsn("mysql"),
        postgres.dsn("replica"),
    );
    let config = setup.config(&setup.mysql_source(), &sinks, "");
    let mut conn = setup.source.conn("shop").await;
    let round = |i: u32| {
        let mut sql = format!(
            "START TRANSACTION;
             UPDATE keyed SET v = v + 1 WHERE id = {};
             INSERT INTO log VALUES ({}, NULL, 1.50, '2024-01-01 00:00:00'), (1, 'same', 0, NULL), (1, 'same', 0, NULL);",
            1 + i % 500,
            i % 10
        );
        if i.is_multiple_of(5) {
            sql.push_str(
                "DELETE FROM log WHERE who = 1 AND what = 'same' LIMIT 1;
                 UPDATE log SET amount = amount + 100 WHERE what IS NULL AND amount < 100 LIMIT 1;",
            );
        }
        sql.push_str("COMMIT;");
        sql
    };
    let daemon = setup.run(&config, "keyless.log");
    for i in 0..60 {
        conn.query_drop(round(i)).await.expect("round");
    }
    setup.wait_ready().await;
    for i in 60..200 {
        conn.query_drop(round(i)).await.expect("round");
    }
    let order = "who, what, amount, at";
    let expected = mariadb_rows(&mut conn, "shop.log", order).await;
    let mut target = maria.conn("mysql").await;
    let pg = postgres.client("replica").await;
    let mut in_sync = false;
    for _ in 0..240 {
        let maria_rows = target
            .query::<String, _>("SELECT 1 FROM information_schema.tables WHERE table_schema = 'shop' AND table_name = 'log'")
            .await
            .unwrap_or_default();
        if !maria_rows.is_empty()
            && mariadb_rows(&mut target, "shop.log", order).await == expected
            && first_column::<i64>(&pg, "SELECT count(*) FROM shop.log")
                .await
                .is_ok_and(|c| c == vec![expected.len() as i64])
        {
            in_sync = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(in_sync, "targets did not catch up:\n{}", setup.logs());
    let (code, output) = run_verify(&config, "my", &[], &setup.work.path().join("verify.log"));
    assert_eq!(code, Some(0), "verify finds both targets equal:\n{output}");
    let keys: Vec<i64> = target
        .query("SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = 'shop' AND table_name = 'log'")
        .await
        .expect("indexes");
    assert_eq!(keys, vec![0], "created without a key");
    drop(daemon);
}

/// Columns added, renamed, widened and dropped on a MariaDB source reach a MariaDB and a
/// PostgreSQL target in order with the rows (the source logs full row metadata, so rows
/// read after a later ALTER keep their columns).
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_schema_changes_reach_both_engines() {
    use mysql_async::prelude::Queryable;
    // Rows read after later ALTERs are decoded by the names the server logged.
    let setup = Setup::start_with_full_row_metadata();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup
        .source
        .execute(
            "shop",
            "CREATE TABLE items (id int PRIMARY KEY, name varchar(10), qty int NOT NULL DEFAULT 0)",
        )
        .await;
    let maria = MariaDb::start(2);
    let postgres = PgCluster::start();
    postgres.create_database("replica").await;
    let sinks = format!(
        "        mysql:\n          dsn: {}\n          create_tables: true\n      - name: pg\n        postgres:\n          dsn: {}\n          create_tables: true\n",
        maria.dsn("mysql"),
        postgres.dsn("replica"),
    );
    let config = setup.config(&setup.mysql_source(), &sinks, "    snapshot: never\n");
    let _daemon = setup.run(&config, "schema.log");
    setup.wait_ready().await;
    let mut conn = setup.source.conn("shop").await;
    for step in [
        "INSERT INTO items SELECT seq, CONCAT('n', seq), seq FROM seq_1_to_200",
        "ALTER TABLE items ADD COLUMN note text NULL",
        "INSERT INTO items SELECT seq, CONCAT('n', seq), seq, CONCAT('note ', seq) FROM seq_201_to_400",
        "ALTER TABLE items RENAME COLUMN name TO title",
        "UPDATE items SET title = CONCAT('t', id) WHERE id % 5 = 0",
        "ALTER TABLE items MODIFY COLUMN title varchar(40)",
        "INSERT INTO items VALUES (401, 'a title longer than ten characters', 1, 'wide')",
        "ALTER TABLE items DROP COLUMN qty",
        "INSERT INTO items SELECT seq, 'after drop', 'x' FROM seq_402_to_500",
        "DELETE FROM items WHERE id % 11 = 0",
    ] {
        conn.query_drop(step).await.expect("step");
        if step.starts_with("ALTER") {
            continue; // targets follow a schema change with the rows after it
        }
        // The source streams as the migration runs: each step's rows reach both targets
        // before the next step starts.
        let expected = mariadb_rows(&mut conn, "shop.items", "id").await;
        let source_columns: Vec<String> = conn
            .query("SELECT column_name FROM information_schema.columns WHERE table_schema = 'shop' AND table_name = 'items' ORDER BY ordinal_position")
            .await
            .expect("columns");
        let mut target = maria.conn("mysql").await;
        let pg = postgres.client("replica").await;
        let mut caught_up = false;
        for _ in 0..240 {
            let pg_columns: Vec<String> = first_column(
                &pg,
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'shop' AND table_name = 'items' ORDER BY ordinal_position",
            )
            .await
            .unwrap_or_default();
            let pg_count: Vec<i64> = first_column(&pg, "SELECT count(*) FROM shop.items")
                .await
                .unwrap_or_default();
            if pg_columns == source_columns
                && pg_count == [expected.len() as i64]
                && target
                    .query::<String, _>("SELECT table_name FROM information_schema.tables WHERE table_schema = 'shop'")
                    .await
                    .is_ok_and(|t| !t.is_empty())
                && mariadb_rows(&mut target, "shop.items", "id").await == expected
            {
                caught_up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(caught_up, "after `{step}` the targets did not catch up:\n{}", setup.logs());
    }
    let expected = mariadb_rows(&mut conn, "shop.items", "id").await;
    let mut target = maria.conn("mysql").await;
    let pg = postgres.client("replica").await;
    let mut in_sync = false;
    for _ in 0..240 {
        let pg_rows: Vec<String> = first_column(
            &pg,
            "SELECT concat_ws('|', id, coalesce(title, '∅'), coalesce(note, '∅')) FROM shop.items ORDER BY id",
        )
        .await
        .unwrap_or_default();
        let maria_rows: Vec<String> = target
            .query("SELECT 1 FROM information_schema.columns WHERE table_schema = 'shop' AND table_name = 'items' AND column_name = 'title'")
            .await
            .unwrap_or_default();
        if !maria_rows.is_empty()
            && mariadb_rows(&mut target, "shop.items", "id").await == expected
            && pg_rows == expected
        {
            in_sync = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if !in_sync {
        let maria_rows = mariadb_rows(&mut target, "shop.items", "id").await;
        let pg_rows: Vec<String> = first_column(
            &pg,
            "SELECT concat_ws('|', id, coalesce(title, '∅'), coalesce(note, '∅')) FROM shop.items ORDER BY id",
        )
        .await
        .unwrap_or_default();
        panic!(
            "targets did not follow the source: source {} rows {:?}…, MariaDB {} rows {:?}…, PostgreSQL {} rows {:?}…\n{}",
            expected.len(),
            expected.iter().take(3).collect::<Vec<_>>(),
            maria_rows.len(),
            maria_rows.iter().take(3).collect::<Vec<_>>(),
            pg_rows.len(),
            pg_rows.iter().take(3).collect::<Vec<_>>(),
            setup.logs()
        );
    }
    let types: Vec<String> = target
        .query("SELECT CONCAT(column_name, ' ', column_type) FROM information_schema.columns WHERE table_schema = 'shop' AND table_name = 'items' ORDER BY ordinal_position")
        .await
        .expect("columns");
    assert_eq!(types, ["id int(11)", "title varchar(40)", "note text"]);
}

/// A table created on a MariaDB source while the pipeline runs is streamed from its
/// `CREATE TABLE` on, and the sink creates it in the target.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_created_on_mariadb_while_running_reaches_the_target() {
    use mysql_async::prelude::Queryable;
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup
        .source
        .execute("shop", "CREATE TABLE first (id int PRIMARY KEY)")
        .await;
    let postgres = PgCluster::start();
    postgres.create_database("replica").await;
    let sink = format!(
        "        postgres:\n          dsn: {}\n          create_tables: true\n",
        postgres.dsn("replica")
    );
    let config = setup.config(&setup.mysql_source(), &sink, "");
    let _daemon = setup.run(&config, "late.log");
    setup.wait_ready().await;
    let mut conn = setup.source.conn("shop").await;
    conn.query_drop(
        "CREATE TABLE late (id int PRIMARY KEY, v varchar(20));
         INSERT INTO late SELECT seq, CONCAT('v', seq) FROM seq_1_to_300;
         UPDATE late SET v = 'changed' WHERE id % 3 = 0;
         DELETE FROM late WHERE id % 7 = 0;",
    )
    .await
    .expect("new table");
    let expected = mariadb_rows(&mut conn, "shop.late", "id").await;
    let pg = postgres.client("replica").await;
    let rows = read_until(&expected, 120, async || {
        first_column::<String>(
            &pg,
            "SELECT concat_ws('|', id, v) FROM shop.late ORDER BY id",
        )
        .await
        .unwrap_or_default()
    })
    .await;
    assert_eq!(rows, expected, "{}", setup.logs());
}

/// `TRUNCATE TABLE` on a MariaDB source empties a keyed and a keyless table in a MariaDB
/// and a PostgreSQL target, ordered against the rows written before and after it (a
/// keyed table's truncate is a barrier across its four partitions).
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_truncates_reach_both_engines_in_order() {
    use mysql_async::prelude::Queryable;
    let setup = Setup::start();
    setup.source.execute("mysql", "CREATE DATABASE shop").await;
    setup
        .source
        .execute(
            "shop",
            "CREATE TABLE items (id int PRIMARY KEY, v varchar(20));
             CREATE TABLE log (who int, what varchar(20));
             INSERT INTO items SELECT seq, 'copied' FROM seq_1_to_300;
             INSERT INTO log SELECT seq % 7, NULL FROM seq_1_to_300;",
        )
        .await;
    let maria = MariaDb::start(2);
    let postgres = PgCluster::start();
    postgres.create_database("replica").await;
    let sinks = format!(
        "        mysql:\n          dsn: {}\n          create_tables: true\n      - name: pg\n        postgres:\n          dsn: {}\n          create_tables: true\n",
        maria.dsn("mysql"),
        postgres.dsn("replica"),
    );
    let config = setup.config(&setup.mysql_source(), &sinks, "");
    let _daemon = setup.run(&config, "truncate.log");
    setup.wait_ready().await;
    let mut conn = setup.source.conn("shop").await;
    for round in 0..3 {
        let base = 1000 * (round + 1);
        conn.query_drop(format!(
            "INSERT INTO items SELECT {base} + seq, 'before' FROM seq_1_to_400;
             INSERT INTO log SELECT seq % 5, 'before' FROM seq_1_to_100;
             TRUNCATE TABLE items;
             TRUNCATE log;
             INSERT INTO items SELECT {base} + seq, 'after' FROM seq_301_to_600;
             UPDATE items SET v = 'updated' WHERE id % 3 = 0;
             INSERT INTO log VALUES (1, 'after'), (1, 'after'), (2, NULL);"
        ))
        .await
        .expect("round with truncates");
    }
    let expected_items = mariadb_rows(&mut conn, "shop.items", "id").await;
    let expected_log = mariadb_rows(&mut conn, "shop.log", "who, what").await;
    assert_eq!(expected_items.len(), 300);
    let mut target = maria.conn("mysql").await;
    let pg = postgres.client("replica").await;
    let mut in_sync = false;
    for _ in 0..240 {
        let exists: Vec<String> = target
            .query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'shop'")
            .await
            .unwrap_or_default();
        let pg_items: Vec<String> = first_column(
            &pg,
            "SELECT concat_ws('|', id, v) FROM shop.items ORDER BY id",
        )
        .await
        .unwrap_or_default();
        let pg_log: Vec<String> = first_column(
            &pg,
            "SELECT concat_ws('|', who, coalesce(what, '∅')) FROM shop.log ORDER BY who, what NULLS FIRST",
        )
        .await
        .unwrap_or_default();
        if exists.len() == 2
            && mariadb_rows(&mut target, "shop.items", "id").await == expected_items
            && mariadb_rows(&mut target, "shop.log", "who, what").await == expected_log
            && pg_items == expected_items
            && pg_log == expected_log
        {
            in_sync = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        in_sync,
        "targets did not follow the truncates:\n{}",
        setup.logs()
    );
    let (code, output) = run_verify(&config, "my", &[], &setup.work.path().join("verify.log"));
    assert_eq!(code, Some(0), "verify finds both targets equal:\n{output}");
    let left: Vec<i64> = target
        .query("SELECT COUNT(*) FROM tidelink.truncate_barriers")
        .await
        .expect("barrier rows");
    assert_eq!(left, [0], "every barrier completed and was cleared");
}

/// PostgreSQL → MariaDB with two sink workers sharing the partitions: a keyed table's
/// truncates, between inserts, meet at the MariaDB sink's barrier and empty the table
/// exactly between the rows before and after them.
#[tokio::test(flavor = "multi_thread")]
async fn truncates_from_postgres_meet_at_the_mariadb_barrier_across_workers() {
    use mysql_async::prelude::Queryable;
    let source = PgCluster::start();
    source.create_database("app").await;
    let pg = source.client("app").await;
    pg.batch_execute("CREATE TABLE public.items (id int PRIMARY KEY, name text)")
        .await
        .expect("source table");
    let target = MariaDb::start(2);
    let broker = Broker::start();
    let work = tempfile::tempdir().expect("work dir");
    let metrics_port = free_port();
    let yaml = |metrics: &str| {
        format!(
            "metrics:\n{metrics}pipelines:\n  - name: pg\n    snapshot: never\n    source:\n      postgres:\n        dsn: {}\n        tables: [public.*]\n        status_interval_ms: 500\n    kafka:\n      brokers: {}\n      topic_prefix: pg\n      partitions: 4\n    sinks:\n      - name: maria\n        batch_size: 500\n        mysql:\n          dsn: {}\n          create_tables: true\n",
            source.dsn("app"),
            broker.bootstrap(),
            target.dsn("mysql")
        )
    };
    let config = work.path().join("pipeline.yaml");
    std::fs::write(
        &config,
        yaml(&format!("  listen: 127.0.0.1:{metrics_port}\n")),
    )
    .expect("config");
    let sink_config = work.path().join("sink.yaml");
    std::fs::write(&sink_config, yaml("  enabled: false\n")).expect("sink config");
    let start = |config: &std::path::Path, role: &str, log: &str| {
        Daemon::start(
            &["run", "-c", &config.display().to_string(), "--role", role],
            &work.path().join(log),
        )
    };
    let logs = || {
        ["source.log", "sink-1.log", "sink-2.log"]
            .iter()
            .map(|l| std::fs::read_to_string(work.path().join(l)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let _source = start(&config, "source", "source.log");
    let mut ready = false;
    for _ in 0..300 {
        if http_get(metrics_port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "{}", logs());
    let _sink_1 = start(&sink_config, "sink", "sink-1.log");
    let _sink_2 = start(&sink_config, "sink", "sink-2.log");
    let mut conn = target.conn("mysql").await;
    let expected: Vec<String> = {
        let mut expected = Vec::new();
        for round in 0..3 {
            let base = 10_000 * (round + 1);
            pg.batch_execute(&format!(
                "INSERT INTO items SELECT {base} + g, 'before' FROM generate_series(1, 1000) g;
                 UPDATE items SET name = 'updated' WHERE id % 7 = 0;
                 TRUNCATE items;
                 INSERT INTO items SELECT {base} + g, 'after' FROM generate_series(801, 1200) g;
                 DELETE FROM items WHERE id % 11 = 0;"
            ))
            .await
            .expect("round with a truncate");
            expected = first_column(
                &pg,
                "SELECT concat_ws('|', id, name) FROM items ORDER BY id",
            )
            .await
            .expect("source rows");
            // Each round's truncate meets at the barrier before the next is written.
            let mut rows = Vec::new();
            for _ in 0..240 {
                let created: Vec<String> = conn
                    .query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
                    .await
                    .unwrap_or_default();
                if !created.is_empty() {
                    rows = mariadb_rows(&mut conn, "public.items", "id").await;
                }
                if rows == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            assert_eq!(rows.len(), expected.len(), "round {round}:\n{}", logs());
            assert_eq!(rows, expected, "round {round}:\n{}", logs());
        }
        expected
    };
    assert!(expected.iter().all(|r| r.ends_with("|after")));
    let left: Vec<i64> = conn
        .query("SELECT COUNT(*) FROM tidelink.truncate_barriers")
        .await
        .expect("barrier rows");
    assert_eq!(left, [0], "every barrier completed and was cleared");
    let (code, output) = run_verify(&config, "pg", &[], &work.path().join("verify.log"));
    assert_eq!(code, Some(0), "verify finds the table equal:\n{output}");
}
