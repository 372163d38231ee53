//! Topic administration through the Kafka Admin API: create the topics that the cluster's
//! metadata does not list yet, with the configured partitions and replication factor
//! (pre-created topics therefore need no create permission). Every call has a deadline.

use crate::client_config;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidelink_config::KafkaConfig;
use tidelink_core::TidelinkError;

/// Remembers the last error librdkafka reported on its own (authentication, TLS), which
/// the failing request's error does not carry ("BrokerTransportFailure"). It comes two
/// ways: as an error event, delivered only by a poll, and as an error-level log line,
/// delivered at once from librdkafka's threads. An error event can be missing when the
/// request fails (librdkafka suppresses repeats of an identical error), so both count.
#[derive(Default, Clone)]
struct LastError(Arc<Mutex<Option<String>>>);

impl LastError {
    fn remember(&self, reason: &str) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(reason.to_string());
        }
    }
}

impl ClientContext for LastError {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        client_config::forward_log(level, facility, message);
        if matches!(level, L::Emerg | L::Alert | L::Critical | L::Error) {
            self.remember(message);
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "kafka client error");
        self.remember(reason);
    }
}

impl ConsumerContext for LastError {}

impl LastError {
    /// `: <reason>` when librdkafka reported one.
    fn suffix(&self) -> String {
        self.0
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .map(|reason| format!(" ({reason})"))
            .unwrap_or_default()
    }
}

/// The names of the cluster's topics. Waits up to 30 s for the brokers; the error carries
/// what librdkafka reported on the way (an authentication or TLS failure).
async fn topic_names(kafka: &KafkaConfig) -> Result<Vec<String>, TidelinkError> {
    let last_error = LastError::default();
    let client: BaseConsumer<LastError> = client_config::admin(kafka)?
        .create_with_context(last_error.clone())
        .map_err(|e| TidelinkError::permanent(format!("kafka client: {e}")))?;
    let brokers = kafka.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match client.fetch_metadata(None, Duration::from_secs(3)) {
                Ok(metadata) => {
                    return Ok(metadata
                        .topics()
                        .iter()
                        .map(|t| t.name().to_string())
                        .collect())
                }
                Err(e) => {
                    // Delivers librdkafka's own error events to the context.
                    let _ = client.poll(Duration::ZERO);
                    let reason = last_error.suffix();
                    // Credentials the broker refuses and a certificate that does not verify
                    // stay so: stop with the reason rather than retry forever.
                    if reason.contains("uthentication") || reason.contains("certificate verify") {
                        return Err(TidelinkError::permanent(format!(
                            "connecting to Kafka at {brokers}: {e}{reason}"
                        )));
                    }
                    if reason.contains("SSL") || std::time::Instant::now() >= deadline {
                        return Err(TidelinkError::transient(format!(
                            "reading topic metadata from {brokers}: {e}{reason}"
                        )));
                    }
                }
            }
        }
    })
    .await
    .map_err(|e| TidelinkError::permanent(format!("metadata task: {e}")))?
}

/// Creates the topics that do not exist yet, with the configured partitions.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[String]) -> Result<(), TidelinkError> {
    create_missing(kafka, topics, kafka.partitions, false).await
}

/// Creates a single-partition, log-compacted topic (latest value per key kept forever)
/// when it does not exist yet.
pub async fn ensure_compacted_topic(kafka: &KafkaConfig, topic: &str) -> Result<(), TidelinkError> {
    create_missing(kafka, &[topic.to_string()], 1, true).await
}

async fn create_missing(
    kafka: &KafkaConfig,
    topics: &[String],
    partitions: i32,
    compacted: bool,
) -> Result<(), TidelinkError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<client_config::Forwarding> = client_config::admin(kafka)?
        .create_with_context(client_config::Forwarding)
        .map_err(|e| TidelinkError::permanent(format!("kafka admin client: {e}")))?;
    let admin = Arc::new(admin);
    let existing = topic_names(kafka).await?;
    // Each name once: tables routed into one topic name it several times, and Kafka
    // rejects a CreateTopics request that names a topic twice (INVALID_REQUEST).
    let mut missing: Vec<&String> = Vec::new();
    for topic in topics {
        if !existing.contains(topic) && !missing.contains(&topic) {
            missing.push(topic);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            let topic = NewTopic::new(
                t,
                partitions,
                // -1: the broker's `default.replication.factor` (CreateTopics v4+).
                TopicReplication::Fixed(kafka.replication_factor.unwrap_or(-1)),
            );
            if compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        admin.create_topics(new_topics.iter(), &options),
    )
    .await
    .map_err(|_| {
        TidelinkError::transient(format!(
            "creating topics on {}: no answer within 60 s",
            kafka.brokers
        ))
    })?
    .map_err(|e| TidelinkError::transient(format!("creating topics on {}: {e}", kafka.brokers)))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(TidelinkError::transient(format!(
                    "creating topic {topic} on {}: {code}",
                    kafka.brokers
                )))
            }
        }
    }
    Ok(())
}

/// Low and high watermarks of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionWatermarks {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Oldest offset still stored.
    pub low: i64,
    /// Next offset to be written.
    pub high: i64,
}

/// Watermarks of every partition of the topics `select` accepts.
pub async fn watermarks(
    kafka: &KafkaConfig,
    select: impl Fn(&str) -> bool + Send + 'static,
) -> Result<Vec<PartitionWatermarks>, TidelinkError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer<client_config::Forwarding> = client_config::admin(kafka)?
        .set("group.id", "tidelink-status")
        .create_with_context(client_config::Forwarding)
        .map_err(|e| TidelinkError::permanent(format!("kafka client: {e}")))?;
    let brokers = kafka.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(None, timeout).map_err(|e| {
            TidelinkError::transient(format!("reading metadata from {brokers}: {e}"))
        })?;
        let mut out = Vec::new();
        for topic in metadata.topics().iter().filter(|t| select(t.name())) {
            for partition in topic.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic.name(), partition.id(), timeout)
                    .map_err(|e| {
                        TidelinkError::transient(format!("watermarks of {}: {e}", topic.name()))
                    })?;
                out.push(PartitionWatermarks {
                    topic: topic.name().to_string(),
                    partition: partition.id(),
                    low,
                    high,
                });
            }
        }
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(out)
    })
    .await
    .map_err(|e| TidelinkError::permanent(format!("watermark task: {e}")))?
}

/// Reads a small keyed topic from the beginning to its end and returns the last value of
/// each key (the table definitions in `<prefix>.schemas`).
pub async fn read_latest_by_key(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<std::collections::HashMap<String, Vec<u8>>, TidelinkError> {
    Ok(read_all_by_key(kafka, topic)
        .await?
        .into_iter()
        .filter_map(|(key, mut values)| values.pop().map(|v| (key, v)))
        .collect())
}

/// Reads a small keyed topic from the beginning to its end and returns every value of each
/// key still held, oldest first (a compacted topic may have dropped older ones).
pub async fn read_all_by_key(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<std::collections::HashMap<String, Vec<Vec<u8>>>, TidelinkError> {
    let mut reader = crate::keyed_topic::KeyedTopicReader::new(kafka, topic)?;
    reader.read_to_end().await?;
    Ok(reader.into_values())
}
