//! The idempotent producer (`enable.idempotence=true`, `acks=all`, infinite delivery
//! timeout): a message is either acknowledged by every in-sync replica or retried; the
//! pipeline waits rather than drops. Each send returns a future that resolves when Kafka
//! acknowledged the message, which is what lets the publisher confirm source positions.

use crate::client_config;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{
    BaseRecord, DeliveryFuture, DeliveryResult, FutureProducer, FutureRecord, Producer,
    ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidelink_config::KafkaConfig;
use tidelink_core::TidelinkError;
use tokio::sync::Notify;

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

/// After librdkafka declined to enqueue a message for `topic`: waits a little when its
/// queue was full (the caller tries again), fails on any other reason.
async fn wait_for_queue_room(error: KafkaError, topic: &str) -> Result<(), TidelinkError> {
    match error {
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(())
        }
        e => Err(TidelinkError::permanent(format!(
            "cannot enqueue a message for {topic}: {e}"
        ))),
    }
}

/// Sends change events to Kafka.
#[derive(Clone)]
pub struct EventProducer {
    producer: FutureProducer<client_config::Forwarding>,
}

impl EventProducer {
    /// Creates the producer (no connection is made until the first send).
    pub fn new(kafka: &KafkaConfig) -> Result<Self, TidelinkError> {
        let producer: FutureProducer<client_config::Forwarding> = client_config::producer(kafka)?
            .create_with_context(client_config::Forwarding)
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
                Err((e, _)) => wait_for_queue_room(e, topic).await?,
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

/// A producer for one ordered stream of changes. It numbers the messages it sends and
/// keeps the acknowledged-through mark: the number below which Kafka acknowledged every
/// message. A publisher waits on that one counter instead of on a future per message, and
/// the producer holds at most `max_in_flight` unacknowledged messages.
///
/// The mark never passes a message Kafka refused: the refusal is kept and reported to
/// every wait for a number beyond the mark, so nothing from it on is ever confirmed. Same guarantees as
/// [`EventProducer`] (idempotent, `acks=all`, retried without end); meant for one
/// publishing run, after which it is dropped.
pub struct SequencedProducer {
    producer: ThreadedProducer<AckCounter>,
    counter: Arc<AckState>,
    max_in_flight: usize,
}

/// What the delivery callback shares with the sending side.
struct AckState {
    window: Mutex<AckWindow>,
    /// Copy of `window.first`, read without the lock.
    through: AtomicU64,
    /// The first refusal; the mark stops before the refused message for good.
    refused: Mutex<Option<String>>,
    /// Wakes a task waiting for the mark (there is one checkpoint waiter).
    mark_moved: Notify,
    /// Wakes the sender waiting for room in the window.
    room: Notify,
}

impl AckState {
    /// Fails with Kafka's refusal once a message was refused.
    fn refusal(&self) -> Result<(), TidelinkError> {
        match self.refused.lock() {
            Ok(refused) => match refused.as_ref() {
                Some(reason) => Err(TidelinkError::permanent(reason.clone())),
                None => Ok(()),
            },
            Err(_) => Err(TidelinkError::permanent(
                "the acknowledgement window was poisoned",
            )),
        }
    }
}

/// Unacknowledged messages, in the order sent.
struct AckWindow {
    /// Number of the message `sent[0]` stands for.
    first: u64,
    /// From `first` on: when each message was handed to librdkafka, `None` once it is
    /// acknowledged (a later one may be acknowledged first, on another partition).
    sent: VecDeque<Option<Instant>>,
}

/// The librdkafka context: counts acknowledgements into the window.
struct AckCounter {
    state: Arc<AckState>,
    on_acknowledged: Box<dyn Fn(Duration) + Send + Sync>,
}

impl ClientContext for AckCounter {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        client_config::forward_log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_config::forward_error(error, reason);
    }
}

impl ProducerContext for AckCounter {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, number: usize) {
        let state = &self.state;
        if let Err((error, message)) = result {
            let reason = format!("Kafka refused a message for {}: {error}", message.topic());
            if let Ok(mut refused) = state.refused.lock() {
                refused.get_or_insert(reason);
            }
            state.mark_moved.notify_one();
            state.room.notify_one();
            return;
        }
        let Ok(mut window) = state.window.lock() else {
            return;
        };
        let Some(slot) = (number as u64)
            .checked_sub(window.first)
            .and_then(|i| window.sent.get_mut(i as usize))
        else {
            return;
        };
        if let Some(sent) = slot.take() {
            (self.on_acknowledged)(sent.elapsed());
        }
        let before = window.first;
        while let Some(None) = window.sent.front() {
            window.sent.pop_front();
            window.first += 1;
        }
        if window.first != before {
            state.through.store(window.first, Ordering::Release);
            drop(window);
            state.mark_moved.notify_one();
            state.room.notify_one();
        }
    }
}

impl SequencedProducer {
    /// Creates the producer. `on_acknowledged` is called, on librdkafka's delivery thread,
    /// with each message's time from send to acknowledgement.
    pub fn new(
        kafka: &KafkaConfig,
        max_in_flight: usize,
        on_acknowledged: impl Fn(Duration) + Send + Sync + 'static,
    ) -> Result<Self, TidelinkError> {
        let counter = Arc::new(AckState {
            window: Mutex::new(AckWindow {
                first: 0,
                sent: VecDeque::with_capacity(max_in_flight),
            }),
            through: AtomicU64::new(0),
            refused: Mutex::new(None),
            mark_moved: Notify::new(),
            room: Notify::new(),
        });
        let producer = client_config::producer(kafka)?
            .create_with_context(AckCounter {
                state: counter.clone(),
                on_acknowledged: Box::new(on_acknowledged),
            })
            .map_err(|e| TidelinkError::permanent(format!("kafka producer: {e}")))?;
        Ok(Self {
            producer,
            counter,
            max_in_flight: max_in_flight.max(1),
        })
    }

    /// Enqueues a message and returns its number; waits while `max_in_flight` messages
    /// are unacknowledged or librdkafka's queue is full.
    pub async fn send(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        partition: Option<i32>,
        headers: Option<OwnedHeaders>,
    ) -> Result<u64, TidelinkError> {
        loop {
            let room = self.counter.room.notified();
            let number = {
                let mut window = self.lock_window()?;
                if window.sent.len() < self.max_in_flight {
                    let number = window.first + window.sent.len() as u64;
                    window.sent.push_back(Some(Instant::now()));
                    Some(number)
                } else {
                    None
                }
            };
            let Some(number) = number else {
                self.counter.refusal()?;
                room.await;
                continue;
            };
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(topic, number as usize).payload(value);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            if let Some(headers) = &headers {
                record = record.headers(headers.clone());
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(number),
                Err((e, _)) => {
                    // Never handed over, so no delivery report will come: take it back
                    // (it is the newest; `&mut self` keeps sends one at a time).
                    self.lock_window()?.sent.pop_back();
                    wait_for_queue_room(e, topic).await?;
                }
            }
        }
    }

    /// How many partitions `topic` has, read from the cluster's metadata (blocking).
    pub fn partition_count(&self, topic: &str) -> Result<i32, TidelinkError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| TidelinkError::transient(format!("metadata of topic {topic}: {e}")))?;
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|&n| n > 0)
            .ok_or_else(|| TidelinkError::transient(format!("topic {topic} has no partitions yet")))
    }

    /// The number the next message will get: waiting for the mark to reach it waits for
    /// everything sent so far.
    pub fn next_number(&self) -> u64 {
        self.lock_window()
            .map(|w| w.first + w.sent.len() as u64)
            .unwrap_or(0)
    }

    /// A handle that waits for the mark, usable from another task.
    pub fn mark(&self) -> AckMark {
        AckMark(self.counter.clone())
    }

    fn lock_window(&self) -> Result<std::sync::MutexGuard<'_, AckWindow>, TidelinkError> {
        self.counter
            .window
            .lock()
            .map_err(|_| TidelinkError::permanent("the acknowledgement window was poisoned"))
    }
}

/// Waits for a [`SequencedProducer`]'s acknowledged-through mark (one waiter at a time).
pub struct AckMark(Arc<AckState>);

impl AckMark {
    /// Returns once Kafka acknowledged every message numbered below `number`; fails when
    /// Kafka refused one of them (the mark never passes a refused message).
    pub async fn acknowledged_below(&self, number: u64) -> Result<(), TidelinkError> {
        loop {
            let moved = self.0.mark_moved.notified();
            if self.0.through.load(Ordering::Acquire) >= number {
                return Ok(());
            }
            self.0.refusal()?;
            moved.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use std::sync::atomic::AtomicUsize;

    fn kafka(brokers: String) -> KafkaConfig {
        KafkaConfig {
            brokers,
            topic_prefix: "t".into(),
            partitions: 4,
            replication_factor: None,
            properties: Default::default(),
            routes: Vec::new(),
        }
    }

    async fn within(seconds: u64, mark: &AckMark, below: u64) -> Option<Result<(), TidelinkError>> {
        tokio::time::timeout(Duration::from_secs(seconds), mark.acknowledged_below(below))
            .await
            .ok()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_mark_counts_acknowledged_messages_and_waits_for_the_broker() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("t.s.a", 4, 1).expect("topic");
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let counted = acknowledged.clone();
        let mut producer =
            SequencedProducer::new(&kafka(mock.bootstrap_servers()), 100, move |_| {
                counted.fetch_add(1, Ordering::Relaxed);
            })
            .expect("producer");
        for i in 0..50u64 {
            let key = format!("{{\"id\":{i}}}");
            let number = producer
                .send("t.s.a", Some(key.as_bytes()), b"{}", None, None)
                .await
                .expect("sent");
            assert_eq!(number, i, "numbered in the order sent");
        }
        let mark = producer.mark();
        within(30, &mark, 50)
            .await
            .expect("acknowledged")
            .expect("no refusal");
        assert_eq!(acknowledged.load(Ordering::Relaxed), 50);

        // With the broker away, the mark stays where it is; it moves once the broker is back.
        mock.broker_down(1).expect("broker down");
        let number = producer
            .send("t.s.a", Some(b"{\"id\":1}"), b"{}", None, None)
            .await
            .expect("sent");
        assert_eq!(number, 50);
        assert!(
            within(2, &mark, 51).await.is_none(),
            "nothing acknowledged while the broker is down"
        );
        assert!(
            within(0, &mark, 50).await.is_some(),
            "what was acknowledged stays acknowledged"
        );
        mock.broker_up(1).expect("broker up");
        within(60, &mark, 51)
            .await
            .expect("acknowledged")
            .expect("no refusal");
        assert_eq!(producer.next_number(), 51);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_refused_message_stops_the_mark_for_good() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("t.s.a", 1, 1).expect("topic");
        let mut producer = SequencedProducer::new(&kafka(mock.bootstrap_servers()), 100, |_| {})
            .expect("producer");
        producer
            .send("t.s.a", Some(b"{\"id\":1}"), b"{}", None, None)
            .await
            .expect("sent");
        let mark = producer.mark();
        within(30, &mark, 1)
            .await
            .expect("acknowledged")
            .expect("no refusal");
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        producer
            .send("t.s.a", Some(b"{\"id\":2}"), b"{}", None, None)
            .await
            .expect("sent");
        let refused = within(30, &mark, 2)
            .await
            .expect("answered")
            .expect_err("refused");
        assert!(
            refused.to_string().contains("refused a message for t.s.a"),
            "{refused}"
        );
        mock.clear_request_errors(RDKafkaApiKey::Produce);
        // Later messages may be stored, but nothing from the refusal on is ever confirmed.
        let _ = producer
            .send("t.s.a", Some(b"{\"id\":3}"), b"{}", None, None)
            .await;
        assert!(within(5, &mark, 3).await.expect("answered").is_err());
        assert!(
            within(5, &mark, 1).await.expect("answered").is_ok(),
            "what was acknowledged before the refusal stays acknowledged"
        );
    }
}
