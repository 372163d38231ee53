//! Durable source positions for sources without a server-side slot (the MySQL family):
//! the confirmed position is written to the compacted topic `<prefix>.positions`, keyed by
//! pipeline, after Kafka acknowledged every change before it. A restart reads it back.
//!
//! The position is written at most once a second while it moves, and once more when the
//! source stops, so a clean stop resumes exactly and a crash replays at most about a
//! second of changes (never skips any: the stored position never passes an
//! unacknowledged change).

use crate::Shutdown;
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use tidelink_config::KafkaConfig;
use tidelink_core::TidelinkError;
use tidelink_kafka::{admin, EventProducer};
use tokio::sync::watch;

/// The topic holding positions.
pub fn positions_topic(prefix: &str) -> String {
    format!("{prefix}.positions")
}

/// The position stored for a pipeline, if any.
pub async fn load_position<T: DeserializeOwned>(
    kafka: &KafkaConfig,
    pipeline: &str,
) -> Result<Option<T>, TidelinkError> {
    let topic = positions_topic(&kafka.topic_prefix);
    admin::ensure_compacted_topic(kafka, &topic).await?;
    let stored = admin::read_latest_by_key(kafka, &topic).await?;
    match stored.get(pipeline) {
        None => Ok(None),
        Some(bytes) if bytes.is_empty() => Ok(None),
        Some(bytes) => serde_json::from_slice(bytes).map(Some).map_err(|e| {
            TidelinkError::permanent(format!(
                "the position stored for pipeline {pipeline} in {topic} is unreadable: {e}"
            ))
        }),
    }
}

/// Stores a position now and waits for Kafka's acknowledgement.
pub async fn store_position<T: Serialize>(
    producer: &EventProducer,
    kafka: &KafkaConfig,
    pipeline: &str,
    position: &T,
) -> Result<(), TidelinkError> {
    write(
        producer,
        &positions_topic(&kafka.topic_prefix),
        pipeline,
        position,
    )
    .await
}

async fn write<T: Serialize>(
    producer: &EventProducer,
    topic: &str,
    pipeline: &str,
    position: &T,
) -> Result<(), TidelinkError> {
    let value = serde_json::to_vec(position).expect("positions serialize");
    producer
        .send(topic, Some(pipeline.as_bytes()), &value, None, None)
        .await?
        .acknowledged()
        .await
        .map(|_| ())
}

/// Writes confirmed positions until `stop` is triggered, then writes the last one.
pub async fn store_positions<T: Serialize + Clone + PartialEq + std::fmt::Display>(
    mut confirmed: watch::Receiver<Option<T>>,
    producer: EventProducer,
    kafka: KafkaConfig,
    pipeline: String,
    stop: Shutdown,
) -> Result<(), TidelinkError> {
    let topic = positions_topic(&kafka.topic_prefix);
    let mut written: Option<T> = None;
    loop {
        let stopping = tokio::select! {
            changed = confirmed.changed() => changed.is_err(),
            _ = stop.wait() => true,
        };
        let latest = confirmed.borrow_and_update().clone();
        if let Some(position) = latest {
            if written.as_ref() != Some(&position) {
                write(&producer, &topic, &pipeline, &position).await?;
                tracing::debug!(%pipeline, %position, "source position stored");
                written = Some(position);
            }
        }
        if stopping {
            return Ok(());
        }
        // Batch the writes of a busy stream.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
