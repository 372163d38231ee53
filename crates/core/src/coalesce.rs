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
    /// Per key, in the order first seen: the key columns and what to do.
    pub entries: Vec<(&'a Row, Pending<'a>)>,
    /// Each key's place in `entries`.
    places: HashMap<&'a Row, usize>,
}

/// Rows written by one statement: same columns set, same conflict handling.
pub struct UpsertGroup<'a> {
    /// The columns the rows set (unavailable ones left out), in the rows' order.
    pub columns: Vec<&'a str>,
    /// Inserted only where the target has no row with the key (backfill reads).
    pub if_absent: bool,
    /// Per row: its key columns and its image.
    pub rows: Vec<(&'a Row, &'a Row)>,
}

impl TableBatch<'_> {
    /// The keys to delete, and the upserts grouped by statement (columns set and conflict
    /// handling), groups in first-seen order. A row's shape is compared with the groups'
    /// without building anything, so rows cost no allocation beyond their place in a group.
    pub fn statements(&self) -> (Vec<&Row>, Vec<UpsertGroup<'_>>) {
        let mut deletes = Vec::new();
        let mut groups: Vec<UpsertGroup<'_>> = Vec::new();
        let mut last = 0;
        for (key, pending) in &self.entries {
            let (row, if_absent) = match pending {
                Pending::Delete => {
                    deletes.push(*key);
                    continue;
                }
                Pending::Upsert(row) => (row.as_ref(), false),
                Pending::InsertIfAbsent(row) => (row.as_ref(), true),
            };
            let fits =
                |g: &UpsertGroup<'_>| g.if_absent == if_absent && sets_exactly(row, &g.columns);
            let i = if groups.get(last).is_some_and(fits) {
                last
            } else if let Some(i) = groups.iter().position(fits) {
                i
            } else {
                groups.push(UpsertGroup {
                    columns: set_columns(row).collect(),
                    if_absent,
                    rows: Vec::new(),
                });
                groups.len() - 1
            };
            groups[i].rows.push((*key, row));
            last = i;
        }
        (deletes, groups)
    }
}

/// The columns an image sets: all but the unavailable (unchanged TOAST) ones.
fn set_columns(row: &Row) -> impl Iterator<Item = &str> {
    row.iter()
        .filter(|(_, v)| !is_unavailable(v))
        .map(|(c, _)| c)
}

fn is_unavailable(value: &serde_json::Value) -> bool {
    value.as_str() == Some(UNAVAILABLE_VALUE)
}

fn sets_exactly(row: &Row, columns: &[&str]) -> bool {
    let mut set = set_columns(row);
    columns.iter().all(|c| set.next() == Some(*c)) && set.next().is_none()
}

/// Groups changes by table and coalesces them per key; a change without key or image is
/// rejected.
pub fn coalesce(changes: &[SinkChange]) -> Result<Vec<TableBatch<'_>>, SinkError> {
    let mut batches: Vec<TableBatch<'_>> = Vec::new();
    let mut index: HashMap<&TableId, usize> = HashMap::new();
    let mut last_table = 0;
    for change in changes {
        // A batch's changes mostly come in runs of one table: compare before hashing.
        let i = if batches
            .get(last_table)
            .is_some_and(|b| *b.table == change.table)
        {
            last_table
        } else {
            *index.entry(&change.table).or_insert_with(|| {
                // Most batches are one table's: room for every key up front, so the map is
                // not rebuilt (and every key hashed again) as it grows.
                let room = if batches.is_empty() { changes.len() } else { 0 };
                batches.push(TableBatch {
                    table: &change.table,
                    source_columns: change.source_columns.clone(),
                    entries: Vec::with_capacity(room),
                    places: HashMap::with_capacity(room),
                });
                batches.len() - 1
            })
        };
        last_table = i;
        let batch = &mut batches[i];
        if change.key.is_empty() {
            return Err(SinkError::Rejected(format!(
                "{}: change of {} has an empty key",
                change.origin, change.table
            )));
        }
        // One lookup: a new key gets the next place in `entries` (filled below; every path
        // that leaves a new key's place unfilled returns an error for the whole batch).
        let next_place = batch.entries.len();
        let slot = *batch.places.entry(&change.key).or_insert(next_place);
        let earlier = (slot < next_place).then(|| &batch.entries[slot].1);
        let next = match (change.op, &change.after) {
            (Op::Delete, _) => Pending::Delete,
            (Op::Read, Some(after)) => match earlier {
                // A streamed change in this batch is newer than any snapshot of the row.
                Some(Pending::Upsert(_)) => continue,
                // Deleted and read again: the read is the row's state now.
                Some(Pending::Delete) => Pending::Upsert(Cow::Borrowed(after)),
                _ => Pending::InsertIfAbsent(Cow::Borrowed(after)),
            },
            (_, Some(after)) => {
                let mut row = Cow::Borrowed(after);
                if let Some(Pending::Upsert(previous)) = earlier {
                    if after.values().any(is_unavailable) {
                        for (column, value) in row.to_mut().iter_mut() {
                            if is_unavailable(value) {
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
        if slot < next_place {
            batch.entries[slot] = (&change.key, next);
        } else {
            batch.entries.push((&change.key, next));
        }
    }
    Ok(batches)
}

/// The first change of each table in `changes`, tables in first-seen order: what a sink
/// looks a batch's target tables up (or creates them) by.
pub fn first_of_each_table(changes: &[SinkChange]) -> Vec<&SinkChange> {
    let mut firsts: Vec<&SinkChange> = Vec::new();
    for change in changes {
        if !firsts.iter().any(|c| c.table == change.table) {
            firsts.push(change);
        }
    }
    firsts
}

/// The changes of `segment` whose tables are not in `keyless`, for [`coalesce`].
pub fn keyed_changes(segment: &[SinkChange], keyless: &[TableId]) -> Vec<SinkChange> {
    segment
        .iter()
        .filter(|c| !keyless.contains(&c.table))
        .cloned()
        .collect()
}

/// One step of applying a table without a key (no primary key or unique index in the
/// target): rows are not coalesced, since two of them may be equal, and each change is
/// applied in order. Consecutive inserts go together.
#[derive(Debug, Clone, PartialEq)]
pub enum KeylessStep<'a> {
    /// Insert these rows (inserts and snapshot reads), duplicates included.
    Insert(Vec<&'a Row>),
    /// Delete one row equal, column by column and NULL equal to NULL, to this image (the
    /// change's key, which for a table without a key is the whole old row).
    DeleteOne(&'a Row),
}

/// The steps that apply one table's changes to a target without a key: an insert (or a
/// snapshot read) adds its row, a delete removes one equal row, an update removes one row
/// equal to its key and adds the new image. A change whose new image leaves a column
/// unavailable (unchanged TOAST) cannot be written without a key to find the old value
/// by, and is rejected.
pub fn keyless_steps<'a>(
    changes: impl IntoIterator<Item = &'a SinkChange>,
) -> Result<Vec<KeylessStep<'a>>, SinkError> {
    let mut steps: Vec<KeylessStep<'a>> = Vec::new();
    for change in changes {
        let after = match change.op {
            Op::Truncate => continue,
            Op::Delete => None,
            op => Some(change.after.as_ref().ok_or_else(|| {
                SinkError::Rejected(format!(
                    "{}: {} change of {} has no `after` row",
                    change.origin,
                    op.name(),
                    change.table
                ))
            })?),
        };
        if let Some(after) = after {
            if after.values().any(is_unavailable) {
                return Err(SinkError::Rejected(format!(
                    "{}: {} change of {} leaves a column unavailable (unchanged TOAST), and the target table has no key to keep its value by; give the target a primary key or the source table REPLICA IDENTITY FULL",
                    change.origin,
                    change.op.name(),
                    change.table
                )));
            }
        }
        if matches!(change.op, Op::Delete | Op::Update) {
            if change.key.is_empty() {
                return Err(SinkError::Rejected(format!(
                    "{}: {} change of {} has an empty key",
                    change.origin,
                    change.op.name(),
                    change.table
                )));
            }
            // An update that leaves the row as it was (its key is its old image) changes
            // nothing; removing and adding it back would be the same.
            if change.op == Op::Update && after == Some(&change.key) {
                continue;
            }
            steps.push(KeylessStep::DeleteOne(&change.key));
        }
        if let Some(after) = after {
            match steps.last_mut() {
                Some(KeylessStep::Insert(rows)) => rows.push(after),
                _ => steps.push(KeylessStep::Insert(vec![after])),
            }
        }
    }
    Ok(steps)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageOrigin;
    use serde_json::json;

    fn change(op: Op, id: i64, after: Option<serde_json::Value>) -> SinkChange {
        let mut key = Row::new();
        key.insert("id", json!(id));
        SinkChange {
            table: TableId::new("public", "t"),
            op,
            key,
            after: after.map(|a| Row::from_json(a).expect("test images are objects")),
            origin: MessageOrigin {
                topic: "t".into(),
                partition: 0,
                offset: 0,
            },
            source_columns: None,
            barrier: None,
        }
    }

    fn upsert_rows<'a>(group: &UpsertGroup<'a>) -> Vec<&'a serde_json::Value> {
        group.rows.iter().map(|(key, _)| &key["id"]).collect()
    }

    #[test]
    fn last_state_per_key_in_first_seen_order() {
        let changes = [
            change(Op::Create, 1, Some(json!({"id": 1, "v": "a"}))),
            change(Op::Create, 2, Some(json!({"id": 2, "v": "b"}))),
            change(Op::Update, 1, Some(json!({"id": 1, "v": "c"}))),
            change(Op::Delete, 2, None),
            change(Op::Create, 3, Some(json!({"id": 3, "v": "d"}))),
        ];
        let batches = coalesce(&changes).expect("valid batch");
        assert_eq!(batches.len(), 1);
        let (deletes, groups) = batches[0].statements();
        assert_eq!(deletes.len(), 1);
        assert_eq!(deletes[0]["id"], json!(2));
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].columns, ["id", "v"]);
        assert_eq!(upsert_rows(&groups[0]), [&json!(1), &json!(3)]);
        assert_eq!(groups[0].rows[0].1["v"], json!("c"));
    }

    #[test]
    fn statements_group_rows_by_the_columns_they_set() {
        let unavailable = UNAVAILABLE_VALUE;
        let changes = [
            change(
                Op::Update,
                1,
                Some(json!({"id": 1, "big": unavailable, "v": "a"})),
            ),
            change(Op::Update, 2, Some(json!({"id": 2, "big": "x", "v": "b"}))),
            change(
                Op::Update,
                3,
                Some(json!({"id": 3, "big": unavailable, "v": "c"})),
            ),
            change(Op::Read, 4, Some(json!({"id": 4, "big": "y", "v": "d"}))),
        ];
        let batches = coalesce(&changes).expect("valid batch");
        let (deletes, groups) = batches[0].statements();
        assert!(deletes.is_empty());
        let shapes: Vec<(Vec<&str>, bool, Vec<&serde_json::Value>)> = groups
            .iter()
            .map(|g| (g.columns.clone(), g.if_absent, upsert_rows(g)))
            .collect();
        assert_eq!(
            shapes,
            [
                (vec!["id", "v"], false, vec![&json!(1), &json!(3)]),
                (vec!["big", "id", "v"], false, vec![&json!(2)]),
                (vec!["big", "id", "v"], true, vec![&json!(4)]),
            ]
        );
    }

    #[test]
    fn unavailable_columns_are_filled_from_an_earlier_change_of_the_batch() {
        let changes = [
            change(Op::Create, 1, Some(json!({"id": 1, "big": "x", "v": "a"}))),
            change(
                Op::Update,
                1,
                Some(json!({"id": 1, "big": UNAVAILABLE_VALUE, "v": "b"})),
            ),
        ];
        let batches = coalesce(&changes).expect("valid batch");
        let (_, groups) = batches[0].statements();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].columns, ["big", "id", "v"]);
        assert_eq!(groups[0].rows[0].1["big"], json!("x"));
        assert_eq!(groups[0].rows[0].1["v"], json!("b"));
    }

    #[test]
    fn keyless_steps_keep_duplicates_and_order() {
        let row = |v: &str| Row::from_json(json!({"a": v, "b": null})).expect("object");
        let keyed = |op, key: Row, after: Option<Row>| SinkChange {
            key,
            after,
            ..change(op, 0, None)
        };
        let changes = [
            keyed(Op::Create, row("x"), Some(row("x"))),
            keyed(Op::Create, row("x"), Some(row("x"))),
            keyed(Op::Read, row("y"), Some(row("y"))),
            keyed(Op::Delete, row("x"), None),
            keyed(Op::Update, row("y"), Some(row("y"))),
            keyed(Op::Update, row("y"), Some(row("z"))),
        ];
        let (x, y, z) = (row("x"), row("y"), row("z"));
        assert_eq!(
            keyless_steps(&changes).expect("valid"),
            [
                KeylessStep::Insert(vec![&x, &x, &y]),
                KeylessStep::DeleteOne(&x),
                KeylessStep::DeleteOne(&y),
                KeylessStep::Insert(vec![&z]),
            ]
        );
        let toast = Row::from_json(json!({"a": UNAVAILABLE_VALUE})).expect("object");
        let unavailable = [keyed(Op::Update, row("x"), Some(toast))];
        assert!(keyless_steps(&unavailable).is_err());
    }

    #[test]
    fn a_read_never_overwrites_a_streamed_change_of_the_batch() {
        let changes = [
            change(Op::Update, 1, Some(json!({"id": 1, "v": "new"}))),
            change(Op::Read, 1, Some(json!({"id": 1, "v": "old"}))),
            change(Op::Delete, 2, None),
            change(Op::Read, 2, Some(json!({"id": 2, "v": "again"}))),
        ];
        let batches = coalesce(&changes).expect("valid batch");
        let (deletes, groups) = batches[0].statements();
        assert!(deletes.is_empty());
        assert_eq!(groups.len(), 1, "both are plain upserts");
        assert!(!groups[0].if_absent);
        assert_eq!(groups[0].rows[0].1["v"], json!("new"));
        assert_eq!(groups[0].rows[1].1["v"], json!("again"));
    }
}
