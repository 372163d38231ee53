//! Poison messages: what cannot be decoded or applied goes to the dead-letter topic with
//! the reason, and the pipeline keeps going.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, TopicPartitionList};
use std::time::{Duration, Instant};
use tidelink_integration_tests::{http_get, table_rows, PgPipeline};

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_and_rejected_messages_go_to_the_dead_letter_topic() {
    let p = PgPipeline::start("CREATE TABLE items (id int PRIMARY KEY, code text)").await;
    // The target column is narrower: a long code is rejected by the target.
    p.target
        .client("replica")
        .await
        .batch_execute("ALTER TABLE items ALTER COLUMN code TYPE varchar(3)")
        .await
        .expect("narrow target column");
    // Without a snapshot: it could read the rejected row a second time and count twice.
    let config = p.write_config_without_snapshot("dlq.yaml", "");
    let _daemon = p.run_ready(&config, "dlq.log").await;

    let source = p.source.client("app").await;
    source
        .batch_execute("INSERT INTO items VALUES (1, 'ok'), (2, 'toolong'), (3, 'yes')")
        .await
        .expect("insert");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &p.bootstrap)
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to("it.public.items")
                .key("{\"id\":9}")
                .payload("this is not an envelope"),
            Duration::from_secs(10),
        )
        .await
        .expect("produce garbage");
    source
        .batch_execute("INSERT INTO items VALUES (4, 'end')")
        .await
        .expect("insert after");

    let target = p.target.client("replica").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while table_rows(&target, "items", "id").await != vec!["(1,ok)", "(3,yes)", "(4,end)"] {
        assert!(
            Instant::now() < deadline,
            "rows 1, 3 and 4 did not reach the target: {:?}\n{}",
            table_rows(&target, "items", "id").await,
            p.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Both poison messages are in the dead-letter topic, with their reason.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &p.bootstrap)
        .set("group.id", "dlq-reader")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..4 {
        assignment
            .add_partition_offset("it.dlq.it.replica", partition, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let mut reasons = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reasons.len() < 2 && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let headers = message.headers().expect("dead letters carry headers");
            let error = headers
                .iter()
                .find(|h| h.key == "tidelink.error")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .expect("tidelink.error header");
            reasons.push(error);
        }
    }
    reasons.sort();
    assert_eq!(reasons.len(), 2, "two dead letters, got {reasons:?}");
    assert!(reasons[0].contains("cannot decode"), "{reasons:?}");
    assert!(reasons[1].contains("value too long"), "{reasons:?}");

    let metrics = http_get(p.metrics_port, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains(
            "tidelink_sink_dead_letter_messages_total{pipeline=\"it\",sink=\"replica\"} 2"
        ),
        "dead-letter counter:\n{metrics}"
    );
}
