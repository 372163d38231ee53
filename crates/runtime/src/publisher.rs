//! The publisher: reads a source, sends every change to its Kafka topic, and confirms a
//! source checkpoint only when Kafka acknowledged every change before it.
//!
//! Changes go through a [`SequencedProducer`], which numbers them and keeps the number
//! below which Kafka acknowledged all of them. Each checkpoint is queued with the number
//! of the next change; a companion task confirms it once the mark reaches that number.
//! The producer's window of unacknowledged changes is the backpressure that stops the
//! source from reading further ahead of Kafka than that. A refused delivery stops the
//! publisher without confirming anything past the last fully acknowledged checkpoint, so a
//! restart resumes from there: changes may repeat, none are lost.

use crate::{Metrics, Shutdown};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tidelink_config::KafkaConfig;
use tidelink_core::{
    ChangeEvent, Op, Source, SourceMessage, TableColumns, TableId, TidelinkError, TruncateBarrier,
};
use tidelink_kafka::producer::{AckMark, SequencedProducer};
use tidelink_kafka::topics::{schemas_topic, topic_of};
use tidelink_kafka::truncate_barrier::barrier_headers;
use tidelink_kafka::{admin, EnvelopeEncoder, EventProducer};
use tokio::sync::{mpsc, watch};

/// Unacknowledged changes the publisher lets the source run ahead of Kafka. Each holds its
/// encoded message in the producer's queue until acknowledged; 20,000 is a few seconds of
/// the broker's rate here and halves the daemon's peak memory against 100,000 with no loss
/// of throughput (docs/tuning.md).
const MAX_IN_FLIGHT: usize = 20_000;

/// A source checkpoint waiting for Kafka's acknowledgements.
struct PendingCheckpoint<P> {
    position: P,
    /// Confirmable once every change numbered below this is acknowledged.
    below: u64,
    /// Commit time of the last change before it, for the source lag.
    commit_ts: Option<i64>,
}

/// Publishes until shutdown or an error. Returns after Kafka acknowledged (or refused)
/// everything sent and the last acknowledged checkpoint was confirmed. Column definitions
/// go through `producer`; changes through a producer of this run's own. `existing_topics`
/// were made sure of before: only a table outside them (one added to the source since)
/// costs an Admin API round trip on its first change, which holds up the whole stream.
pub async fn publish<S: Source>(
    source: &mut S,
    producer: &EventProducer,
    existing_topics: &[String],
    kafka: &KafkaConfig,
    pipeline: &str,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<(), TidelinkError> {
    let produced = metrics.kafka_produced.with_label_values(&[pipeline]);
    let latency = metrics.kafka_produce_latency.with_label_values(&[pipeline]);
    let mut changes = SequencedProducer::new(kafka, MAX_IN_FLIGHT, move |took| {
        produced.inc();
        latency.observe(took.as_secs_f64());
    })?;
    let (checkpoints, pending) = mpsc::channel::<PendingCheckpoint<S::Position>>(MAX_IN_FLIGHT);
    let (acked_tx, mut acked) = watch::channel::<Option<S::Position>>(None);
    let acker = tokio::spawn(acknowledge(
        pending,
        changes.mark(),
        acked_tx,
        pipeline.to_string(),
        metrics.clone(),
    ));
    let mut outputs: Vec<TableOutput> = Vec::new();
    let mut output_of: HashMap<TableId, usize> = HashMap::new();
    let mut last_output = 0;
    let mut ensured_topics: HashSet<String> = existing_topics.iter().cloned().collect();
    let mut schemas_topic_ready = false;
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
                    // Changes come in runs of one table: compare before hashing.
                    if outputs
                        .get(last_output)
                        .is_none_or(|o| o.table != event.table)
                    {
                        last_output = match output_of.get(&event.table) {
                            Some(&i) => i,
                            None => {
                                let output = TableOutput::new(kafka, &event.table);
                                if ensured_topics.insert(output.topic.clone()) {
                                    admin::ensure_topics(
                                        kafka,
                                        std::slice::from_ref(&output.topic),
                                    )
                                    .await?;
                                }
                                outputs.push(output);
                                output_of.insert(event.table.clone(), outputs.len() - 1);
                                outputs.len() - 1
                            }
                        };
                    }
                    let output = &mut outputs[last_output];
                    output.count(event.op, pipeline, metrics);
                    last_commit_ts = Some(event.source.ts_ms);
                    let (key, value) = encoder.encode(&event, now_ms());
                    // A table without a key sends everything to partition 0: its rows can
                    // be equal, so only one order for the whole table keeps them right.
                    let keyless = event.columns.as_ref().is_some_and(|c| c.is_keyless());
                    let partition = keyless.then_some(0);
                    if let Some(columns) = &event.columns {
                        publish_definitions(
                            producer,
                            kafka,
                            &mut schemas_topic_ready,
                            &mut output.definitions,
                            &event.table,
                            columns,
                        )
                        .await?;
                    }
                    if event.op == Op::Truncate && !keyless {
                        send_truncate(&mut changes, &output.topic, &event, value).await?;
                    } else {
                        changes
                            .send(&output.topic, key, value, partition, None)
                            .await?;
                    }
                }
                SourceMessage::Checkpoint(position) => {
                    let checkpoint = PendingCheckpoint {
                        position,
                        below: changes.next_number(),
                        commit_ts: last_commit_ts.take(),
                    };
                    if checkpoints.send(checkpoint).await.is_err() {
                        break;
                    }
                }
                SourceMessage::Idle => {}
            }
        }
        Ok(())
    }
    .await;
    drop(checkpoints);
    // Wait for Kafka's answers to what was sent, then confirm the last checkpoint.
    let acked_result = match acker.await {
        Ok(r) => r,
        Err(e) => Err(TidelinkError::permanent(format!(
            "acknowledgement task failed: {e}"
        ))),
    };
    let sent_result = match acked_result {
        Ok(()) => {
            changes
                .mark()
                .acknowledged_below(changes.next_number())
                .await
        }
        Err(e) => Err(e),
    };
    if let Some(position) = *acked.borrow_and_update() {
        source.confirm(position);
    }
    // Dropping a producer joins its delivery thread: not on a runtime worker.
    let _ = tokio::task::spawn_blocking(move || drop(changes)).await;
    result.and(sent_result)
}

/// A keyed table's truncate goes to every partition of its topic, each copy naming the
/// barrier it forms ([`TruncateBarrier`]): the sinks truncate once every partition's
/// changes before it are applied, and apply none after it sooner. A topic of one partition
/// (or a source event without a source order) needs no barrier.
async fn send_truncate(
    changes: &mut SequencedProducer,
    topic: &str,
    event: &ChangeEvent,
    value: &[u8],
) -> Result<(), TidelinkError> {
    let partitions = changes.partition_count(topic)?;
    let order = event.source.order();
    let Some(order) = order.filter(|_| partitions > 1) else {
        changes.send(topic, None, value, Some(0), None).await?;
        return Ok(());
    };
    let headers = barrier_headers(&TruncateBarrier {
        id: format!("{}@{order}", event.table).into(),
        partitions,
    });
    for partition in 0..partitions {
        changes
            .send(topic, None, value, Some(partition), Some(headers.clone()))
            .await?;
    }
    Ok(())
}

/// What the publisher needs per source table, looked up once: its topic (routes applied)
/// and its event counters, so a change costs no label formatting or topic naming.
struct TableOutput {
    table: TableId,
    topic: String,
    /// The column definitions this run published for the table last.
    definitions: Option<Arc<TableColumns>>,
    /// `tidelink_source_events_total` per operation (indexed by `Op as usize`), created
    /// when the table first has one.
    events: [Option<prometheus::IntCounter>; 5],
}

impl TableOutput {
    fn new(kafka: &KafkaConfig, table: &TableId) -> Self {
        Self {
            table: table.clone(),
            topic: topic_of(kafka, &table.schema, &table.name),
            definitions: None,
            events: Default::default(),
        }
    }

    fn count(&mut self, op: Op, pipeline: &str, metrics: &Metrics) {
        let table = &self.table;
        self.events[op as usize]
            .get_or_insert_with(|| {
                metrics
                    .source_events
                    .with_label_values(&[pipeline, &table.to_string(), op.name()])
            })
            .inc();
    }
}

/// Confirms checkpoints in order, each once the changes before it are acknowledged.
async fn acknowledge<P: Copy + std::fmt::Display>(
    mut pending: mpsc::Receiver<PendingCheckpoint<P>>,
    mark: AckMark,
    acked: watch::Sender<Option<P>>,
    pipeline: String,
    metrics: Metrics,
) -> Result<(), TidelinkError> {
    let lag = metrics.source_lag.with_label_values(&[&pipeline]);
    while let Some(checkpoint) = pending.recv().await {
        mark.acknowledged_below(checkpoint.below).await?;
        let _ = acked.send(Some(checkpoint.position));
        if let Some(ts) = checkpoint.commit_ts {
            lag.set((now_ms() - ts).max(0) as f64 / 1000.0);
        }
    }
    Ok(())
}

/// Publishes a table's column definitions to `<prefix>.schemas` when they differ from what
/// this run published for it last (`published`, which it updates), and waits for Kafka's
/// acknowledgement, so any sink that reads a change of the table can also find its
/// definitions. Happens once per table and DDL; a source shares one definition per table
/// among its changes, so the usual case is one pointer comparison. `schemas_topic_ready`
/// says whether this run made sure of the compacted topic already.
pub(crate) async fn publish_definitions(
    producer: &EventProducer,
    kafka: &KafkaConfig,
    schemas_topic_ready: &mut bool,
    published: &mut Option<Arc<TableColumns>>,
    table: &TableId,
    columns: &Arc<TableColumns>,
) -> Result<(), TidelinkError> {
    if published
        .as_ref()
        .is_some_and(|p| Arc::ptr_eq(p, columns) || p.columns == columns.columns)
    {
        return Ok(());
    }
    let topic = schemas_topic(&kafka.topic_prefix);
    if !*schemas_topic_ready {
        admin::ensure_compacted_topic(kafka, &topic).await?;
        *schemas_topic_ready = true;
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
    *published = Some(columns.clone());
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
