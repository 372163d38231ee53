//! Running pipelines: the publisher that moves source changes into Kafka and confirms
//! source positions only behind Kafka's acknowledgements, the sink workers that replay
//! topics into targets with exactly-once effect, the metrics endpoint, and shutdown.

pub mod backfill;
pub mod metrics;
pub mod pipeline;
pub mod position_store;
pub mod publisher;
pub mod shutdown;
pub mod sink_worker;
pub mod status;
pub mod verify;
mod whole_table;

pub use metrics::Metrics;
pub use pipeline::{run_pipelines, Role};
pub use shutdown::Shutdown;
