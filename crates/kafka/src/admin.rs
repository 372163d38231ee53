//! Topic administration through the Kafka Admin API: create topics with the configured
//! partitions and replication factor, treating "already exists" as success.

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
    let new_topics: Vec<NewTopic<'_>> = topics
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
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| {
            TidelinkError::transient(format!("creating topics on {}: {e}", kafka.brokers))
        })?;
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
