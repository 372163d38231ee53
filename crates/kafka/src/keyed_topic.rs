//! Reading a small keyed topic (the column definitions in `<prefix>.schemas`, progress
//! records) to its end, every value of each key kept in order. A reader kept across reads
//! fetches only what was written since its last read, over the connection it already has:
//! a sink re-reads the definitions whenever a table's rows stop matching its target, and
//! a fresh client each time (connect, then close) cost ~150 ms of stalled applying.

use crate::client_config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidelink_config::KafkaConfig;
use tidelink_core::TidelinkError;

/// What has been read so far: per key its values, oldest first, and per partition the
/// offset to read from next.
#[derive(Default)]
struct ReadState {
    values: HashMap<String, Vec<Vec<u8>>>,
    next: HashMap<i32, i64>,
}

/// Follows one keyed topic; see the module documentation.
pub struct KeyedTopicReader {
    consumer: Arc<BaseConsumer<client_config::Forwarding>>,
    topic: String,
    state: ReadState,
}

impl KeyedTopicReader {
    /// A reader of `topic`; it connects on its first read.
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<Self, TidelinkError> {
        let consumer: BaseConsumer<client_config::Forwarding> = client_config::admin(kafka)?
            .set("group.id", "tidelink-schema-reader")
            .set("enable.auto.commit", "false")
            .create_with_context(client_config::Forwarding)
            .map_err(|e| TidelinkError::permanent(format!("kafka client: {e}")))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            topic: topic.to_string(),
            state: ReadState::default(),
        })
    }

    /// Reads what the topic holds beyond the last read, up to its end as of now.
    pub async fn read_to_end(&mut self) -> Result<(), TidelinkError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let mut state = std::mem::take(&mut self.state);
        let (state, result) = tokio::task::spawn_blocking(move || {
            let result = read_new(&consumer, &topic, &mut state);
            (state, result)
        })
        .await
        .map_err(|e| TidelinkError::permanent(format!("reading {}: {e}", self.topic)))?;
        self.state = state;
        result
    }

    /// Every value read of each key, oldest first.
    pub fn values(&self) -> &HashMap<String, Vec<Vec<u8>>> {
        &self.state.values
    }

    /// The values read, taking them.
    pub fn into_values(self) -> HashMap<String, Vec<Vec<u8>>> {
        self.state.values
    }
}

/// Appends the messages from `state.next` (or a partition's oldest offset still held) to
/// its high watermark. On an error the state keeps what was read before it: a retry goes on
/// from there.
fn read_new(
    consumer: &BaseConsumer<client_config::Forwarding>,
    topic: &str,
    state: &mut ReadState,
) -> Result<(), TidelinkError> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| TidelinkError::transient(format!("metadata of {topic}: {e}")))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|e| TidelinkError::transient(format!("watermarks of {topic}: {e}")))?;
        // Past the end: the topic was made anew since the last read; read it again.
        let from = match state.next.get(&partition) {
            Some(&next) if next <= high => next.max(low),
            _ => low,
        };
        if high <= from {
            continue;
        }
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(|e| TidelinkError::permanent(format!("{topic}: {e}")))?;
        consumer
            .assign(&assignment)
            .map_err(|e| TidelinkError::transient(format!("reading {topic}: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next = from;
        while next < high {
            if Instant::now() > deadline {
                return Err(TidelinkError::transient(format!(
                    "reading {topic} timed out"
                )));
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message))
                    if message.partition() == partition && message.offset() >= next =>
                {
                    next = message.offset() + 1;
                    state.next.insert(partition, next);
                    if let (Some(key), Some(value)) = (message.key(), message.payload()) {
                        state
                            .values
                            .entry(String::from_utf8_lossy(key).into_owned())
                            .or_default()
                            .push(value.to_vec());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(TidelinkError::transient(format!("reading {topic}: {e}")))
                }
                None => {}
            }
        }
    }
    // Nothing stays assigned between reads: no fetching in the background.
    consumer
        .unassign()
        .map_err(|e| TidelinkError::transient(format!("reading {topic}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventProducer;
    use rdkafka::mocking::MockCluster;

    async fn put(producer: &EventProducer, key: &str, value: &str) {
        producer
            .send(
                "t.schemas",
                Some(key.as_bytes()),
                value.as_bytes(),
                None,
                None,
            )
            .await
            .expect("sent")
            .acknowledged()
            .await
            .expect("acknowledged");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_kept_reader_adds_what_was_written_since_its_last_read_in_order() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("t.schemas", 1, 1).expect("topic");
        let kafka = KafkaConfig {
            brokers: mock.bootstrap_servers(),
            topic_prefix: "t".into(),
            partitions: 1,
            replication_factor: None,
            properties: Default::default(),
            routes: Vec::new(),
        };
        let producer = EventProducer::new(&kafka).expect("producer");
        let mut reader = KeyedTopicReader::new(&kafka, "t.schemas").expect("reader");
        reader.read_to_end().await.expect("empty topic read");
        assert!(reader.values().is_empty());

        put(&producer, "s.a", "a1").await;
        put(&producer, "s.b", "b1").await;
        reader.read_to_end().await.expect("first read");
        put(&producer, "s.a", "a2").await;
        reader.read_to_end().await.expect("second read");
        reader.read_to_end().await.expect("nothing new");

        let values = reader.into_values();
        assert_eq!(values["s.a"], vec![b"a1".to_vec(), b"a2".to_vec()]);
        assert_eq!(values["s.b"], vec![b"b1".to_vec()]);
        assert_eq!(
            crate::admin::read_all_by_key(&kafka, "t.schemas")
                .await
                .expect("one-off read"),
            values
        );
    }
}
