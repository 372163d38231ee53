//! End-to-end: schemas as users have them. A TPC-B-like schema whose history table has no
//! primary key (REPLICA IDENTITY FULL, nullable columns, equal rows) beside keyed tables,
//! copied by the snapshot and streamed under a concurrent workload; a table whose every
//! change the target rejects beside tables that keep flowing.

use std::time::Duration;
use tidelink_integration_tests::{first_column, http_get, metric_sum, PgPipeline};

const CATCH_UP: Duration = Duration::from_secs(180);

/// pgbench's tables; `history` has no key, like pgbench_history.
const TPCB_SCHEMA: &str = r#"
CREATE TABLE branches (bid int PRIMARY KEY, bbalance int NOT NULL, filler char(88));
CREATE TABLE tellers (tid int PRIMARY KEY, bid int NOT NULL, tbalance int NOT NULL, filler char(84));
CREATE TABLE accounts (aid int PRIMARY KEY, bid int NOT NULL, abalance int NOT NULL, filler char(84));
CREATE TABLE history (tid int, bid int, aid int, delta int NOT NULL, mtime timestamp, filler char(22), note json);
ALTER TABLE history REPLICA IDENTITY FULL;
INSERT INTO branches SELECT b, 0, NULL FROM generate_series(1, 2) b;
INSERT INTO tellers SELECT t, 1 + (t - 1) / 10, 0, NULL FROM generate_series(1, 20) t;
INSERT INTO accounts SELECT a, 1 + (a - 1) / 1000, 0, '' FROM generate_series(1, 2000) a;
-- Existing history: NULLs, and rows that are equal to each other.
INSERT INTO history SELECT 1 + g % 20, 1 + g % 2, 1 + g % 2000, g % 7, '2024-01-01 00:00:00', NULL, NULL
  FROM generate_series(1, 3000) g;
INSERT INTO history VALUES (1, 1, 1, 0, NULL, NULL, NULL), (1, 1, 1, 0, NULL, NULL, NULL),
  (2, 2, 2, 5, '2024-01-02', 'same', '{"k": 1}'), (2, 2, 2, 5, '2024-01-02', 'same', '{"k": 1}');
"#;

/// One TPC-B transaction per round, and every tenth round a delete of one of two equal
/// history rows and an update of another row, with NULLs in the new rows.
async fn tpcb_workload(source: &tokio_postgres::Client, rounds: i32) {
    for round in 0..rounds {
        let (aid, tid, bid, delta) = (
            1 + round * 7 % 2000,
            1 + round % 20,
            1 + round % 2,
            round % 11 - 5,
        );
        let filler = if round % 3 == 0 {
            "NULL".to_string()
        } else {
            format!("'r{}'", round % 4)
        };
        let mut sql = format!(
            "BEGIN;
             UPDATE accounts SET abalance = abalance + {delta} WHERE aid = {aid};
             UPDATE tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};
             UPDATE branches SET bbalance = bbalance + {delta} WHERE bid = {bid};
             INSERT INTO history VALUES ({tid}, {bid}, {aid}, {delta}, '2024-06-01 12:00:00', {filler}, NULL);"
        );
        if round % 10 == 0 {
            sql.push_str(
                "DELETE FROM history WHERE ctid = (SELECT ctid FROM history WHERE tid = 1 AND aid = 1 AND mtime IS NULL LIMIT 1);
                 UPDATE history SET delta = delta + 100, note = '{\"updated\": true}' WHERE ctid = (SELECT ctid FROM history WHERE filler IS NULL AND delta < 100 LIMIT 1);
                 INSERT INTO history VALUES (1, 1, 1, 0, NULL, NULL, NULL);",
            );
        }
        sql.push_str("COMMIT;");
        source.batch_execute(&sql).await.expect("tpc-b round");
    }
}

const TPCB_TABLES: [(&str, &str); 4] = [
    ("branches", "bid"),
    ("tellers", "tid"),
    ("accounts", "aid"),
    ("history", "t::text"),
];

/// The target starts empty; the sink creates every table. The history table is copied by
/// the snapshot with its equal rows and NULLs, created without a key and without NOT NULL
/// where the source has none, streamed under the workload, and `verify` finds it equal.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_key_is_snapshotted_created_and_streamed_beside_keyed_tables() {
    let p = PgPipeline::start_with(TPCB_SCHEMA, "").await;
    let config = p.write_config("tpcb.yaml", "          create_tables: true\n");
    let source = p.source.client("app").await;
    let daemon = p.run(&config, &[], "tpcb.log");
    // Changes committed while the snapshot runs, and after.
    tpcb_workload(&source, 150).await;
    p.wait_ready().await;
    tpcb_workload(&source, 150).await;
    p.wait_in_sync(&TPCB_TABLES, CATCH_UP).await;

    let target = p.target.client("replica").await;
    let keys: Vec<i64> = first_column(
        &target,
        "SELECT count(*) FROM pg_index WHERE indrelid = 'history'::regclass",
    )
    .await
    .expect("indexes");
    assert_eq!(keys, vec![0], "the created history table has no key");
    let nullable: Vec<String> = first_column(
        &target,
        "SELECT attname::text FROM pg_attribute WHERE attrelid = 'history'::regclass AND attnum > 0 \
         AND NOT attnotnull ORDER BY attnum",
    )
    .await
    .expect("columns");
    assert_eq!(
        nullable,
        ["tid", "bid", "aid", "mtime", "filler", "note"],
        "NOT NULL only where the source has it"
    );
    let duplicates: Vec<i64> = first_column(
        &target,
        "SELECT count(*) FROM history WHERE filler = 'same'",
    )
    .await
    .expect("count");
    assert_eq!(duplicates, vec![2], "equal rows stay two rows");

    let metrics = http_get(p.metrics_port, "/metrics").await.expect("metrics");
    assert_eq!(
        metric_sum(&metrics, "tidelink_sink_dead_letter_messages_total"),
        0.0,
        "nothing dead-lettered:\n{}",
        p.logs_tail()
    );
    let (code, output) = p.verify(&config, "it", &[], "tpcb-verify.log");
    assert_eq!(code, Some(0), "verify finds every table equal:\n{output}");
    drop(daemon);
}

/// A restart after everything was copied repeats nothing of the table without a key: its
/// stored snapshot keeps leaving out what the copy holds, and the stream goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_the_snapshot_of_a_table_without_a_key_copies_and_applies_it_once() {
    let p = PgPipeline::start(TPCB_SCHEMA).await;
    // The target has the schema already: empty it, keep the tables.
    p.target
        .client("replica")
        .await
        .batch_execute("TRUNCATE branches, tellers, accounts, history")
        .await
        .expect("empty target");
    let config = p.write_config("restart.yaml", "");
    let source = p.source.client("app").await;
    let daemon = p.run_ready(&config, "restart-1.log").await;
    tpcb_workload(&source, 100).await;
    p.wait_in_sync(&TPCB_TABLES, CATCH_UP).await;
    daemon.kill9();
    tpcb_workload(&source, 50).await;
    let _daemon = p.run_ready(&config, "restart-2.log").await;
    tpcb_workload(&source, 50).await;
    p.wait_in_sync(&TPCB_TABLES, CATCH_UP).await;
    let log = std::fs::read_to_string(p.work.path().join("restart-2.log")).unwrap_or_default();
    assert!(
        !log.contains("copying a table without a key"),
        "the finished snapshot is not taken again:\n{log}"
    );
}

const POISON_SCHEMA: &str = r#"
CREATE TABLE good (id int PRIMARY KEY, v text);
CREATE TABLE poison (id int PRIMARY KEY, v text);
"#;

/// Every change of one table is rejected by the target (its column is an integer there).
/// They all reach the dead-letter topic, the other table in the same partitions keeps
/// being applied, and the sink commits them a batch at a time, not a message at a time.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_the_target_rejects_is_dead_lettered_in_batches_while_the_others_flow() {
    let p = PgPipeline::start_with(
        POISON_SCHEMA,
        "CREATE TABLE good (id int PRIMARY KEY, v text); CREATE TABLE poison (id int PRIMARY KEY, v int);",
    )
    .await;
    let config = p.write_config_without_snapshot("poison.yaml", "");
    let _daemon = p.run_ready(&config, "poison.log").await;
    let source = p.source.client("app").await;
    for round in 0..10 {
        source
            .batch_execute(&format!(
                "INSERT INTO poison SELECT g, 'not a number' FROM generate_series({0} * 500 + 1, {0} * 500 + 500) g;
                 INSERT INTO good SELECT g, 'fine' FROM generate_series({0} * 500 + 1, {0} * 500 + 500) g;",
                round
            ))
            .await
            .expect("workload");
    }
    p.wait_in_sync(&[("good", "id")], CATCH_UP).await;
    let port = p.metrics_port;
    tidelink_integration_tests::wait_until(
        Duration::from_secs(120),
        "every poison change is dead-lettered",
        || async move {
            http_get(port, "/metrics").await.is_some_and(|m| {
                metric_sum(&m, "tidelink_sink_dead_letter_messages_total") >= 5000.0
            })
        },
    )
    .await;
    let metrics = http_get(p.metrics_port, "/metrics").await.expect("metrics");
    assert_eq!(
        metric_sum(&metrics, "tidelink_sink_dead_letter_messages_total"),
        5000.0
    );
    let batches = metric_sum(&metrics, "tidelink_sink_batches_total");
    assert!(
        batches < 500.0,
        "10,000 changes, half of them rejected, took {batches} target transactions"
    );
    let target = p.target.client("replica").await;
    let rows: Vec<i64> = first_column(&target, "SELECT count(*) FROM poison")
        .await
        .expect("count");
    assert_eq!(rows, vec![0]);
}

/// Columns added, renamed, widened and dropped on the source reach the target in order
/// with the rows, which end equal to the source's; a type change the target cannot hold
/// sends the table's changes to the dead-letter topic with the reason instead.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_on_the_source_reach_the_target_in_order_with_the_data() {
    let schema =
        "CREATE TABLE items (id int PRIMARY KEY, name varchar(10), qty int NOT NULL DEFAULT 0);
                  CREATE TABLE other (id int PRIMARY KEY, v text);";
    let p = PgPipeline::start(schema).await;
    let config = p.write_config_without_snapshot("schema.yaml", "");
    let _daemon = p.run_ready(&config, "schema.log").await;
    let source = p.source.client("app").await;
    let steps = [
        "INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 300) g",
        "ALTER TABLE items ADD COLUMN note text",
        "INSERT INTO items SELECT g, 'n' || g, g, 'note ' || g FROM generate_series(301, 600) g",
        "UPDATE items SET note = 'later' WHERE id % 7 = 0",
        "ALTER TABLE items RENAME COLUMN name TO title",
        "UPDATE items SET title = 't' || id WHERE id % 5 = 0",
        "ALTER TABLE items ALTER COLUMN title TYPE varchar(40)",
        "INSERT INTO items VALUES (601, 'a title longer than ten characters', 1, 'wide')",
        "ALTER TABLE items DROP COLUMN qty",
        "INSERT INTO items SELECT g, 'after drop', 'x' FROM generate_series(602, 700) g",
        "DELETE FROM items WHERE id % 11 = 0",
    ];
    for (i, step) in steps.iter().enumerate() {
        source.batch_execute(step).await.expect("step");
        source
            .batch_execute(&format!("INSERT INTO other VALUES ({i}, 'step {i}')"))
            .await
            .expect("other");
    }
    p.wait_in_sync(&[("items", "id"), ("other", "id")], CATCH_UP)
        .await;
    let target = p.target.client("replica").await;
    let columns: Vec<String> = first_column(
        &target,
        "SELECT attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .await
    .expect("columns");
    assert_eq!(
        columns,
        ["id integer", "title character varying(40)", "note text"],
        "the target follows the source's columns"
    );

    // A type change the target cannot follow (integer to text): it is not made by itself,
    // the error names the column and both types, the rows the target rejects are
    // dead-lettered, and the other table keeps flowing.
    source
        .batch_execute(
            "ALTER TABLE items ADD COLUMN code integer;
             INSERT INTO items VALUES (800, 'coded', 'n', 5);",
        )
        .await
        .expect("code column");
    p.wait_in_sync(&[("items", "id")], CATCH_UP).await;
    source
        .batch_execute(
            "ALTER TABLE items ALTER COLUMN code TYPE text;
             INSERT INTO items VALUES (801, 'lettered', 'n', 'abc');
             INSERT INTO other VALUES (100, 'after the type change');",
        )
        .await
        .expect("type change");
    p.wait_in_sync(&[("other", "id")], CATCH_UP).await;
    let port = p.metrics_port;
    tidelink_integration_tests::wait_until(
        Duration::from_secs(60),
        "the row the target cannot hold is dead-lettered",
        || async move {
            http_get(port, "/metrics")
                .await
                .is_some_and(|m| metric_sum(&m, "tidelink_sink_dead_letter_messages_total") >= 1.0)
        },
    )
    .await;
    let log = std::fs::read_to_string(p.work.path().join("schema.log")).unwrap_or_default();
    assert!(
        log.contains("column `code` is integer in the target but text in the source"),
        "the error names the column and the types:\n{}",
        p.logs_tail()
    );
    let kept: Vec<String> = first_column(&target, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'code'")
        .await
        .expect("type");
    assert_eq!(kept, ["integer"], "never changed by itself");
}

/// A partitioned table arrives in one target table, rows moving between partitions
/// included; a table created on the source while the pipeline runs is picked up (added to
/// the publication, its existing rows copied, then streamed) without a restart, and a
/// table created without a usable key is reported and left alone.
#[tokio::test(flavor = "multi_thread")]
async fn partitioned_and_newly_created_tables_reach_the_target_without_a_restart() {
    let schema = "CREATE TABLE measurements (id int, region text, v int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
                  CREATE TABLE measurements_eu PARTITION OF measurements FOR VALUES IN ('eu');
                  CREATE TABLE measurements_us PARTITION OF measurements FOR VALUES IN ('us');
                  INSERT INTO measurements SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g FROM generate_series(1, 1000) g;";
    let p = PgPipeline::start_with(schema, "").await;
    let config = p.write_config("partitions.yaml", "          create_tables: true\n");
    let _daemon = p.run_ready(&config, "partitions.log").await;
    let source = p.source.client("app").await;
    source
        .batch_execute(
            "INSERT INTO measurements SELECT g, 'eu', g FROM generate_series(1001, 1500) g;
             UPDATE measurements SET region = 'us', v = v + 1 WHERE id % 10 = 0 AND region = 'eu';
             DELETE FROM measurements WHERE id % 13 = 0;",
        )
        .await
        .expect("partition workload");
    p.wait_in_sync(&[("measurements", "id, region")], CATCH_UP)
        .await;
    let target = p.target.client("replica").await;
    let partitions: Vec<i64> = first_column(
        &target,
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'measurements%'",
    )
    .await
    .expect("tables");
    assert_eq!(partitions, vec![2], "one target table (and its key index)");

    source
        .batch_execute(
            "CREATE TABLE late (id int PRIMARY KEY, v text);
             INSERT INTO late SELECT g, 'before' FROM generate_series(1, 300) g;
             CREATE TABLE loose (a int);",
        )
        .await
        .expect("new tables");
    // Changes while the new table is being picked up, and after.
    for round in 0..20 {
        source
            .batch_execute(&format!(
                "INSERT INTO late VALUES ({}, 'during'); UPDATE late SET v = 'changed' WHERE id = {};",
                1000 + round,
                1 + round
            ))
            .await
            .expect("late workload");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    p.wait_in_sync(&[("late", "id"), ("measurements", "id, region")], CATCH_UP)
        .await;
    let log = std::fs::read_to_string(p.work.path().join("partitions.log")).unwrap_or_default();
    assert!(
        log.contains("table public.loose has no primary key") && log.contains("is not captured"),
        "the table that cannot be captured is named:\n{}",
        p.logs_tail()
    );
    let (code, output) = p.verify(&config, "it", &[], "partitions-verify.log");
    assert_eq!(code, Some(0), "verify finds every table equal:\n{output}");
}

/// `schema_changes: ignore` leaves the target as it is and writes the columns it has;
/// `truncate: ignore` leaves its rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_sink_that_ignores_schema_changes_and_truncates_keeps_its_table_as_it_is() {
    let p = PgPipeline::start("CREATE TABLE items (id int PRIMARY KEY, name text)").await;
    let config = p.write_config_without_snapshot(
        "ignore.yaml",
        "        schema_changes: ignore\n        truncate: ignore\n",
    );
    let _daemon = p.run_ready(&config, "ignore.log").await;
    let source = p.source.client("app").await;
    source
        .batch_execute(
            "INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 100) g;
             ALTER TABLE items ADD COLUMN extra text;
             INSERT INTO items SELECT g, 'n' || g, 'x' FROM generate_series(101, 200) g;
             UPDATE items SET name = 'changed', extra = 'y' WHERE id % 10 = 0;",
        )
        .await
        .expect("workload");
    let target = p.target.client("replica").await;
    let expected: Vec<String> =
        first_column(&source, "SELECT (id, name)::text FROM items ORDER BY id")
            .await
            .expect("source");
    tidelink_integration_tests::wait_until(CATCH_UP, "the known columns arrive", || {
        let (target, expected) = (&target, &expected);
        async move {
            first_column::<String>(target, "SELECT t::text FROM items t ORDER BY id")
                .await
                .is_ok_and(|rows| rows == *expected)
        }
    })
    .await;
    source
        .batch_execute("TRUNCATE items; INSERT INTO items VALUES (1000, 'after', 'z');")
        .await
        .expect("truncate");
    tidelink_integration_tests::wait_until(CATCH_UP, "the row after the truncate arrives", || {
        let target = &target;
        async move {
            first_column::<i64>(target, "SELECT count(*) FROM items")
                .await
                .is_ok_and(|c| c == [201])
        }
    })
    .await;
    let columns: Vec<String> = first_column(
        &target,
        "SELECT attname::text FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .await
    .expect("columns");
    assert_eq!(columns, ["id", "name"], "the target keeps its columns");
}

/// A TRUNCATE of a keyed table is ordered against every partition of its topic: rows
/// inserted before it, in whichever partition their key hashes to, are gone afterwards;
/// rows inserted after it are kept, whichever partition's worker gets there first. The
/// backlog waits in Kafka for two sink workers in separate processes (one partition may
/// reach the barrier in one process while the others are still in the other), then the
/// same live.
#[tokio::test(flavor = "multi_thread")]
async fn a_truncate_of_a_keyed_table_is_ordered_across_partitions_and_workers() {
    let p = PgPipeline::start("CREATE TABLE items (id int PRIMARY KEY, name text)").await;
    let config = p.write_config_without_snapshot("barrier.yaml", "");
    let _source = p.run(&config, &["--role", "source"], "source.log");
    p.wait_source_streaming().await;
    let source = p.source.client("app").await;
    source
        .batch_execute(
            "INSERT INTO items SELECT g, 'before ' || g FROM generate_series(1, 3000) g;
             UPDATE items SET name = 'updated' WHERE id % 7 = 0;
             TRUNCATE items;
             INSERT INTO items SELECT g, 'after ' || g FROM generate_series(2001, 4000) g;
             DELETE FROM items WHERE id % 11 = 0;",
        )
        .await
        .expect("workload with a truncate");
    let sink_config = |name: &str| {
        let path = p.work.path().join(name);
        let text = std::fs::read_to_string(&config).expect("config");
        std::fs::write(
            &path,
            text.replace("metrics:\n", "metrics:\n  enabled: false\n")
                .replace("batch_size: 2000", "batch_size: 500"),
        )
        .expect("sink config");
        path
    };
    let (first, second) = (sink_config("sink-1.yaml"), sink_config("sink-2.yaml"));
    let _sink_1 = p.run(&first, &["--role", "sink"], "sink-1.log");
    let _sink_2 = p.run(&second, &["--role", "sink"], "sink-2.log");
    p.wait_in_sync(&[("items", "id")], CATCH_UP).await;
    // Live: truncates between inserts, while both workers hold partitions.
    for round in 0..3 {
        let base = 10_000 * (round + 1);
        source
            .batch_execute(&format!(
                "INSERT INTO items SELECT {base} + g, 'live' FROM generate_series(1, 500) g;
                 TRUNCATE items;
                 INSERT INTO items SELECT {base} + g, 'kept' FROM generate_series(501, 800) g;"
            ))
            .await
            .expect("live truncate");
    }
    p.wait_in_sync(&[("items", "id")], CATCH_UP).await;
    let target = p.target.client("replica").await;
    let left: Vec<i64> = first_column(&target, "SELECT count(*) FROM tidelink.truncate_barriers")
        .await
        .expect("barrier rows");
    assert_eq!(left, [0], "every barrier completed and was cleared");
    let (code, output) = p.verify(&config, "it", &[], "barrier-verify.log");
    assert_eq!(code, Some(0), "verify finds the table equal:\n{output}");
}
