//! The change event: one committed row change, as every source produces it and every sink
//! consumes it. Values are JSON values in the Debezium-compatible representation the
//! envelope carries (see the README's type table), so the same event can be encoded for
//! Kafka without a second conversion.

use crate::Row;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Placeholder for a column whose value the source did not send (PostgreSQL sends no value
/// for an unchanged TOASTed column). Same string as Debezium, so its consumers understand
/// it; sinks leave such a column untouched.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

/// A table, by schema and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableId {
    /// Schema (PostgreSQL) or database (MySQL family).
    pub schema: Arc<str>,
    /// Table name.
    pub name: Arc<str>,
}

impl TableId {
    /// Builds a table id.
    pub fn new(schema: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// What happened to the row, with Debezium's one-letter codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Insert (`c`).
    #[serde(rename = "c")]
    Create,
    /// Update (`u`).
    #[serde(rename = "u")]
    Update,
    /// Delete (`d`).
    #[serde(rename = "d")]
    Delete,
    /// Row read by a snapshot or backfill (`r`).
    #[serde(rename = "r")]
    Read,
    /// Table truncated (`t`).
    #[serde(rename = "t")]
    Truncate,
}

impl Op {
    /// The one-letter code used in the envelope.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }

    /// A readable name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Read => "read",
            Op::Truncate => "truncate",
        }
    }
}

/// Where a change came from, as the envelope's `source` block reports it. Its text is
/// shared (`Arc<str>`): a source builds the block once per table and each change clones it
/// by reference counts, not by copying seven strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// tidelink version that produced the event.
    pub version: Arc<str>,
    /// `postgresql` or `mysql`.
    pub connector: Arc<str>,
    /// Pipeline name (Debezium's logical server name).
    pub name: Arc<str>,
    /// Commit time of the source transaction, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// `"true"` for snapshot/backfill rows, `"false"` for streamed changes.
    pub snapshot: Arc<str>,
    /// Source database name.
    pub db: Arc<str>,
    /// Source schema.
    pub schema: Arc<str>,
    /// Source table.
    pub table: Arc<str>,
    /// Transaction id, where the source has one.
    #[serde(rename = "txId", skip_serializing_if = "Option::is_none", default)]
    pub tx_id: Option<u64>,
    /// PostgreSQL commit LSN of the transaction.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lsn: Option<u64>,
    /// MySQL family: binlog file of the event.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub file: Option<Arc<str>>,
    /// MySQL family: position in the binlog file where the transaction's row event starts.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pos: Option<u64>,
    /// MySQL family: GTID of the transaction (`domain-server-seq` on MariaDB,
    /// `uuid:number` on MySQL).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gtid: Option<Arc<str>>,
    /// MySQL family: id of the server that wrote the event.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server_id: Option<u32>,
    /// MySQL family: index of the row within its rows event.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub row: Option<u32>,
    /// Index of the event within its source transaction (streamed changes). With `lsn`, or
    /// `file` and `pos`, it places the event in the source's log: see [`SourceOrder`].
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seq: Option<u64>,
    /// MySQL family: `server_id` of the server whose binlog was read (`file` and `pos` are
    /// places in its binlog; `server_id` is the server where the change was made).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub binlog_server_id: Option<u32>,
}

impl SourceInfo {
    /// Where this streamed change sits in the source's log; `None` for snapshot and
    /// backfill rows, and for events that do not say.
    pub fn order(&self) -> Option<SourceOrder> {
        SourceOrder::of(
            &self.connector,
            &*self.snapshot == "false",
            self.lsn,
            self.file.as_deref(),
            self.pos,
            self.seq,
            self.binlog_server_id,
        )
    }
}

/// The place of a streamed change in its source's log. `log` names the log the place
/// belongs to; places in the same log are ordered the way the source wrote them:
/// PostgreSQL: log 0 (LSNs only grow in a cluster), (commit LSN, 0, index in the
/// transaction); MySQL family: the `server_id` of the server whose binlog was read, (binlog
/// file number, position of the rows event, index in the transaction).
///
/// Within one Kafka partition a source's events come in increasing order, so a sink that
/// remembers the highest place it applied recognises an event the source published again
/// after a restart (between Kafka's acknowledgement and the source position being stored)
/// and applies it once. Places in different logs (after a failover to another MySQL server)
/// are not comparable: see [`SourceOrder::already_applied`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceOrder {
    /// The log the place belongs to.
    pub log: u64,
    /// The place in that log.
    pub at: [u64; 3],
}

impl SourceOrder {
    /// The order of a streamed change from the envelope's `source` fields; `None` when a
    /// field it needs is missing (snapshot rows, events from other tools).
    pub fn of(
        connector: &str,
        streamed: bool,
        lsn: Option<u64>,
        file: Option<&str>,
        pos: Option<u64>,
        seq: Option<u64>,
        binlog_server_id: Option<u32>,
    ) -> Option<Self> {
        if !streamed {
            return None;
        }
        let seq = seq?;
        match connector {
            "postgresql" => Some(Self {
                log: 0,
                at: [lsn?, 0, seq],
            }),
            "mysql" => {
                // binlog.000042 → 42
                let number = file?.rsplit_once('.')?.1.parse::<u64>().ok()?;
                Some(Self {
                    log: u64::from(binlog_server_id?),
                    at: [number, pos?, seq],
                })
            }
            _ => None,
        }
    }

    /// Whether a change at `self` was applied already by a sink whose partition reached
    /// `through`: same log, and not past it.
    pub fn already_applied(&self, through: &SourceOrder) -> bool {
        self.log == through.log && self.at <= through.at
    }
}

impl fmt::Display for SourceOrder {
    /// 64 hex digits: log, then the place.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016x}{:016x}{:016x}{:016x}",
            self.log, self.at[0], self.at[1], self.at[2]
        )
    }
}

impl std::str::FromStr for SourceOrder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let part = |i: usize| {
            s.get(i * 16..(i + 1) * 16)
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("not a source order: {s:?}"))
        };
        if s.len() != 64 {
            return Err(format!("not a source order: {s:?}"));
        }
        Ok(Self {
            log: part(0)?,
            at: [part(1)?, part(2)?, part(3)?],
        })
    }
}

/// One committed row change.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// The table changed.
    pub table: TableId,
    /// Insert, update, delete, read or truncate.
    pub op: Op,
    /// Primary-key columns and their values (empty for a truncate). Becomes the Kafka key,
    /// so every change of one row lands in one partition, in order.
    pub key: Row,
    /// Row image before the change (updates under REPLICA IDENTITY FULL, deletes).
    pub before: Option<Row>,
    /// Row image after the change (inserts, updates, reads).
    pub after: Option<Row>,
    /// Provenance.
    pub source: SourceInfo,
    /// The table's columns as the source defines them, when the source knows them. Sent
    /// with the event (as a Kafka header) so a sink can create a missing target table.
    pub columns: Option<std::sync::Arc<TableColumns>>,
}

/// A column definition, portable enough to create the table in a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDefinition {
    /// Column name.
    pub name: String,
    /// SQL type as the source database spells it, with modifiers (`numeric(12,2)`).
    #[serde(rename = "type")]
    pub sql_type: String,
    /// Part of the primary key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key: bool,
    /// NOT NULL in the source.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_null: bool,
}

/// A table's column definitions, with their JSON encoding computed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumns {
    /// Columns in table order.
    pub columns: Vec<ColumnDefinition>,
    /// `columns` as JSON, the form it travels in.
    pub encoded: Vec<u8>,
}

impl TableColumns {
    /// Builds the definitions and their encoding.
    pub fn new(columns: Vec<ColumnDefinition>) -> Self {
        let encoded = serde_json::to_vec(&columns).expect("column definitions serialize");
        Self { columns, encoded }
    }

    /// The table has no key: no primary key (nor a unique index standing in for one), so
    /// a row is identified by all of its columns and two rows may be equal. Its changes
    /// all go to one partition (see the README's "Tables without a primary key").
    pub fn is_keyless(&self) -> bool {
        !self.columns.is_empty() && !self.columns.iter().any(|c| c.key)
    }

    /// Decodes the JSON form.
    pub fn decode(bytes: &[u8]) -> Result<Vec<ColumnDefinition>, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("column definitions: {e}"))
    }
}

#[cfg(test)]
mod source_order_tests {
    use super::*;

    #[test]
    fn orders_follow_the_log_and_round_trip_through_text() {
        let pg = |lsn, seq| {
            SourceOrder::of("postgresql", true, Some(lsn), None, None, Some(seq), None)
                .expect("order")
        };
        assert!(pg(100, 1).already_applied(&pg(100, 1)));
        assert!(pg(100, 5).already_applied(&pg(101, 0)));
        assert!(!pg(101, 0).already_applied(&pg(100, 5)));
        let my = |server, file: &str, pos, seq| {
            SourceOrder::of(
                "mysql",
                true,
                None,
                Some(file),
                Some(pos),
                Some(seq),
                Some(server),
            )
            .expect("order")
        };
        assert!(my(1, "binlog.000001", 9000, 3).already_applied(&my(1, "binlog.000002", 4, 0)));
        assert!(!my(1, "binlog.000002", 400, 1).already_applied(&my(1, "binlog.000002", 400, 0)));
        // After a failover to another server, its positions say nothing about the old ones.
        assert!(!my(2, "binlog.000001", 4, 0).already_applied(&my(1, "binlog.000090", 4, 0)));
        let order = my(7, "binlog.000002", 400, 1);
        assert_eq!(order.to_string().parse::<SourceOrder>(), Ok(order));
        assert_eq!(order.to_string().len(), 64);
        assert!(pg(0x1_0000_0000, 7).to_string() < pg(0x2_0000_0000, 0).to_string());
        assert_eq!(
            SourceOrder::of("postgresql", false, Some(1), None, None, Some(1), None),
            None
        );
        assert_eq!(
            SourceOrder::of("postgresql", true, Some(1), None, None, None, None),
            None
        );
        assert_eq!(
            SourceOrder::of(
                "mysql",
                true,
                None,
                Some("binlog.000001"),
                Some(4),
                Some(0),
                None
            ),
            None
        );
        assert!("xyz".parse::<SourceOrder>().is_err());
    }
}
