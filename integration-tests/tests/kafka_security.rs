//! Kafka authentication: a pipeline against a broker that requires SASL/SCRAM-SHA-512, its
//! password taken from the environment and never printed; a wrong password is reported.

use std::time::Duration;
use tidelink_integration_tests::{Broker, Daemon, PgPipeline};

const PASSWORD: &str = "Kafka-Secret-4711";

fn sasl_properties(password_variable: &str) -> String {
    format!(
        "      properties:\n        security.protocol: SASL_PLAINTEXT\n        sasl.mechanism: SCRAM-SHA-512\n        sasl.username: tidelink\n        sasl.password: ${{{password_variable}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_authenticates_with_scram_and_never_prints_the_password() {
    let mut p = PgPipeline::start("CREATE TABLE items (id int PRIMARY KEY, name text)").await;
    let broker = Broker::start_with_scram_user("tidelink", PASSWORD);
    p.bootstrap = broker.bootstrap();
    let config = p.write_config("sasl.yaml", "");
    let yaml = std::fs::read_to_string(&config).expect("config").replace(
        "      partitions: 4\n",
        &format!("      partitions: 4\n{}", sasl_properties("KAFKA_PASSWORD")),
    );
    std::fs::write(&config, yaml).expect("config");
    let config_arg = config.display().to_string();
    let env = [
        ("KAFKA_PASSWORD", PASSWORD),
        ("TIDELINK_LOG", "debug,librdkafka=debug"),
    ];
    let daemon = Daemon::start_with_env(
        &["run", "-c", &config_arg],
        &p.work.path().join("sasl.log"),
        &env,
    );
    p.wait_ready().await;
    p.source
        .client("app")
        .await
        .batch_execute(
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g;
             UPDATE items SET name = 'changed' WHERE id <= 100;
             DELETE FROM items WHERE id > 450;",
        )
        .await
        .expect("workload");
    p.wait_in_sync(&[("items", "id")], Duration::from_secs(120))
        .await;
    let status = Daemon::start_with_env(
        &["status", "-c", &config_arg],
        &p.work.path().join("status.log"),
        &env,
    );
    let mut status = status;
    status.wait(Duration::from_secs(60));
    let output = daemon.output() + &status.output();
    assert!(
        !output.contains(PASSWORD),
        "the Kafka password appears in the output"
    );
    drop(daemon);

    // A wrong password: one error that says so, naming the broker, and no retrying.
    let wrong = [("KAFKA_PASSWORD", "not-the-password")];
    let mut daemon = Daemon::start_with_env(
        &["run", "-c", &config_arg],
        &p.work.path().join("wrong.log"),
        &wrong,
    );
    let status = daemon.wait(Duration::from_secs(60));
    let output = daemon.output();
    let status = status.unwrap_or_else(|| {
        panic!("tidelink must give up on credentials the broker refuses:\n{output}")
    });
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("uthentication") && output.contains(&broker.bootstrap()),
        "a failed SASL authentication is reported with the broker:\n{output}"
    );
    assert!(!output.contains("not-the-password"), "{output}");
}
