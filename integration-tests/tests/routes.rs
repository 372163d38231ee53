//! Topic routing: two shards of a table share one topic (`kafka.routes`), keys that collide
//! across the shards stay apart, and the sink replays each change into its own table.

use std::path::PathBuf;
use std::time::Duration;
use tidelink_integration_tests::PgPipeline;

/// The pipeline's config, streaming only (no snapshot), with the `orders_*` shards routed
/// into one topic `it.public.orders`.
fn write_routed_config(p: &PgPipeline, sink_extra: &str) -> PathBuf {
    let config = p.write_config_without_snapshot("routes.yaml", sink_extra);
    let yaml = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        yaml.replace(
            "      partitions: 4\n",
            "      partitions: 4\n      routes:\n        - tables: [public.orders_*]\n          topic: it.public.orders\n",
        ),
    )
    .expect("write config");
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn routed_tables_share_one_topic_and_arrive_in_their_own_tables() {
    let schema = "CREATE TABLE orders_2024 (id int PRIMARY KEY, amount int);
                  CREATE TABLE orders_2025 (id int PRIMARY KEY, amount int);";
    let p = PgPipeline::start(schema).await;
    let config = write_routed_config(&p, "");
    let daemon = p.run_ready(&config, "run.log").await;
    // The same ids in both shards: one key, one partition, two tables.
    p.source
        .client("app")
        .await
        .batch_execute(
            "INSERT INTO orders_2024 SELECT g, g FROM generate_series(1, 1000) g;
             INSERT INTO orders_2025 SELECT g, g * 10 FROM generate_series(1, 1000) g;
             UPDATE orders_2024 SET amount = -amount WHERE id % 10 = 0;
             DELETE FROM orders_2025 WHERE id % 7 = 0;",
        )
        .await
        .expect("changes");
    p.wait_in_sync(
        &[("orders_2024", "id"), ("orders_2025", "id")],
        Duration::from_secs(120),
    )
    .await;
    drop(daemon);
    // 2,000 inserts, 100 updates and 142 deletes, all in the routed topic.
    assert_eq!(p.messages_in_topics(&["it.public.orders"]), 2242);
}

/// A sink that creates its tables learns a routed shard's definitions when the shard's first
/// change arrives, even though another shard already made the shared topic known.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_shard_in_a_known_routed_topic_gets_its_target_table_created() {
    let p = PgPipeline::start_with(
        "CREATE TABLE orders_2024 (id int PRIMARY KEY, amount int);
         CREATE TABLE orders_2025 (id int PRIMARY KEY, amount int, note text);",
        "",
    )
    .await;
    let config = write_routed_config(&p, "          create_tables: true\n");
    let daemon = p.run_ready(&config, "run.log").await;
    let app = p.source.client("app").await;
    app.batch_execute("INSERT INTO orders_2024 SELECT g, g FROM generate_series(1, 500) g")
        .await
        .expect("first shard");
    p.wait_in_sync(&[("orders_2024", "id")], Duration::from_secs(120))
        .await;
    // The second shard's first change: its definitions were never published before.
    app.batch_execute(
        "INSERT INTO orders_2025 SELECT g, g * 10, 'n' || g FROM generate_series(1, 500) g;
         UPDATE orders_2024 SET amount = -amount WHERE id % 10 = 0;",
    )
    .await
    .expect("second shard");
    p.wait_in_sync(
        &[("orders_2024", "id"), ("orders_2025", "id")],
        Duration::from_secs(120),
    )
    .await;
    drop(daemon);
    assert_eq!(p.messages_in_topics(&["it.public.orders"]), 1050);
}
