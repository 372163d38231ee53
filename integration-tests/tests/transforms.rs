//! A sink's transforms end to end, PostgreSQL → PostgreSQL: a dropped column never reaches
//! the target, a masked column holds the SHA-256 of the source value, and a row filter
//! keeps exactly the rows it accepts — through the snapshot, inserts, updates that move rows
//! into and out of the filter, and deletes. `verify` applies the same transforms, finds the
//! target equal, then finds a tampered value and a row the filter rejects.

use std::time::Duration;
use tidelink_integration_tests::{first_column, http_get, table_rows, wait_until, PgPipeline};

const SCHEMA: &str = "
    CREATE TABLE customers (id int PRIMARY KEY, email text, password text,
                            region text NOT NULL, amount numeric(10,2));
    CREATE TABLE notes (id int PRIMARY KEY, body text);";

const TRANSFORMS: &str = "          create_tables: true
        transforms:
          - tables: [public.customers]
            drop_columns: [password]
            mask: { email: hash }
            filter: \"region = 'eu' and amount >= 10\"
";

/// What the target must hold: the source's rows the filter accepts, shaped as the sink does.
const EXPECTED: &str =
    "(SELECT id, encode(sha256(convert_to(email, 'UTF8')), 'hex') AS email, region, amount
     FROM customers WHERE region = 'eu' AND amount >= 10)";

#[tokio::test(flavor = "multi_thread")]
async fn transforms_drop_mask_and_filter_and_verify_accounts_for_them() {
    let p = PgPipeline::start_with(SCHEMA, "").await;
    let app = p.source.client("app").await;
    // Rows the snapshot copies: every third in the US, amounts 0..50.
    app.batch_execute(
        "INSERT INTO customers SELECT g, 'user' || g || '@example.com', 'secret' || g,
                CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END, g % 50
           FROM generate_series(1, 300) g;
         INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 50) g;",
    )
    .await
    .expect("rows before the start");
    let config = p.write_config("transforms.yaml", TRANSFORMS);
    let daemon = p.run_ready(&config, "run.log").await;
    app.batch_execute(
        "INSERT INTO customers SELECT g, 'user' || g || '@example.com', 'secret' || g,
                CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END, g % 50
           FROM generate_series(301, 600) g;
         -- Into the filter, out of it, and changed while in it.
         UPDATE customers SET region = 'eu', amount = 25 WHERE id IN (3, 6, 303);
         UPDATE customers SET region = 'us' WHERE id IN (10, 11, 310);
         UPDATE customers SET email = 'changed' || id || '@example.com', password = 'new'
          WHERE id BETWEEN 20 AND 40;
         UPDATE customers SET amount = 5 WHERE id IN (44, 344);
         DELETE FROM customers WHERE id IN (13, 14, 313);
         UPDATE notes SET body = 'edited' WHERE id = 7;",
    )
    .await
    .expect("changes");

    let target = p.target.client("replica").await;
    let expected_rows = table_rows(&app, EXPECTED, "id").await;
    assert!(expected_rows.len() > 300, "the workload keeps most rows");
    wait_until(
        Duration::from_secs(120),
        "the target holds the filtered, masked rows",
        || {
            let (target, expected) = (&target, &expected_rows);
            async move {
                let sql = "(SELECT id, email, region, amount FROM customers)";
                target
                    .query_one("SELECT to_regclass('customers') IS NOT NULL", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, bool>(0))
                    && table_rows(target, sql, "id").await == *expected
            }
        },
    )
    .await;
    p.wait_in_sync(&[("notes", "id")], Duration::from_secs(60))
        .await;
    let columns: Vec<String> = first_column(
        &target,
        "SELECT column_name::text FROM information_schema.columns
          WHERE table_name = 'customers' ORDER BY ordinal_position",
    )
    .await
    .expect("columns");
    assert_eq!(
        columns,
        ["id", "email", "region", "amount"],
        "password is dropped"
    );
    let metrics = http_get(p.metrics_port, "/metrics")
        .await
        .unwrap_or_default();
    let filtered = metrics
        .lines()
        .find(|l| l.starts_with("tidelink_sink_changes_filtered_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        filtered >= 100.0,
        "filtered changes are counted: {filtered}"
    );
    drop(daemon);

    let verify = |log: &str| p.verify(&config, "it", &[], log);
    let (code, output) = verify("verify-1.log");
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("equal      public.customers → public.customers (replica)"),
        "{output}"
    );
    // A masked value tampered with, and a row the filter rejects (id 9 is in the US).
    target
        .batch_execute(
            "UPDATE customers SET email = 'plain@example.com' WHERE id = 26;
             INSERT INTO customers VALUES (9, 'x', 'us', 40);",
        )
        .await
        .expect("drift");
    let (code, output) = verify("verify-2.log");
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("extra      {\"id\":9}"), "{output}");
    assert!(output.contains("column email"), "{output}");
}
