//! The change event: one committed row change, as every source produces it and every sink
//! consumes it. Values are JSON values in the Debezium-compatible representation the
//! envelope carries (see the README's type table), so the same event can be encoded for
//! Kafka without a second conversion.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A row image: column name to value, in the table's column order.
pub type Row = serde_json::Map<String, serde_json::Value>;

/// Placeholder for a column whose value the source did not send (PostgreSQL sends no value
/// for an unchanged TOASTed column). Same string as Debezium, so its consumers understand
/// it; sinks leave such a column untouched.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

/// A table, by schema and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableId {
    /// Schema (PostgreSQL) or database (MySQL family).
    pub schema: String,
    /// Table name.
    pub name: String,
}

impl TableId {
    /// Builds a table id.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
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

/// Where a change came from, as the envelope's `source` block reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// tidelink version that produced the event.
    pub version: String,
    /// `postgresql` or `mysql`.
    pub connector: String,
    /// Pipeline name (Debezium's logical server name).
    pub name: String,
    /// Commit time of the source transaction, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// `"true"` for snapshot/backfill rows, `"false"` for streamed changes.
    pub snapshot: String,
    /// Source database name.
    pub db: String,
    /// Source schema.
    pub schema: String,
    /// Source table.
    pub table: String,
    /// Transaction id, where the source has one.
    #[serde(rename = "txId", skip_serializing_if = "Option::is_none", default)]
    pub tx_id: Option<u64>,
    /// PostgreSQL commit LSN of the transaction.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lsn: Option<u64>,
    /// MySQL family: binlog file of the event.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub file: Option<String>,
    /// MySQL family: position in the binlog file where the transaction's row event starts.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pos: Option<u64>,
    /// MySQL family: GTID of the transaction (`domain-server-seq` on MariaDB,
    /// `uuid:number` on MySQL).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gtid: Option<String>,
    /// MySQL family: id of the server that wrote the event.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server_id: Option<u32>,
    /// MySQL family: index of the row within its rows event.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub row: Option<u32>,
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

    /// Decodes the JSON form.
    pub fn decode(bytes: &[u8]) -> Result<Vec<ColumnDefinition>, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("column definitions: {e}"))
    }
}
