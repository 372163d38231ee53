//! `tidelink backfill` against real servers: existing rows reach the target through Kafka
//! while the stream keeps changing them, and a killed backfill resumes.

use std::time::Duration;
use tidelink_integration_tests::{Daemon, PgPipeline};

const SCHEMA: &str = "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(14,2) NOT NULL, note text);";
const ROWS: i64 = 20_000;

async fn preloaded() -> PgPipeline {
    let p = PgPipeline::start(SCHEMA).await;
    p.source
        .client("app")
        .await
        .batch_execute(&format!(
            "INSERT INTO accounts SELECT g, 'owner ' || g, g % 1000, CASE WHEN g % 7 = 0 THEN NULL ELSE 'n' END \
             FROM generate_series(1, {ROWS}) g"
        ))
        .await
        .expect("preload");
    p
}

/// Random updates, deletes and inserts while the backfill runs.
async fn churn(p: &PgPipeline, rounds: usize) {
    let source = p.source.client("app").await;
    for round in 0..rounds {
        source
            .batch_execute(&format!(
                "BEGIN;
                 UPDATE accounts SET balance = balance + 1, note = 'round {round}'
                   WHERE id IN (SELECT (random() * {ROWS})::bigint + 1 FROM generate_series(1, 100));
                 DELETE FROM accounts WHERE id IN (SELECT (random() * {ROWS})::bigint + 1 FROM generate_series(1, 20));
                 INSERT INTO accounts SELECT 1000000 + {round} * 100 + g, 'new', 0, NULL FROM generate_series(1, 10) g;
                 COMMIT;"
            ))
            .await
            .expect("churn");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn backfill(p: &PgPipeline, config: &std::path::Path, chunk: &str, log: &str) -> Daemon {
    backfill_with(p, config, &["--chunk-size", chunk], log)
}

fn backfill_with(p: &PgPipeline, config: &std::path::Path, options: &[&str], log: &str) -> Daemon {
    let config = config.display().to_string();
    let mut args = vec!["backfill", "-c", &config, "--pipeline", "it"];
    args.extend_from_slice(options);
    Daemon::start(&args, &p.work.path().join(log))
}

#[tokio::test(flavor = "multi_thread")]
async fn existing_rows_are_backfilled_while_the_stream_changes_them() {
    let p = preloaded().await;
    let config = p.write_config_without_snapshot("backfill.yaml", "");
    let _daemon = p.run_ready(&config, "daemon.log").await;
    let churner = {
        let p = &p;
        async move { churn(p, 60).await }
    };
    let mut copier = backfill(&p, &config, "1000", "backfill.log");
    churner.await;
    let status = copier
        .wait(Duration::from_secs(120))
        .expect("backfill finishes");
    assert!(status.success(), "backfill failed:\n{}", copier.output());
    assert!(
        copier.output().contains("public.accounts: "),
        "{}",
        copier.output()
    );
    p.wait_in_sync(&[("accounts", "id")], Duration::from_secs(180))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_backfill_resumes_after_its_last_chunk() {
    let p = preloaded().await;
    let config = p.write_config_without_snapshot("resume.yaml", "");
    let _daemon = p.run_ready(&config, "daemon.log").await;
    // Held to 2,000 rows/s, the copy of 20,000 rows takes 10 s: it is still running when
    // its first progress line (after 2 s) shows some chunks copied.
    let copier = backfill_with(
        &p,
        &config,
        &["--chunk-size", "200", "--max-rate", "2000"],
        "backfill-1.log",
    );
    tidelink_integration_tests::wait_until(
        Duration::from_secs(60),
        "some chunks are copied",
        || async { copier.output().contains("rows/s") },
    )
    .await;
    copier.kill9();
    churn(&p, 10).await;
    let mut again = backfill(&p, &config, "200", "backfill-2.log");
    let status = again
        .wait(Duration::from_secs(120))
        .expect("second run finishes");
    assert!(status.success(), "{}", again.output());
    assert!(
        again
            .output()
            .contains("resuming after the last completed chunk"),
        "the rerun continues instead of starting over:\n{}",
        again.output()
    );
    p.wait_in_sync(&[("accounts", "id")], Duration::from_secs(180))
        .await;
    // A third run finds the table finished.
    let mut third = backfill(&p, &config, "200", "backfill-3.log");
    assert!(third
        .wait(Duration::from_secs(60))
        .is_some_and(|s| s.success()));
    assert!(
        third.output().contains("already backfilled"),
        "{}",
        third.output()
    );
}

/// The default `snapshot: initial`: the daemon copies the rows that existed before its first
/// start, while the stream changes them.
#[tokio::test(flavor = "multi_thread")]
async fn the_initial_snapshot_copies_existing_rows_while_streaming() {
    let p = preloaded().await;
    let config = p.write_config("initial.yaml", "");
    let daemon = p.run_ready(&config, "daemon.log").await;
    churn(&p, 40).await;
    // The target can equal the source a moment before the snapshot task reports that it
    // finished, so wait for the report first, then for the target.
    tidelink_integration_tests::wait_until(
        Duration::from_secs(180),
        "the daemon to report `snapshot complete`",
        || async { daemon.output().contains("snapshot complete") },
    )
    .await;
    p.wait_in_sync(&[("accounts", "id")], Duration::from_secs(180))
        .await;
}

/// `--direct`: the first load goes straight into the target with COPY while only the
/// source runs (changes wait in Kafka); a killed load resumes after its last chunk; then the
/// sink starts and applies the buffered changes on top. The target ends equal.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_backfill_loads_with_copy_and_the_stream_applies_on_top() {
    let p = preloaded().await;
    // Enough rows that the first load is still running when it is killed.
    p.source
        .client("app")
        .await
        .batch_execute(
            "INSERT INTO accounts SELECT 5000000 + g, 'bulk ' || g, g % 1000, NULL FROM generate_series(1, 500000) g",
        )
        .await
        .expect("bulk rows");
    let config = p.write_config_without_snapshot("direct.yaml", "");
    let _source = p.run(&config, &["--role", "source"], "source.log");
    p.wait_source_streaming().await;
    let direct = |log: &str| {
        let config = config.display().to_string();
        Daemon::start(
            &[
                "backfill",
                "-c",
                &config,
                "--pipeline",
                "it",
                "--chunk-size",
                "500",
                "--direct",
                "replica",
            ],
            &p.work.path().join(log),
        )
    };
    let first = direct("direct-1.log");
    tidelink_integration_tests::wait_until(
        Duration::from_secs(60),
        "some chunks are loaded",
        || async {
            p.target
                .client("replica")
                .await
                .query_one("SELECT count(*) FROM accounts", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) >= 2_000)
        },
    )
    .await;
    first.kill9();
    churn(&p, 20).await;
    let mut second = direct("direct-2.log");
    let status = second
        .wait(Duration::from_secs(120))
        .expect("direct load finishes");
    assert!(status.success(), "{}", second.output());
    assert!(
        second
            .output()
            .contains("resuming after the last loaded chunk"),
        "{}",
        second.output()
    );
    // A second process: its own config without the metrics endpoint the source holds.
    let sink_config = p.work.path().join("direct-sink.yaml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &sink_config,
        text.replace("metrics:\n", "metrics:\n  enabled: false\n"),
    )
    .expect("sink config");
    let _sink = p.run(&sink_config, &["--role", "sink"], "sink.log");
    p.wait_in_sync(&[("accounts", "id")], Duration::from_secs(180))
        .await;
}

/// `--direct` between PostgreSQL servers moves rows in binary `COPY` where the source's and
/// the target's columns share built-in types, and in text where they differ. The binary
/// chunks' composite key (text with a tab, a newline, a backslash and a non-ASCII letter;
/// an integer; a uuid) is read back from the binary form at every chunk's end, so the next
/// chunk starts where the last one stopped: the targets end equal to the source, row for row.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_backfill_copies_binary_where_types_match_and_text_where_they_differ() {
    const KEYED: &str = "CREATE TABLE keyed (code text, n int, id uuid, doc jsonb, tags text[], \
                         at timestamptz, amount numeric(14,2), note text, PRIMARY KEY (code, n, id));";
    let p = PgPipeline::start_with(
        &format!("{KEYED} CREATE TABLE widened (id int PRIMARY KEY, v int);"),
        &format!("{KEYED} CREATE TABLE widened (id int PRIMARY KEY, v bigint);"),
    )
    .await;
    let source = p.source.client("app").await;
    source
        .batch_execute(
            "INSERT INTO keyed SELECT E'c\\t' || (g % 7) || E'\\n\\\\\u{e9}', g % 13, md5(g::text)::uuid, \
                    jsonb_build_object('g', g), ARRAY['a', g::text], \
                    timestamptz '2026-01-01' + g * interval '1 second', g / 7.0, \
                    CASE WHEN g % 5 = 0 THEN NULL ELSE E'tab\\there' END \
             FROM generate_series(1, 3000) g;
             INSERT INTO widened SELECT g, g * 3 FROM generate_series(1, 3000) g;",
        )
        .await
        .expect("rows");
    let config = p.write_config_without_snapshot("direct.yaml", "");
    let config = config.display().to_string();
    let mut direct = Daemon::start(
        &[
            "backfill",
            "-c",
            &config,
            "--pipeline",
            "it",
            "--table",
            "public.keyed",
            "--table",
            "public.widened",
            "--chunk-size",
            "250",
            "--direct",
            "replica",
        ],
        &p.work.path().join("direct.log"),
    );
    let status = direct
        .wait(Duration::from_secs(120))
        .expect("direct load finishes");
    let output = direct.output();
    assert!(status.success(), "{output}");
    let format_of = |table: &str| {
        output
            .lines()
            .find(|line| line.contains("copying in COPY format") && line.contains(table))
            .unwrap_or_else(|| panic!("no format reported for {table}: {output}"))
            .to_string()
    };
    assert!(format_of("public.keyed").contains("Binary"), "{output}");
    assert!(format_of("public.widened").contains("Text"), "{output}");
    let target = p.target.client("replica").await;
    for (table, order) in [("keyed", "code, n, id"), ("widened", "id")] {
        let digest = format!(
            "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY {order})) FROM {table} t"
        );
        let of = |row: tokio_postgres::Row| (row.get::<_, i64>(0), row.get::<_, String>(1));
        let expected = of(source.query_one(&digest, &[]).await.expect("source digest"));
        let copied = of(target.query_one(&digest, &[]).await.expect("target digest"));
        assert_eq!(expected.0, 3000, "{table}");
        assert_eq!(copied, expected, "{table}");
    }
}

/// A 1M-row table backfilled through Kafka (four chunks in flight) while a workload
/// updates, deletes and inserts random rows: the target ends equal to the source.
#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_table_is_backfilled_while_it_changes() {
    const MILLION: i64 = 1_000_000;
    let p = PgPipeline::start(SCHEMA).await;
    p.source
        .client("app")
        .await
        .batch_execute(&format!(
            "INSERT INTO accounts SELECT g, 'owner ' || g, g % 1000, NULL FROM generate_series(1, {MILLION}) g"
        ))
        .await
        .expect("preload");
    let config = p.write_config_without_snapshot("million.yaml", "");
    let _daemon = p.run_ready(&config, "daemon.log").await;
    let config_text = config.display().to_string();
    let mut copier = Daemon::start(
        &[
            "backfill",
            "-c",
            &config_text,
            "--pipeline",
            "it",
            "--chunk-size",
            "10000",
            "--parallel",
            "4",
        ],
        &p.work.path().join("backfill.log"),
    );
    let source = p.source.client("app").await;
    for round in 0..40 {
        source
            .batch_execute(&format!(
                "BEGIN;
                 UPDATE accounts SET balance = balance + 1, note = 'round {round}'
                   WHERE id IN (SELECT (random() * {MILLION})::bigint + 1 FROM generate_series(1, 500));
                 DELETE FROM accounts WHERE id IN (SELECT (random() * {MILLION})::bigint + 1 FROM generate_series(1, 100));
                 INSERT INTO accounts SELECT 2000000 + {round} * 100 + g, 'new', 0, NULL FROM generate_series(1, 50) g;
                 COMMIT;"
            ))
            .await
            .expect("churn");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = copier
        .wait(Duration::from_secs(600))
        .expect("backfill finishes");
    assert!(status.success(), "{}", copier.output());
    p.wait_in_sync(&[("accounts", "id")], Duration::from_secs(600))
        .await;
}

/// A table without a primary key is refused with a message naming `--key-columns`, and
/// backfilled when the user names the columns of its unique NOT NULL index.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_primary_key_is_backfilled_by_named_unique_columns() {
    let schema = "CREATE TABLE codes (code text NOT NULL, region integer NOT NULL, label text);
                  CREATE UNIQUE INDEX codes_key ON codes (code, region);
                  ALTER TABLE codes REPLICA IDENTITY USING INDEX codes_key;";
    let p = PgPipeline::start(schema).await;
    p.source
        .client("app")
        .await
        .batch_execute(
            "INSERT INTO codes SELECT 'c' || (g % 700), g / 700, 'label ' || g FROM generate_series(1, 5000) g",
        )
        .await
        .expect("preload");
    let config = p.write_config_without_snapshot("codes.yaml", "");
    let _daemon = p.run_ready(&config, "daemon.log").await;
    let run = |extra: &[&str], log: &str| {
        let config = config.display().to_string();
        let mut args = vec![
            "backfill",
            "-c",
            config.as_str(),
            "--pipeline",
            "it",
            "--chunk-size",
            "300",
        ];
        args.extend_from_slice(extra);
        let mut daemon = Daemon::start(&args, &p.work.path().join(log));
        let status = daemon
            .wait(Duration::from_secs(120))
            .expect("backfill ends");
        (status, daemon.output())
    };
    let (status, output) = run(&["--key-columns", "label"], "wrong.log");
    assert!(
        !status.success() && output.contains("no unique index on exactly these columns"),
        "{output}"
    );
    // `tidelink status` shows the failed table with its reason until it is copied.
    let report = std::process::Command::new(tidelink_integration_tests::tidelink_binary())
        .args(["status", "-c", &config.display().to_string()])
        .output()
        .expect("status");
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.contains("public.codes  FAILED") && report.contains("no unique index"),
        "{report}"
    );
    let (status, output) = run(&["--key-columns", "region,code"], "right.log");
    assert!(status.success(), "{output}");
    p.source
        .client("app")
        .await
        .batch_execute("UPDATE codes SET label = 'changed' WHERE region = 3")
        .await
        .expect("update");
    p.wait_in_sync(&[("codes", "code, region")], Duration::from_secs(120))
        .await;
}
