//! Table definitions read from `information_schema`: column names, types, signedness,
//! character sets, ENUM/SET labels and the primary key. The binlog carries only column
//! positions and storage types, so the source needs these to name and decode values; the
//! sink needs them to write values in the form each target column takes.

use crate::connection::classify;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use std::sync::Arc;
use tidelink_core::{ColumnDefinition, TableColumns, TableId, TidelinkError};

/// One column as the server defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name, shared by the rows of every change of the table.
    pub name: Arc<str>,
    /// `DATA_TYPE`, lower case (`int`, `varchar`, `datetime`, …).
    pub data_type: String,
    /// `COLUMN_TYPE` as the server spells it (`int(10) unsigned`, `enum('a','b')`).
    pub column_type: String,
    /// UNSIGNED numeric column.
    pub unsigned: bool,
    /// Character set of a text column (`utf8mb4`, `latin1`, …); `None` for other types.
    pub charset: Option<String>,
    /// ENUM or SET labels in definition order.
    pub labels: Vec<String>,
    /// Width of a BIT column.
    pub bits: u32,
    /// Part of the primary key.
    pub key: bool,
    /// NOT NULL.
    pub not_null: bool,
}

impl ColumnInfo {
    /// A text type (values are character strings in `charset`).
    pub fn is_text(&self) -> bool {
        matches!(
            self.data_type.as_str(),
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext"
        ) && self.charset.as_deref() != Some("binary")
    }

    /// A binary string type (values are bytes).
    pub fn is_binary(&self) -> bool {
        matches!(
            self.data_type.as_str(),
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob"
        ) || (self.charset.as_deref() == Some("binary")
            && matches!(self.data_type.as_str(), "char" | "varchar" | "text"))
    }

    /// An integer type and its width in bits.
    pub fn integer_bits(&self) -> Option<u32> {
        Some(match self.data_type.as_str() {
            "tinyint" => 8,
            "smallint" => 16,
            "mediumint" => 24,
            "int" | "integer" => 32,
            "bigint" => 64,
            _ => return None,
        })
    }
}

/// A table's columns in ordinal order and its primary key.
#[derive(Debug, Clone)]
pub struct TableSchema {
    /// Database and table.
    pub table: TableId,
    /// Columns in table order (binlog rows use the same order).
    pub columns: Vec<ColumnInfo>,
    /// Indexes of the primary-key columns, in key order.
    pub key: Vec<usize>,
    /// Portable definitions, sent to sinks that create tables.
    pub definitions: Arc<TableColumns>,
}

/// Reads a table's definition; `None` when the table does not exist.
pub async fn load_table(
    conn: &mut Conn,
    table: &TableId,
) -> Result<Option<TableSchema>, TidelinkError> {
    type ColumnRow = (
        String,
        String,
        String,
        Option<String>,
        String,
        String,
        Option<u64>,
    );
    let rows: Vec<ColumnRow> = conn
        .exec(
            "SELECT COLUMN_NAME, LOWER(DATA_TYPE), COLUMN_TYPE, CHARACTER_SET_NAME, COLUMN_KEY, \
                    IS_NULLABLE, NUMERIC_PRECISION \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             ORDER BY ORDINAL_POSITION",
            (&table.schema, &table.name),
        )
        .await
        .map_err(|e| classify(&e).context(format!("reading the columns of {table}")))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let key_rows: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
             ORDER BY ORDINAL_POSITION",
            (&table.schema, &table.name),
        )
        .await
        .map_err(|e| classify(&e).context(format!("reading the primary key of {table}")))?;
    let columns: Vec<ColumnInfo> = rows
        .into_iter()
        .map(
            |(name, data_type, column_type, charset, _key, nullable, precision)| {
                let lower = column_type.to_ascii_lowercase();
                let labels = if data_type == "enum" || data_type == "set" {
                    parse_labels(&column_type)
                } else {
                    Vec::new()
                };
                ColumnInfo {
                    key: key_rows.contains(&name),
                    name: name.into(),
                    unsigned: lower.contains("unsigned"),
                    bits: if data_type == "bit" {
                        precision.unwrap_or(1) as u32
                    } else {
                        0
                    },
                    data_type,
                    column_type,
                    charset,
                    labels,
                    not_null: nullable == "NO",
                }
            },
        )
        .collect();
    let key = key_rows
        .iter()
        .filter_map(|k| columns.iter().position(|c| *c.name == **k))
        .collect();
    let definitions = Arc::new(TableColumns::new(
        columns
            .iter()
            .map(|c| ColumnDefinition {
                name: c.name.to_string(),
                sql_type: format!("mysql:{}", c.column_type),
                key: c.key,
                not_null: c.not_null,
            })
            .collect(),
    ));
    Ok(Some(TableSchema {
        table: table.clone(),
        columns,
        key,
        definitions,
    }))
}

/// Base tables whose `database.table` matches one of the patterns (system databases
/// excluded), sorted.
pub async fn matching_tables(
    conn: &mut Conn,
    patterns: &[String],
) -> Result<Vec<TableId>, TidelinkError> {
    let rows: Vec<(String, String)> = conn
        .query(
            "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES \
             WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN \
             ('mysql', 'information_schema', 'performance_schema', 'sys') \
             ORDER BY 1, 2",
        )
        .await
        .map_err(|e| classify(&e).context("listing tables"))?;
    Ok(rows
        .into_iter()
        .filter(|(schema, name)| tidelink_config::matches_any(patterns, schema, name))
        .map(|(schema, name)| TableId::new(schema, name))
        .collect())
}

/// The labels of `enum('a','b''c')` or `set('x','y')`.
pub fn parse_labels(column_type: &str) -> Vec<String> {
    let Some(open) = column_type.find('(') else {
        return Vec::new();
    };
    let body = &column_type[open + 1..];
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut label = String::new();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    label.push('\'');
                } else {
                    break;
                }
            } else {
                label.push(c);
            }
        }
        labels.push(label);
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_unquote_doubled_quotes() {
        assert_eq!(parse_labels("enum('a','b''c','')"), vec!["a", "b'c", ""]);
        assert_eq!(parse_labels("set('x,y','z')"), vec!["x,y", "z"]);
        assert!(parse_labels("int(11)").is_empty());
    }
}
