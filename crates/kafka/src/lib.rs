//! Kafka for tidelink: the Debezium-compatible envelope codec, the idempotent producer,
//! topic administration, and the consumer-group thread that starts every assigned
//! partition at the offset its sink recorded.

pub mod admin;
pub mod client_config;
pub mod consumer;
pub mod envelope;
pub mod keyed_topic;
pub mod producer;
pub mod topics;
pub mod truncate_barrier;

pub use consumer::{ConsumerEvent, OffsetLoader, SinkConsumer, MAX_MESSAGES_PER_EVENT};
pub use envelope::{decode_change, encode_change, ChangeDecoder, DecodedChange, EnvelopeEncoder};
pub use producer::EventProducer;
