//! `tidelink verify` PostgreSQL → PostgreSQL: ranges compared by checksums computed in
//! each database, differing ranges read row by row, every kind of difference reported.

use std::time::Duration;
use tidelink_integration_tests::PgPipeline;

#[tokio::test(flavor = "multi_thread")]
async fn verify_checksums_ranges_and_finds_each_kind_of_difference() {
    let p = PgPipeline::start(
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[])",
    )
    .await;
    let config = p.write_config("verify.yaml", "");
    let daemon = p.run_ready(&config, "run.log").await;
    p.source
        .client("app")
        .await
        .batch_execute(
            "INSERT INTO items SELECT g, 'item ' || g, g / 100.0, ARRAY['t' || (g % 7)] FROM generate_series(1, 30000) g",
        )
        .await
        .expect("rows");
    p.wait_in_sync(&[("items", "id")], Duration::from_secs(180))
        .await;
    drop(daemon);
    let verify = |log: &str| p.verify(&config, "it", &["--chunk-size", "1000"], log);
    let (code, output) = verify("verify-1.log");
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("equal      public.items → public.items (replica): 30000 rows"),
        "{output}"
    );
    assert!(
        output.contains("0 ranges read row by row"),
        "equal ranges are settled by their checksums:\n{output}"
    );
    p.target
        .client("replica")
        .await
        .batch_execute(
            "UPDATE items SET price = 0.01 WHERE id = 15000;
             DELETE FROM items WHERE id = 20;
             INSERT INTO items VALUES (40000, 'beyond the end', 1, NULL), (0, 'before the start', 1, NULL);",
        )
        .await
        .expect("drift");
    let (code, output) = verify("verify-2.log");
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("1 missing, 2 extra, 1 different"),
        "{output}"
    );
    assert!(output.contains("missing    {\"id\":20}"), "{output}");
    assert!(output.contains("extra      {\"id\":40000}"), "{output}");
    assert!(output.contains("extra      {\"id\":0}"), "{output}");
    assert!(output.contains("column price"), "{output}");
    assert!(
        output.contains("2 ranges read row by row"),
        "only the differing ranges are read:\n{output}"
    );
}
