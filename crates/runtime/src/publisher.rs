//! The publisher: reads a source, sends every change to its Kafka topic, and confirms a
//! source checkpoint only when Kafka acknowledged every change before it.
//!
//! Acknowledgements are awaited in emission order by a companion task fed through a
//! bounded queue; the queue's bound is the backpressure that stops the source from reading
//! further ahead of Kafka than that. A failed delivery stops the publisher without
//! confirming anything past the last fully acknowledged checkpoint, so a restart resumes
//! from there: changes may repeat, none are lost.

use crate::{Metrics, Shutdown};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidelink_config::KafkaConfig;
use tidelink_core::{Op, Source, SourceMessage, TableColumns, TableId, TidelinkError};
use tidelink_kafka::producer::PendingDelivery;
use tidelink_kafka::topics::{schemas_topic, topic_of};
use tidelink_kafka::{admin, EnvelopeEncoder, EventProducer};
use tokio::sync::{mpsc, watch};

/// Unacknowledged changes the publisher lets the source run ahead of Kafka. Each holds its
/// encoded message in the producer's queue until acknowledged; 20,000 is a few seconds of
/// the broker's rate here and halves the daemon's peak memory against 100,000 with no loss
/// of throughput (docs/tuning.md).
const MAX_IN_FLIGHT: usize = 20_000;

enum InFlight<P> {
    Delivery(PendingDelivery, Instant),
    Checkpoint(P, Option<i64>),
}

/// Publishes until shutdown or an error. Returns after Kafka acknowledged (or failed)
/// everything sent and the last acknowledged checkpoint was confirmed.
pub async fn publish<S: Source>(
    source: &mut S,
    producer: &EventProducer,
    kafka: &KafkaConfig,
    pipeline: &str,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<(), TidelinkError> {
    let (queue, pending) = mpsc::channel::<InFlight<S::Position>>(MAX_IN_FLIGHT);
    let (acked_tx, mut acked) = watch::channel::<Option<S::Position>>(None);
    let acker = tokio::spawn(acknowledge(
        pending,
        acked_tx,
        pipeline.to_string(),
        metrics.clone(),
    ));
    let mut tables: HashMap<TableId, TableOutput> = HashMap::new();
    let mut ensured_topics: HashSet<String> = HashSet::new();
    let mut published: HashMap<TableId, Arc<TableColumns>> = HashMap::new();
    let mut last_commit_ts: Option<i64> = None;
    let mut encoder = EnvelopeEncoder::default();
    let result: Result<(), TidelinkError> = async {
        while !shutdown.is_triggered() {
            if acked.has_changed().unwrap_or(false) {
                if let Some(position) = *acked.borrow_and_update() {
                    source.confirm(position);
                }
            }
            if acker.is_finished() {
                break;
            }
            match source.next().await? {
                SourceMessage::Change(event) => {
                    if !tables.contains_key(&event.table) {
                        let output = TableOutput::new(kafka, &event.table);
                        if ensured_topics.insert(output.topic.clone()) {
                            admin::ensure_topics(kafka, std::slice::from_ref(&output.topic))
                                .await?;
                        }
                        tables.insert(event.table.clone(), output);
                    }
                    let output = tables
                        .get_mut(&event.table)
                        .expect("inserted above when missing");
                    output.count(&event.table, event.op, pipeline, metrics);
                    last_commit_ts = Some(event.source.ts_ms);
                    let (key, value) = encoder.encode(&event, now_ms());
                    // A truncate has no key; partition 0 keeps its copy ordered there.
                    let partition = (event.op == Op::Truncate).then_some(0);
                    if let Some(columns) = &event.columns {
                        publish_definitions(producer, kafka, &mut published, &event.table, columns)
                            .await?;
                    }
                    let delivery = producer
                        .send(&output.topic, key, value, partition, None)
                        .await?;
                    if queue
                        .send(InFlight::Delivery(delivery, Instant::now()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                SourceMessage::Checkpoint(position) => {
                    if queue
                        .send(InFlight::Checkpoint(position, last_commit_ts.take()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                SourceMessage::Idle => {}
            }
        }
        Ok(())
    }
    .await;
    drop(queue);
    // Wait for Kafka's answers to what was sent, then confirm the last checkpoint.
    let acked_result = match acker.await {
        Ok(r) => r,
        Err(e) => Err(TidelinkError::permanent(format!(
            "acknowledgement task failed: {e}"
        ))),
    };
    if let Some(position) = *acked.borrow_and_update() {
        source.confirm(position);
    }
    result.and(acked_result)
}

/// What the publisher needs per source table, looked up once: its topic (routes applied)
/// and its event counters, so a change costs no label formatting or topic naming.
struct TableOutput {
    topic: String,
    /// `tidelink_source_events_total` per operation (indexed by `Op as usize`), created
    /// when the table first has one.
    events: [Option<prometheus::IntCounter>; 5],
}

impl TableOutput {
    fn new(kafka: &KafkaConfig, table: &TableId) -> Self {
        Self {
            topic: topic_of(kafka, &table.schema, &table.name),
            events: Default::default(),
        }
    }

    fn count(&mut self, table: &TableId, op: Op, pipeline: &str, metrics: &Metrics) {
        self.events[op as usize]
            .get_or_insert_with(|| {
                metrics
                    .source_events
                    .with_label_values(&[pipeline, &table.to_string(), op.name()])
            })
            .inc();
    }
}

async fn acknowledge<P: Copy + std::fmt::Display>(
    mut pending: mpsc::Receiver<InFlight<P>>,
    acked: watch::Sender<Option<P>>,
    pipeline: String,
    metrics: Metrics,
) -> Result<(), TidelinkError> {
    let produced = metrics.kafka_produced.with_label_values(&[&pipeline]);
    let latency = metrics
        .kafka_produce_latency
        .with_label_values(&[&pipeline]);
    while let Some(item) = pending.recv().await {
        match item {
            InFlight::Delivery(delivery, sent) => {
                delivery.acknowledged().await?;
                produced.inc();
                latency.observe(sent.elapsed().as_secs_f64());
            }
            InFlight::Checkpoint(position, commit_ts) => {
                let _ = acked.send(Some(position));
                if let Some(ts) = commit_ts {
                    metrics
                        .source_lag
                        .with_label_values(&[&pipeline])
                        .set((now_ms() - ts).max(0) as f64 / 1000.0);
                }
            }
        }
    }
    Ok(())
}

/// Publishes a table's column definitions to `<prefix>.schemas` when they differ from what
/// this run published last, and waits for Kafka's acknowledgement, so any sink that reads a
/// change of the table can also find its definitions. Happens once per table and DDL.
pub(crate) async fn publish_definitions(
    producer: &EventProducer,
    kafka: &KafkaConfig,
    published: &mut HashMap<TableId, Arc<TableColumns>>,
    table: &TableId,
    columns: &Arc<TableColumns>,
) -> Result<(), TidelinkError> {
    if published
        .get(table)
        .is_some_and(|p| Arc::ptr_eq(p, columns) || p.columns == columns.columns)
    {
        return Ok(());
    }
    let topic = schemas_topic(&kafka.topic_prefix);
    if published.is_empty() {
        admin::ensure_compacted_topic(kafka, &topic).await?;
    }
    producer
        .send(
            &topic,
            Some(table.to_string().as_bytes()),
            &columns.encoded,
            None,
            None,
        )
        .await?
        .acknowledged()
        .await?;
    published.insert(table.clone(), columns.clone());
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sleeps for the backoff of attempt `n` (1 s doubling to 30 s); false when shut down.
pub async fn backoff(attempt: u32, shutdown: &Shutdown) -> bool {
    let seconds = 1u64 << attempt.min(5);
    shutdown.sleep(Duration::from_secs(seconds.min(30))).await
}
