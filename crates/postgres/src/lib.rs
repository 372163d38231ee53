//! PostgreSQL for tidelink: the logical-replication source (slot, publication, pgoutput
//! decoding), the sink that applies batches with their Kafka offsets in one transaction,
//! and the preflight checks that run before either starts.

pub mod backfill;
mod catalog;
pub mod connection;
pub mod copy_binary;
pub mod direct;
pub mod sink;
pub mod source;
mod text_array;
pub mod types;

pub use sink::PgSink;
pub use source::{PgSource, PgSourceSettings};
