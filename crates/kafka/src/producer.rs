//! The idempotent producer (`enable.idempotence=true`, `acks=all`, infinite delivery
//! timeout): a message is either acknowledged by every in-sync replica or retried; the
//! pipeline waits rather than drops. Each send returns a future that resolves when Kafka
//! acknowledged the message, which is what lets the publisher confirm source positions.

use crate::client_config;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;
use tidelink_config::KafkaConfig;
use tidelink_core::TidelinkError;

/// Where a message was stored.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A pending acknowledgement.
pub struct PendingDelivery(DeliveryFuture);

impl PendingDelivery {
    /// Waits for Kafka's answer.
    pub async fn acknowledged(self) -> Result<Stored, TidelinkError> {
        match self.0.await {
            Ok(Ok(delivery)) => Ok(Stored {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Ok(Err((e, message))) => Err(TidelinkError::permanent(format!(
                "Kafka refused a message for {}: {e}",
                rdkafka::Message::topic(&message)
            ))),
            Err(_) => Err(TidelinkError::transient(
                "the producer was closed before delivery",
            )),
        }
    }
}

/// Sends change events to Kafka.
#[derive(Clone)]
pub struct EventProducer {
    producer: FutureProducer,
}

impl EventProducer {
    /// Creates the producer (no connection is made until the first send).
    pub fn new(kafka: &KafkaConfig) -> Result<Self, TidelinkError> {
        let producer: FutureProducer = client_config::producer(kafka)?
            .create()
            .map_err(|e| TidelinkError::permanent(format!("kafka producer: {e}")))?;
        Ok(Self { producer })
    }

    /// Enqueues a message; waits while the local queue is full.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        partition: Option<i32>,
        headers: Option<OwnedHeaders>,
    ) -> Result<PendingDelivery, TidelinkError> {
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(value);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            if let Some(headers) = headers.clone() {
                record = record.headers(headers);
            }
            match self.producer.send_result(record) {
                Ok(future) => return Ok(PendingDelivery(future)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => {
                    return Err(TidelinkError::permanent(format!(
                        "cannot enqueue a message for {topic}: {e}"
                    )))
                }
            }
        }
    }

    /// A partition's high watermark, read over this producer's connections (so a consumer's
    /// connection, busy with long fetches, is not held up).
    pub fn high_watermark(&self, topic: &str, partition: i32) -> Result<i64, TidelinkError> {
        self.producer
            .client()
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map(|(_, high)| high)
            .map_err(|e| {
                TidelinkError::transient(format!("watermarks of {topic}[{partition}]: {e}"))
            })
    }

    /// Waits up to `timeout` for every queued message to be acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<(), TidelinkError> {
        self.producer
            .flush(timeout)
            .map_err(|e| TidelinkError::transient(format!("flushing the producer: {e}")))
    }
}
