//! Topic administration through the Kafka Admin API: create the topics that the cluster's
//! metadata does not list yet, with the configured partitions and replication factor
//! (pre-created topics therefore need no create permission). Every call has a deadline.

use crate::client_config;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;
use tidelink_config::KafkaConfig;
use tidelink_core::TidelinkError;

/// Creates the topics that do not exist yet.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[String]) -> Result<(), TidelinkError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config::admin(kafka)?
        .create()
        .map_err(|e| TidelinkError::permanent(format!("kafka admin client: {e}")))?;
    let admin = std::sync::Arc::new(admin);
    let existing = {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(30))
                .map(|m| {
                    m.topics()
                        .iter()
                        .map(|t| t.name().to_string())
                        .collect::<Vec<_>>()
                })
        })
        .await
        .map_err(|e| TidelinkError::permanent(format!("metadata task: {e}")))?
        .map_err(|e| {
            TidelinkError::transient(format!(
                "reading topic metadata from {}: {e}",
                kafka.brokers
            ))
        })?
    };
    let missing: Vec<&String> = topics.iter().filter(|t| !existing.contains(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                kafka.partitions,
                TopicReplication::Fixed(kafka.replication_factor),
            )
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
            Ok(topic) => tracing::info!(%topic, partitions = kafka.partitions, "created topic"),
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
