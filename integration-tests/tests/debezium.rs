//! Debezium side by side: Debezium's own connectors (Kafka Connect standalone, the JSON
//! converter with and without schemas) write the topics, tidelink's sinks apply them, and
//! the targets end equal to the sources, `tidelink verify` clean, for every type of the
//! type tests that Debezium itself carries without loss.

use mysql_async::prelude::Queryable;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidelink_integration_tests::debezium::{DebeziumSource, JsonSchemas, KafkaConnect};
use tidelink_integration_tests::mariadb::{mariadb_rows, MariaDb, TYPES_ROWS, TYPES_TABLE};
use tidelink_integration_tests::{
    free_port, http_get, run_verify, table_rows, wait_until, Broker, Daemon, PgCluster,
    TYPES_SCHEMA,
};

const CATCH_UP: Duration = Duration::from_secs(180);

/// Debezium's PostgreSQL connector cannot carry multidimensional arrays (it logs a warning
/// and sends an array of nulls): the table of the type tests without `c_matrix`.
fn pg_types_schema() -> String {
    let schema = TYPES_SCHEMA.replace(" c_matrix int[][],", "");
    assert_ne!(schema, TYPES_SCHEMA, "the type tests' table has c_matrix");
    schema
}

/// The type tests' rows but for what Debezium loses: NaN in `numeric` (sent as null) and
/// in `numeric[]` (the whole array sent as null), the zones of `timetz` (normalised to UTC).
const PG_SNAPSHOT_ROWS: &str = r#"
INSERT INTO all_types VALUES
 (1, -32768, -2147483648, -9223372036854775808, '-12345678901234567890.0123456789', '1e-20',
  '-3.4028235e38', '-1.7976931348623157e308', true,
  'plain', 'varchar ✓ ünïcödé 日本', 'ab', '\x00ff10'::bytea,
  '0001-01-01', '00:00:00', '23:59:59.999999+00',
  '1970-01-01 00:00:00.000001', '2024-02-29 12:34:56.789012+05:30', '-1 year 2 mons 3 days 04:05:06.7',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"a": [1, 2.5, null], "b": "x\"y"}', '{"nested": {"k": [true, false]}, "n": 1.10}',
  '{1,NULL,3}', '{"with space","quote\"d","back\\slash",NULL,"NULL",""}', '{1.5,-0.001}',
  '{a,bc}',
  'happy', '{sad,ok}', '192.168.0.1/24', '1234.56', '(1.5,-2)', B'1010', '[2024-01-01 00:00,2024-02-01 00:00)'),
 (2, 32767, 2147483647, 9223372036854775807, '0.0000000001', '123456789012345678901234567890.123456789',
  'NaN', 'Infinity', false,
  '', ' leading and trailing ', 'x', ''::bytea,
  '9999-12-31', '24:00:00', '00:00:00+00',
  '2000-01-01 00:00:00', '1999-12-31 23:59:59.999999+00', '0 seconds',
  '00000000-0000-0000-0000-000000000000',
  'null', '[]', '{}', '{}', '{}', '{NULL,"x "}',
  'sad', '{}', '::1', '-0.01', '(0,0)', B'0000', 'empty');
"#;

/// Streamed after Debezium's snapshot: an insert of NULLs, updates, an insert deleted again.
const PG_STREAMED_CHANGES: &str = r#"
INSERT INTO all_types (id, c_float4, c_float8) VALUES (3, '-Infinity', '-0');
UPDATE all_types SET c_text = 'updated', c_float8 = 0.1 + 0.2, c_numeric = '-0.5',
  c_date = '2024-02-29', c_timestamp = '2024-02-29 23:59:59.5', c_bit = B'0110' WHERE id = 2;
UPDATE all_types SET c_int_array = '{7}', c_numeric_array = '{}', c_point = '(-3.25,8)' WHERE id = 1;
INSERT INTO all_types (id, c_text) VALUES (4, 'to be deleted');
DELETE FROM all_types WHERE id = 4;
"#;

/// tidelink run with `--role sink` on a pipeline whose sinks apply the topics of `prefix`
/// (written by Debezium); its source section names the database Debezium reads, so
/// `tidelink verify` can compare the two. tidelink reads nothing from the source.
struct SinkRun {
    config: PathBuf,
    daemon: Daemon,
}

impl SinkRun {
    async fn start(dir: &Path, broker: &Broker, prefix: &str, source: &str, sinks: &str) -> Self {
        let metrics_port = free_port();
        let yaml = format!(
            "metrics:\n  listen: 127.0.0.1:{metrics_port}\npipelines:\n  - name: dbz\n    source:\n{source}    kafka:\n      brokers: {}\n      topic_prefix: {prefix}\n    sinks:\n{sinks}",
            broker.bootstrap()
        );
        let config = dir.join("pipeline.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let daemon = Daemon::start(
            &["run", "-c", &config.display().to_string(), "--role", "sink"],
            &dir.join("sink.log"),
        );
        wait_until(Duration::from_secs(60), "tidelink ready", || async {
            http_get(metrics_port, "/readyz")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        })
        .await;
        Self { config, daemon }
    }

    /// `tidelink verify` of `table` exits 0. tidelink never ran this source, so verify is
    /// told the table (there is no publication of its own to list them).
    fn assert_verify_clean(&self, table: &str) {
        let log = self.config.with_file_name("verify.log");
        let (code, output) = run_verify(&self.config, "dbz", &["--table", table], &log);
        assert_eq!(code, Some(0), "verify: {output}");
        let name = table.rsplit('.').next().unwrap_or(table);
        assert!(output.contains(name), "{output}");
    }
}

/// Debezium's PostgreSQL connector → Kafka → tidelink's PostgreSQL sink, with `settings`
/// on the connector: snapshot and streamed changes arrive exactly.
async fn postgres_topics_apply(schemas: JsonSchemas, settings: &[(&str, &str)], schema: &str) {
    let source = PgCluster::start();
    source.create_database("app").await;
    let app = source.client("app").await;
    app.batch_execute(schema).await.expect("source schema");
    app.batch_execute(&snapshot_rows(schemas))
        .await
        .expect("snapshot rows");
    let target = PgCluster::start();
    target.create_database("replica").await;
    let replica = target.client("replica").await;
    replica.batch_execute(schema).await.expect("target schema");
    let broker = Broker::start();

    let mut connector = DebeziumSource::postgres(&source, "app", "dbz", "public.all_types");
    for (key, value) in settings {
        connector = connector.with(key, value);
    }
    let mut connect = KafkaConnect::start(&broker, connector, schemas);
    connect.wait_streaming(Duration::from_secs(120));
    app.batch_execute(&streamed_changes(schemas))
        .await
        .expect("streamed changes");

    let work = tempfile::tempdir().expect("work dir");
    let sink = SinkRun::start(
        work.path(),
        &broker,
        "dbz",
        &format!(
            "      postgres:\n        dsn: {}\n        tables: [public.all_types]\n",
            source.dsn("app")
        ),
        &format!(
            "      - name: replica\n        postgres:\n          dsn: {}\n",
            target.dsn("replica")
        ),
    )
    .await;
    let expected = table_rows(&app, "all_types", "id").await;
    assert_eq!(expected.len(), 3);
    let arrived = wait_until_equal(CATCH_UP, || async {
        table_rows(&replica, "all_types", "id").await == expected
    })
    .await;
    assert!(
        arrived,
        "target differs from source:\n source {expected:#?}\n target {:#?}\n{}\n{}",
        table_rows(&replica, "all_types", "id").await,
        sink.daemon.output(),
        connect.log_tail(40)
    );
    sink.assert_verify_clean("public.all_types");
}

/// The snapshot rows as Debezium carries them with or without schemas. Without, the
/// table has no bit column, and `time.precision.mode=isostring` cannot write
/// `24:00:00` (Java's LocalTime ends at 23:59:59.999999999; Debezium sends 00:00:00).
fn snapshot_rows(schemas: JsonSchemas) -> String {
    match schemas {
        JsonSchemas::Enabled => PG_SNAPSHOT_ROWS.to_owned(),
        JsonSchemas::Disabled => PG_SNAPSHOT_ROWS
            .replace(", B'1010'", "")
            .replace(", B'0000'", "")
            .replace("'24:00:00'", "'23:59:59.999999'"),
    }
}

fn streamed_changes(schemas: JsonSchemas) -> String {
    match schemas {
        JsonSchemas::Enabled => PG_STREAMED_CHANGES.to_owned(),
        JsonSchemas::Disabled => PG_STREAMED_CHANGES.replace(", c_bit = B'0110'", ""),
    }
}

async fn wait_until_equal<F, Fut>(timeout: Duration, mut equal: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if equal().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// With schemas, every logical type (Decimal, VariableScaleDecimal, Date, MicroTime,
/// MicroTimestamp, Bits, Point, …) is decoded by its schema: Debezium's defaults apply,
/// but for `interval.handling.mode=string` (its default, microseconds with 30.4375-day
/// months, is an approximation of its own).
#[tokio::test(flavor = "multi_thread")]
async fn debezium_postgres_topics_with_schemas_apply_exactly() {
    postgres_topics_apply(
        JsonSchemas::Enabled,
        &[("interval.handling.mode", "string")],
        &pg_types_schema(),
    )
    .await;
}

/// Without schemas a message cannot say a number's scale or a date's unit: Debezium is
/// set to write text for those (the settings docs/debezium.md gives). Bits carry no length
/// without a schema; that column needs schemas. A point arrives as `{"x", "y", …}`.
#[tokio::test(flavor = "multi_thread")]
async fn debezium_postgres_topics_without_schemas_apply_with_text_settings() {
    let schema = pg_types_schema().replace(" c_bit bit(4),", "");
    assert!(!schema.contains("c_bit"), "{schema}");
    postgres_topics_apply(
        JsonSchemas::Disabled,
        &[
            ("decimal.handling.mode", "string"),
            ("time.precision.mode", "isostring"),
            ("interval.handling.mode", "string"),
        ],
        &schema,
    )
    .await;
}

/// Debezium's MySQL connector in its MariaDB mode → Kafka → tidelink's MySQL sink: the
/// type tests' rows (snapshot, then streamed and updated) arrive exactly.
async fn mariadb_topics_apply(schemas: JsonSchemas, settings: &[(&str, &str)], excluded: &[&str]) {
    let source = MariaDb::start(1);
    source.execute("mysql", "CREATE DATABASE shop").await;
    source.execute("shop", TYPES_TABLE).await;
    let target = MariaDb::start(2);
    target.execute("mysql", "CREATE DATABASE shop").await;
    target.execute("shop", TYPES_TABLE).await;
    // Columns Debezium is told to leave out of its events are not in the target either.
    for column in excluded {
        target
            .execute(
                "shop",
                &format!("ALTER TABLE shop.types DROP COLUMN {column}"),
            )
            .await;
    }
    // The first row before Debezium starts (its snapshot), the others streamed.
    let rows: Vec<&str> = TYPES_ROWS.split(";\n").collect();
    assert_eq!(rows.len(), 3);
    source.execute("shop", rows[0]).await;
    let broker = Broker::start();
    let work = tempfile::tempdir().expect("work dir");
    let mut connector =
        DebeziumSource::mariadb(&source, "dbzmy", "shop", &work.path().join("history"));
    for (key, value) in settings {
        connector = connector.with(key, value);
    }
    if !excluded.is_empty() {
        let list: Vec<String> = excluded.iter().map(|c| format!("shop.types.{c}")).collect();
        connector = connector.with("column.exclude.list", &list.join(","));
    }
    let mut connect = KafkaConnect::start(&broker, connector, schemas);
    connect.wait_streaming(Duration::from_secs(120));
    for row in &rows[1..] {
        source.execute("shop", row).await;
    }
    // Debezium 2.6 snapshots a MariaDB BLOB as null (it logs "Unexpected JDBC BINARY value
    // … MariaDbBlob"): the snapshot row's blob is set again by a streamed update.
    source
        .execute(
            "shop",
            "UPDATE shop.types SET t_varchar = 'updated ✓', t_big_u = 18446744073709551614 WHERE id = 3;\n\
             UPDATE shop.types SET t_blob = X'CAFEBABE' WHERE id = 1;\n\
             INSERT INTO shop.types (id, t_int) VALUES (4, 4);\nDELETE FROM shop.types WHERE id = 4",
        )
        .await;

    let sink = SinkRun::start(
        work.path(),
        &broker,
        "dbzmy",
        &format!(
            "      mysql:\n        dsn: {}\n        tables: [shop.types]\n",
            source.dsn("shop")
        ),
        &format!(
            "      - name: replica\n        mysql:\n          dsn: {}\n",
            target.dsn("mysql")
        ),
    )
    .await;
    let mut source_conn = source.conn("shop").await;
    let kept: Vec<String> = source_conn
        .query(
            "SELECT column_name FROM information_schema.columns \
             WHERE table_schema = 'shop' AND table_name = 'types' ORDER BY ordinal_position",
        )
        .await
        .expect("source columns");
    let kept: Vec<String> = kept
        .into_iter()
        .filter(|c| !excluded.contains(&c.as_str()))
        .collect();
    let source_view = format!("(SELECT {} FROM shop.types) AS kept", kept.join(", "));
    let expected = mariadb_rows(&mut source_conn, &source_view, "id").await;
    assert_eq!(expected.len(), 3);
    let mut target_conn = target.conn("shop").await;
    let mut arrived = false;
    for _ in 0..(CATCH_UP.as_secs() * 2) {
        if mariadb_rows(&mut target_conn, "shop.types", "id").await == expected {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        arrived,
        "target differs from source:\n source {expected:#?}\n target {:#?}\n{}\n{}",
        mariadb_rows(&mut target_conn, "shop.types", "id").await,
        sink.daemon.output(),
        connect.log_tail(40)
    );
    sink.assert_verify_clean("shop.types");
}

/// With schemas: Debezium's defaults but for `bigint.unsigned.handling.mode=precise` (its
/// default wraps values above 2^63 into negative numbers).
#[tokio::test(flavor = "multi_thread")]
async fn debezium_mariadb_topics_with_schemas_apply_exactly() {
    mariadb_topics_apply(
        JsonSchemas::Enabled,
        &[("bigint.unsigned.handling.mode", "precise")],
        &[],
    )
    .await;
}

/// Without schemas: decimals as text. Debezium 2.6's MySQL connector has no text mode for
/// dates and times (they are numbers whose unit only the schema gives), BIT arrives as
/// bytes of unknown length, and BIGINT UNSIGNED either wraps above 2^63 (`long`) or is
/// scale-less Decimal bytes (`precise`): those columns are left out of its events here.
#[tokio::test(flavor = "multi_thread")]
async fn debezium_mariadb_topics_without_schemas_apply_with_text_settings() {
    mariadb_topics_apply(
        JsonSchemas::Disabled,
        &[("decimal.handling.mode", "string")],
        &["t_big_u", "t_bit", "t_date", "t_time", "t_datetime"],
    )
    .await;
}
