//! The vocabulary every tidelink crate shares: change events, source positions, the
//! `Source` and `Sink` contracts, and errors that say whether retrying can help.
//!
//! Nothing here talks to a database or a broker; the connector crates implement these
//! contracts and the runtime wires them together.

pub mod coalesce;
pub mod contract;
pub mod error;
pub mod event;
pub mod fuzz;
pub mod position;
pub mod row;
pub mod savepoints;
pub mod schema_change;
pub mod transform;

pub use contract::{
    DirectProgress, MessageOrigin, OffsetAdvance, RecordedProgress, Sink, SinkChange, SinkError,
    Source, SourceMessage, TopicPartition, TruncateBarrier,
};
pub use error::{ErrorKind, TidelinkError};
pub use event::{
    ChangeEvent, ColumnDefinition, Op, SourceInfo, SourceOrder, TableColumns, TableId,
    UNAVAILABLE_VALUE,
};
pub use position::Lsn;
pub use row::{with_number_text, Row};
pub use transform::{Filter, Mask, TableTransform, Verdict};
