//! The two contracts connectors implement. The runtime relies on exactly what is written
//! here and nothing more.
//!
//! # Delivery, end to end
//! A source emits changes in commit order and, between them, checkpoints. The runtime
//! publishes every change to Kafka and calls [`Source::confirm`] with a checkpoint only
//! after Kafka acknowledged every change emitted before it. A source therefore never
//! forgets a change Kafka has not stored: after a crash it resumes from its last confirmed
//! checkpoint and may emit changes again (at-least-once), never skip one.
//!
//! A sink applies batches read from Kafka. Each batch carries the Kafka offsets it
//! consumed; the sink makes the changes and the offsets durable in one target transaction,
//! and on partition assignment the runtime resumes from the offsets the sink stored. A
//! redelivered message is therefore skipped, and the effect on the target is exactly once.

use crate::{ChangeEvent, TableId, TidelinkError};
use std::fmt::Display;
use std::future::Future;

/// What a source yields.
// Changes are the common case and are moved once; boxing them would add an allocation per
// change on the hot path to shrink the rare variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SourceMessage<P> {
    /// A committed row change.
    Change(ChangeEvent),
    /// Every change of every transaction that committed at or before this position has
    /// been emitted. Heartbeats on an idle source are checkpoints too, so the position
    /// keeps moving when the watched tables are quiet.
    Checkpoint(P),
    /// Nothing to hand over now. Sources return this at least every few seconds on a
    /// quiet stream (and may at other times) so the runtime can confirm positions and
    /// notice shutdown between calls (`next` need not be cancel-safe).
    Idle,
}

/// A change-data-capture source.
///
/// Order: changes of one transaction are emitted together, transactions in commit order.
/// Positions only move forward: `confirm` with a position lower than one already confirmed
/// must be ignored.
pub trait Source: Send {
    /// The source's position type (a PostgreSQL LSN, a MySQL GTID set, …).
    type Position: Copy + Ord + Display + Send + Sync + 'static;

    /// The next change or checkpoint. Errors carry their kind: transient ones are retried
    /// by reconnecting from the last confirmed position.
    fn next(
        &mut self,
    ) -> impl Future<Output = Result<SourceMessage<Self::Position>, TidelinkError>> + Send;

    /// Every change up to `position` is durable downstream; the source may release it
    /// (advance the slot's `confirmed_flush_lsn`, store the binlog position).
    fn confirm(&mut self, position: Self::Position);
}

/// A Kafka partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

/// How far a batch moves one partition: the offsets table must hold `expected` (`None`:
/// no row yet) and is set to `next`. If it holds anything else, another worker has applied
/// this partition meanwhile and the batch must not be committed (see [`SinkError::Fenced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetAdvance {
    /// The partition.
    pub partition: TopicPartition,
    /// Next offset to consume as the target currently records it.
    pub expected: Option<i64>,
    /// Next offset to consume after this batch.
    pub next: i64,
    /// The highest source order applied from this partition after this batch, when the
    /// batch raised it (`None`: leave the recorded one as it is).
    pub applied_through: Option<crate::SourceOrder>,
}

/// What a target's offsets table holds for one partition: where the last committed batch
/// left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedProgress {
    /// Next offset to consume.
    pub next_offset: i64,
    /// The highest source order applied from this partition (`None`: none recorded).
    pub applied_through: Option<crate::SourceOrder>,
}

impl RecordedProgress {
    /// Picks each of `partitions`' entries from the rows of a target's offsets table.
    pub fn for_partitions(
        rows: impl IntoIterator<Item = (TopicPartition, RecordedProgress)>,
        partitions: &[TopicPartition],
    ) -> Vec<Option<RecordedProgress>> {
        let rows: std::collections::HashMap<TopicPartition, RecordedProgress> =
            rows.into_iter().collect();
        partitions.iter().map(|p| rows.get(p).copied()).collect()
    }
}

/// A row change on its way into a target table.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkChange {
    /// Target table (after the sink's table mapping).
    pub table: TableId,
    /// The operation.
    pub op: crate::Op,
    /// Key columns and values.
    pub key: crate::Row,
    /// New row image for inserts, updates and reads; columns holding
    /// [`crate::UNAVAILABLE_VALUE`] must be left as the target has them.
    pub after: Option<crate::Row>,
    /// Where the change was read from, for error reports and dead-lettering.
    pub origin: MessageOrigin,
    /// The source table's column definitions (JSON of [`crate::ColumnDefinition`]s), when
    /// the message carried them; used to create a missing target table.
    pub source_columns: Option<std::sync::Arc<[u8]>>,
    /// For a truncate published to every partition of its topic: the barrier its copies
    /// form. The target truncates once, when the last partition's copy arrives.
    pub barrier: Option<TruncateBarrier>,
}

/// A truncate of a keyed table, published once to every partition of its topic so that it
/// is ordered against each partition's changes. Each partition's copy is an arrival,
/// recorded in the target with that partition's offsets; the copy that completes the
/// arrivals truncates. A partition that arrived applies nothing after the truncate until
/// the barrier is complete ([`Sink::barrier_holds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncateBarrier {
    /// Names the truncate, the same in every copy (source table and source order).
    pub id: std::sync::Arc<str>,
    /// How many partitions carry a copy.
    pub partitions: i32,
}

impl TruncateBarrier {
    /// Of `partitions`, those among the (topic, partition) arrivals a target records at
    /// barriers not complete yet.
    pub fn held(
        arrivals: impl IntoIterator<Item = (String, i32)>,
        partitions: &[TopicPartition],
    ) -> Vec<TopicPartition> {
        let arrived: std::collections::HashSet<TopicPartition> = arrivals
            .into_iter()
            .map(|(topic, partition)| TopicPartition { topic, partition })
            .collect();
        partitions
            .iter()
            .filter(|p| arrived.contains(p))
            .cloned()
            .collect()
    }
}

/// The Kafka coordinates of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageOrigin {
    /// Topic (shared by the changes of a batch).
    pub topic: std::sync::Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl Display for MessageOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]@{}", self.topic, self.partition, self.offset)
    }
}

/// Why a batch was not applied. In every case nothing of the batch is visible in the target.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Another worker recorded different offsets for these partitions: this worker lost
    /// them in a rebalance. Drop their buffered messages and reload their offsets.
    #[error("offsets of {0:?} were moved by another worker")]
    Fenced(Vec<TopicPartition>),
    /// The target refused the data itself (type, constraint, missing table). Applying the
    /// changes one by one finds the offending message, which goes to the dead-letter topic.
    #[error("{0}")]
    Rejected(String),
    /// Connection or server trouble; retry the same batch.
    #[error("{0}")]
    Transient(String),
}

/// A target database that applies batches with their offsets atomically.
///
/// Guarantees the runtime relies on:
/// - `apply` makes all of a batch's changes and offset advances durable in one transaction,
///   or none of them.
/// - Within a batch, changes of one key are applied in the order given; `apply` may coalesce
///   them (only the last state of a key matters).
/// - `recorded` (and so `stored_offsets` and `applied_through`) returns what the last
///   committed batch recorded.
pub trait Sink: Send {
    /// What the target recorded for each of these partitions (`None`: never consumed).
    fn recorded(
        &mut self,
        partitions: &[TopicPartition],
    ) -> impl Future<Output = Result<Vec<Option<RecordedProgress>>, TidelinkError>> + Send;

    /// The offsets recorded for these partitions (`None`: never consumed).
    fn stored_offsets(
        &mut self,
        partitions: &[TopicPartition],
    ) -> impl Future<Output = Result<Vec<Option<i64>>, TidelinkError>> + Send {
        async move {
            let recorded = self.recorded(partitions).await?;
            Ok(recorded
                .into_iter()
                .map(|r| r.map(|r| r.next_offset))
                .collect())
        }
    }

    /// The highest source order each partition's applied changes reached, as recorded with
    /// the offsets (`None`: nothing recorded).
    fn applied_through(
        &mut self,
        partitions: &[TopicPartition],
    ) -> impl Future<Output = Result<Vec<Option<crate::SourceOrder>>, TidelinkError>> + Send {
        async move {
            let recorded = self.recorded(partitions).await?;
            Ok(recorded
                .into_iter()
                .map(|r| r.and_then(|r| r.applied_through))
                .collect())
        }
    }

    /// Applies changes and offset advances in one transaction.
    fn apply(
        &mut self,
        changes: &[SinkChange],
        offsets: &[OffsetAdvance],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// For a batch the target rejected: opens one transaction, advances the offsets, and
    /// applies the changes one at a time in order, each under a savepoint, so a change
    /// the target rejects is undone alone and the others stay. Returns the rejected
    /// changes (index in `changes`, reason) with the transaction still open: the caller
    /// stores them elsewhere (the dead-letter topic) and then calls
    /// [`Sink::finish_isolated`]. On an error nothing is left open.
    fn apply_isolated(
        &mut self,
        changes: &[SinkChange],
        offsets: &[OffsetAdvance],
    ) -> impl Future<Output = Result<Vec<(usize, String)>, SinkError>> + Send;

    /// The target table's columns in table order, each with its type as
    /// [`Sink::target_type_for`] spells types; `None` when the table does not exist.
    fn target_columns(
        &mut self,
        table: &TableId,
    ) -> impl Future<Output = Result<Option<Vec<(String, String)>>, SinkError>> + Send;

    /// The target type a source column gets (as `create_tables` maps it), spelt so that
    /// [`crate::schema_change::widens`] compares it with the target's types.
    fn target_type_for(&self, column: &crate::ColumnDefinition) -> Result<String, String>;

    /// Changes the target table so it follows its source table's schema changes (column
    /// types are the source's, mapped as `create_tables` maps them). Runs on its own,
    /// before the batch that needs it; a change the target cannot make is `Rejected`.
    fn alter_table(
        &mut self,
        table: &TableId,
        changes: &[crate::schema_change::SchemaChange],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Of these partitions, those whose copy of a truncate barrier arrived while the
    /// barrier is not complete: their changes after the truncate must wait.
    fn barrier_holds(
        &mut self,
        partitions: &[TopicPartition],
    ) -> impl Future<Output = Result<Vec<TopicPartition>, TidelinkError>> + Send;

    /// Commits (or rolls back) the transaction [`Sink::apply_isolated`] left open.
    fn finish_isolated(
        &mut self,
        commit: bool,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Progress of a direct backfill of one table, as a target records it in the same
/// transaction as the rows it loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectProgress {
    /// Key (position text) of the last row loaded.
    pub after: Option<Vec<String>>,
    /// Rows loaded so far.
    pub rows: u64,
    /// Finished.
    pub done: bool,
}
