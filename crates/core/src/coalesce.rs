//! Coalescing a batch of sink changes per table and key: only a key's last state matters
//! to a target, so each sink writes one row (or one delete) per key and batch. Shared by
//! every sink so they all resolve backfill reads, unavailable (TOAST) columns and
//! delete-then-insert the same way.

use crate::{Op, Row, SinkChange, SinkError, TableId, UNAVAILABLE_VALUE};
use std::borrow::Cow;
use std::collections::HashMap;

/// What a key's changes in a batch amount to. Images are borrowed from the batch's changes
/// unless unavailable (TOAST) columns had to be filled in from an earlier change.
#[derive(Debug, Clone, PartialEq)]
pub enum Pending<'a> {
    /// Insert or update to this image.
    Upsert(Cow<'a, Row>),
    /// A backfill read: written only where the target has no row with this key, so a
    /// change the stream applied first is never overwritten by an older snapshot.
    InsertIfAbsent(Cow<'a, Row>),
    /// Delete the row.
    Delete,
}

/// One table's coalesced changes, keys in first-seen order.
pub struct TableBatch<'a> {
    /// The target table.
    pub table: &'a TableId,
    /// The source's column definitions, if a change carried them.
    pub source_columns: Option<std::sync::Arc<[u8]>>,
    /// Keys (their JSON text) in the order first seen.
    pub order: Vec<String>,
    /// Per key: the key columns and what to do.
    pub pending: HashMap<String, (&'a Row, Pending<'a>)>,
}

/// Groups changes by table and coalesces them per key; a change without key or image is
/// rejected.
pub fn coalesce(changes: &[SinkChange]) -> Result<Vec<TableBatch<'_>>, SinkError> {
    let mut batches: Vec<TableBatch<'_>> = Vec::new();
    let mut index: HashMap<&TableId, usize> = HashMap::new();
    for change in changes {
        let i = *index.entry(&change.table).or_insert_with(|| {
            batches.push(TableBatch {
                table: &change.table,
                source_columns: change.source_columns.clone(),
                order: Vec::new(),
                pending: HashMap::new(),
            });
            batches.len() - 1
        });
        let batch = &mut batches[i];
        if change.key.is_empty() {
            return Err(SinkError::Rejected(format!(
                "{}: change of {} has an empty key",
                change.origin, change.table
            )));
        }
        let key_text = serde_json::to_string(&change.key).expect("a JSON map always serializes");
        let next = match (change.op, &change.after) {
            (Op::Delete, _) => Pending::Delete,
            (Op::Read, Some(after)) => match batch.pending.get(&key_text) {
                // A streamed change in this batch is newer than any snapshot of the row.
                Some((_, Pending::Upsert(_))) => continue,
                // Deleted and read again: the read is the row's state now.
                Some((_, Pending::Delete)) => Pending::Upsert(Cow::Borrowed(after)),
                _ => Pending::InsertIfAbsent(Cow::Borrowed(after)),
            },
            (_, Some(after)) => {
                let mut row = Cow::Borrowed(after);
                if let Some((_, Pending::Upsert(previous))) = batch.pending.get(&key_text) {
                    let unavailable = |v: &serde_json::Value| v.as_str() == Some(UNAVAILABLE_VALUE);
                    if after.values().any(unavailable) {
                        for (column, value) in row.to_mut().iter_mut() {
                            if unavailable(value) {
                                if let Some(earlier) = previous.get(column) {
                                    *value = earlier.clone();
                                }
                            }
                        }
                    }
                }
                Pending::Upsert(row)
            }
            (op, None) => {
                return Err(SinkError::Rejected(format!(
                    "{}: {} change of {} has no `after` row",
                    change.origin,
                    op.name(),
                    change.table
                )))
            }
        };
        if !batch.pending.contains_key(&key_text) {
            batch.order.push(key_text.clone());
        }
        batch.pending.insert(key_text, (&change.key, next));
    }
    Ok(batches)
}

/// Splits a batch at its truncates: each segment's changes, then the truncate that ends it
/// (if any). Applying segment by segment keeps a truncate after the changes before it and
/// before the changes after it.
pub fn truncate_segments(
    changes: &[SinkChange],
) -> impl Iterator<Item = (&[SinkChange], Option<&SinkChange>)> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= changes.len() {
            return None;
        }
        let end = changes[start..]
            .iter()
            .position(|c| c.op == Op::Truncate)
            .map(|i| start + i)
            .unwrap_or(changes.len());
        let segment = &changes[start..end];
        let truncate = changes.get(end);
        start = end + 1;
        Some((segment, truncate))
    })
}
