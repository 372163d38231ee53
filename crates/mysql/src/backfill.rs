//! Snapshot reads for backfills of MySQL/MariaDB tables: keyset-paginated chunks in key
//! order, each one short `SELECT` (InnoDB's consistent read, no table locks), values in the
//! same JSON form the binlog source produces.
//!
//! Key positions travel between chunks (and into the resumable progress record) as the
//! JSON text of each key value, and become SQL literals only here.

use crate::connection::{classify, connect, quote_ident, quote_table};
use crate::schema::{load_table, matching_tables, TableSchema};
use crate::values::{json_to_literal, text_to_json};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use std::sync::Arc;
use tidelink_core::{Row, TableColumns, TableId, TidelinkError};
use tokio::sync::Mutex;

/// Reads one table in key order.
pub struct TableReader {
    /// The table.
    pub table: TableId,
    schema: Arc<TableSchema>,
    conn: Mutex<Conn>,
    /// Column definitions for sinks that create tables.
    pub definitions: Arc<TableColumns>,
    /// The server's row estimate (for progress and ETA).
    pub estimated_rows: i64,
}

/// The captured tables of a source: those matching the patterns.
pub async fn captured_tables(
    dsn: &str,
    patterns: &[String],
) -> Result<Vec<TableId>, TidelinkError> {
    let mut conn = connect(dsn, "backfill").await?;
    matching_tables(&mut conn, patterns).await
}

impl TableReader {
    /// Opens a reader. Rows are paged by `key_columns` when given (exactly the columns of
    /// a unique index, all NOT NULL), else by the primary key; a table with neither is
    /// refused.
    pub async fn open(
        dsn: &str,
        table: &TableId,
        key_columns: &[String],
    ) -> Result<Self, TidelinkError> {
        Self::open_with(dsn, table, key_columns, false).await
    }

    /// Opens a reader on a table that may have no key, to read it whole
    /// ([`Self::all_rows`]).
    pub async fn open_whole(dsn: &str, table: &TableId) -> Result<Self, TidelinkError> {
        Self::open_with(dsn, table, &[], true).await
    }

    async fn open_with(
        dsn: &str,
        table: &TableId,
        key_columns: &[String],
        keyless_allowed: bool,
    ) -> Result<Self, TidelinkError> {
        let mut conn = connect(dsn, "backfill").await?;
        let mut schema = load_table(&mut conn, table)
            .await?
            .ok_or_else(|| TidelinkError::permanent(format!("table {table} does not exist")))?;
        if !key_columns.is_empty() {
            let indexes: Vec<(String, String)> = conn
                .exec(
                    "SELECT INDEX_NAME, GROUP_CONCAT(COLUMN_NAME ORDER BY COLUMN_NAME SEPARATOR ',') \
                     FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
                     AND NON_UNIQUE = 0 GROUP BY INDEX_NAME",
                    (&table.schema, &table.name),
                )
                .await
                .map_err(|e| classify(&e).context(format!("reading the unique indexes of {table}")))?;
            let mut wanted = key_columns.to_vec();
            wanted.sort();
            let wanted = wanted.join(",");
            if !indexes.iter().any(|(_, columns)| *columns == wanted) {
                return Err(TidelinkError::permanent(format!(
                    "--key-columns {}: {table} has no unique index on exactly these columns",
                    key_columns.join(",")
                )));
            }
            let mut key = Vec::new();
            for name in key_columns {
                let i = schema
                    .columns
                    .iter()
                    .position(|c| *c.name == **name)
                    .ok_or_else(|| {
                        TidelinkError::permanent(format!(
                            "--key-columns: {table} has no column `{name}`"
                        ))
                    })?;
                if !schema.columns[i].not_null {
                    return Err(TidelinkError::permanent(format!(
                        "--key-columns: {table}.{name} allows NULLs, which would let rows share a key; make it NOT NULL"
                    )));
                }
                key.push(i);
            }
            schema.key = key;
        }
        if schema.key.is_empty() && !keyless_allowed {
            return Err(TidelinkError::permanent(format!(
                "table {table} has no primary key: a backfill pages through a table by its key, so its existing rows are not copied (its changes are streamed). \
                 Add a primary key, or name the columns of a unique NOT NULL index with --key-columns"
            )));
        }
        let estimated_rows: Option<u64> = conn
            .exec_first(
                "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&table.schema, &table.name),
            )
            .await
            .map_err(|e| classify(&e).context(format!("estimating the rows of {table}")))?;
        Ok(Self {
            table: table.clone(),
            definitions: schema.definitions.clone(),
            schema: Arc::new(schema),
            conn: Mutex::new(conn),
            estimated_rows: estimated_rows.unwrap_or(0) as i64,
        })
    }

    fn key_names(&self) -> Vec<String> {
        self.schema
            .key
            .iter()
            .map(|&i| quote_ident(&self.schema.columns[i].name))
            .collect()
    }

    fn literals(&self, key: &[String]) -> Result<Vec<String>, TidelinkError> {
        self.schema
            .key
            .iter()
            .zip(key)
            .map(|(&i, text)| {
                let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    TidelinkError::permanent(format!("stored key position `{text}`: {e}"))
                })?;
                json_to_literal(&value, &self.schema.columns[i]).map_err(TidelinkError::permanent)
            })
            .collect()
    }

    /// `(k1, k2) <op> (v1, v2)` spelt out column by column, which MySQL turns into index
    /// ranges (`>` and `<=` only).
    fn compare(&self, op: &str, key: &[String]) -> Result<String, TidelinkError> {
        let names = self.key_names();
        let values = self.literals(key)?;
        let strict = if op == "<=" { "<" } else { op };
        let mut alternatives = Vec::new();
        for i in 0..names.len() {
            let mut terms: Vec<String> = (0..i)
                .map(|j| format!("{} = {}", names[j], values[j]))
                .collect();
            let last = if i + 1 == names.len() { op } else { strict };
            terms.push(format!("{} {last} {}", names[i], values[i]));
            alternatives.push(format!("({})", terms.join(" AND ")));
        }
        Ok(format!("({})", alternatives.join(" OR ")))
    }

    async fn select(&self, sql: &str) -> Result<Vec<(Row, Row, Vec<String>)>, TidelinkError> {
        let rows = self.query_rows(sql).await?;
        images_of(&self.schema, rows)
    }

    async fn query_rows(&self, sql: &str) -> Result<Vec<mysql_async::Row>, TidelinkError> {
        self.conn
            .lock()
            .await
            .query(sql)
            .await
            .map_err(|e| classify(&e).context(format!("reading {}", self.table)))
    }

    /// Column names in table order.
    pub fn column_names(&self) -> Vec<String> {
        self.schema
            .columns
            .iter()
            .map(|c| c.name.to_string())
            .collect()
    }

    /// `WHERE` clause for the keys after `after` and up to `upto` (empty for neither).
    fn key_range(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
    ) -> Result<String, TidelinkError> {
        let mut conditions = Vec::new();
        if let Some(after) = after {
            conditions.push(self.compare(">", after)?);
        }
        if let Some(upto) = upto {
            conditions.push(self.compare("<=", upto)?);
        }
        Ok(if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        })
    }

    /// Count and a 128-bit checksum, computed in the server, of the rows after `after` and
    /// up to `upto` (at most `limit` of them, in key order), each rendered as
    /// `CONCAT_WS(',', QUOTE(column)…)` of `columns` and hashed with MD5 (the row hashes are
    /// XORed, so order does not matter); and the last row's key in text form. `None` when
    /// the range holds no row.
    pub async fn range_digest(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: Option<usize>,
        columns: &[String],
    ) -> Result<Option<(i64, String, Vec<String>)>, TidelinkError> {
        let filter = self.key_range(after, upto)?;
        let keys = self.key_names().join(", ");
        let limit = limit.map_or(String::new(), |l| format!("LIMIT {l}"));
        let row = columns
            .iter()
            .map(|c| format!("QUOTE({})", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let table = quote_table(&self.table.schema, &self.table.name);
        let range = format!(
            "SELECT {} FROM {table} {filter} ORDER BY {keys} {limit}",
            self.column_list()
        );
        let digest_sql = format!(
            "SELECT COUNT(*), \
                    CAST(COALESCE(BIT_XOR(CAST(CONV(SUBSTRING(h, 1, 16), 16, 10) AS UNSIGNED)), 0) AS CHAR), \
                    CAST(COALESCE(BIT_XOR(CAST(CONV(SUBSTRING(h, 17, 16), 16, 10) AS UNSIGNED)), 0) AS CHAR) \
             FROM (SELECT MD5(CONCAT_WS(',', {row})) AS h FROM {table} {filter} ORDER BY {keys} {limit}) x"
        );
        let digest: Option<(i64, String, String)> = self
            .conn
            .lock()
            .await
            .query_first(&digest_sql)
            .await
            .map_err(|e| classify(&e).context(format!("checksumming a range of {}", self.table)))?;
        let Some((count, high, low)) = digest.filter(|(count, _, _)| *count > 0) else {
            return Ok(None);
        };
        let descending: Vec<String> = self
            .key_names()
            .iter()
            .map(|k| format!("{k} DESC"))
            .collect();
        let last = self
            .select(&format!(
                "SELECT * FROM ({range}) x ORDER BY {} LIMIT 1",
                descending.join(", ")
            ))
            .await?
            .into_iter()
            .next()
            .map(|(_, _, key)| key)
            .unwrap_or_default();
        Ok(Some((count, format!("{high}:{low}"), last)))
    }

    /// The largest key now (`None`: empty table).
    pub async fn max_key(&self) -> Result<Option<Vec<String>>, TidelinkError> {
        let descending: Vec<String> = self
            .key_names()
            .iter()
            .map(|k| format!("{k} DESC"))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {} LIMIT 1",
            self.column_list(),
            quote_table(&self.table.schema, &self.table.name),
            descending.join(", ")
        );
        Ok(self
            .select(&sql)
            .await?
            .into_iter()
            .next()
            .map(|(_, _, k)| k))
    }

    /// The table has no key.
    pub fn is_keyless(&self) -> bool {
        self.schema.key.is_empty()
    }

    /// Every row of the table, in no particular order (one consistent read).
    pub async fn all_rows(&self) -> Result<Vec<Row>, TidelinkError> {
        let sql = format!(
            "SELECT {} FROM {}",
            self.column_list(),
            quote_table(&self.table.schema, &self.table.name)
        );
        Ok(self
            .select(&sql)
            .await?
            .into_iter()
            .map(|(_, image, _)| image)
            .collect())
    }

    /// Opens a consistent snapshot (`START TRANSACTION WITH CONSISTENT SNAPSHOT`) and
    /// returns the binlog position it matches: every transaction the snapshot sees was
    /// written to the binlog before it, every other one after (MariaDB's
    /// `binlog_snapshot_file` and `binlog_snapshot_position`). Rows then come from
    /// [`Self::stream_consistent`]; [`Self::end_consistent`] closes the transaction.
    pub async fn begin_consistent(&self) -> Result<(String, u64), TidelinkError> {
        let mut conn = self.conn.lock().await;
        let context = |what: &str| format!("{what} of {}", self.table);
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .map_err(|e| classify(&e).context(context("setting up the consistent read")))?;
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .await
            .map_err(|e| classify(&e).context(context("starting the consistent read")))?;
        let status: Vec<(String, String)> = conn
            .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
            .await
            .map_err(|e| classify(&e).context(context("reading the snapshot's binlog position")))?;
        let value = |name: &str| {
            status
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        match (
            value("binlog_snapshot_file"),
            value("binlog_snapshot_position").and_then(|p| p.parse::<u64>().ok()),
        ) {
            (Some(file), Some(pos)) if !file.is_empty() => Ok((file, pos)),
            _ => {
                let _ = conn.query_drop("ROLLBACK").await;
                Err(TidelinkError::permanent(format!(
                    "table {} has no primary key, and this server does not tell the binlog position of a consistent snapshot                      (binlog_snapshot_file, a MariaDB status variable), so its existing rows cannot be copied exactly: add a primary key",
                    self.table
                )))
            }
        }
    }

    /// Sends every row of the consistent read to `rows`, `chunk` at a time.
    pub async fn stream_consistent(
        &self,
        chunk: usize,
        rows: tokio::sync::mpsc::Sender<Vec<Row>>,
    ) -> Result<(), TidelinkError> {
        let sql = format!(
            "SELECT {} FROM {}",
            self.column_list(),
            quote_table(&self.table.schema, &self.table.name)
        );
        let mut conn = self.conn.lock().await;
        let context = || format!("reading {}", self.table);
        let mut result = conn
            .query_iter(sql)
            .await
            .map_err(|e| classify(&e).context(context()))?;
        let mut batch = Vec::with_capacity(chunk);
        while let Some(row) = result
            .next()
            .await
            .map_err(|e| classify(&e).context(context()))?
        {
            let values = row.unwrap();
            let mut image = Row::with_capacity(self.schema.columns.len());
            for (column, value) in self.schema.columns.iter().zip(values.iter()) {
                let json = text_to_json(value, column)
                    .map_err(|e| TidelinkError::permanent(format!("{}: {e}", self.table)))?;
                image.insert(column.name.clone(), json);
            }
            batch.push(image);
            if batch.len() >= chunk
                && rows
                    .send(std::mem::replace(&mut batch, Vec::with_capacity(chunk)))
                    .await
                    .is_err()
            {
                return Ok(());
            }
        }
        if !batch.is_empty() {
            let _ = rows.send(batch).await;
        }
        Ok(())
    }

    /// Ends the consistent read.
    pub async fn end_consistent(&self) -> Result<(), TidelinkError> {
        self.conn
            .lock()
            .await
            .query_drop("COMMIT")
            .await
            .map_err(|e| {
                classify(&e).context(format!("ending the consistent read of {}", self.table))
            })
    }

    fn column_list(&self) -> String {
        self.schema
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Up to `limit` rows after `after` and up to `upto`, in key order: key, image, and the
    /// key's position text for the next call.
    pub async fn chunk(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<(Row, Row, Vec<String>)>, TidelinkError> {
        self.select(&self.chunk_query(after, upto, limit)?).await
    }

    /// The `SELECT` of every column of up to `limit` rows after `after` and up to `upto`.
    fn chunk_query(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: usize,
    ) -> Result<String, TidelinkError> {
        let filter = self.key_range(after, upto)?;
        Ok(format!(
            "SELECT {} FROM {} {filter} ORDER BY {} LIMIT {limit}",
            self.column_list(),
            quote_table(&self.table.schema, &self.table.name),
            self.key_names().join(", ")
        ))
    }

    /// As [`Self::chunk`], the rows as the server's text protocol sent them (see
    /// [`TextChunk`]).
    pub async fn text_chunk(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: usize,
    ) -> Result<TextChunk, TidelinkError> {
        let rows = self
            .query_rows(&self.chunk_query(after, upto, limit)?)
            .await?;
        let last_key = match rows.last() {
            None => None,
            Some(last) => Some(key_text(&self.schema, last)?),
        };
        Ok(TextChunk {
            schema: self.schema.clone(),
            rows,
            last_key,
        })
    }

    /// The rows with these keys (JSON values, as images carry them), for comparisons.
    pub async fn rows_for(
        &self,
        keys: &[Row],
    ) -> Result<Vec<(Row, Row, Vec<String>)>, TidelinkError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut tuples = Vec::with_capacity(keys.len());
        for key in keys {
            let mut literals = Vec::with_capacity(self.schema.key.len());
            for &i in &self.schema.key {
                let column = &self.schema.columns[i];
                let value = key[&*column.name].clone();
                literals.push(json_to_literal(&value, column).map_err(TidelinkError::permanent)?);
            }
            tuples.push(format!("({})", literals.join(", ")));
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE ({}) IN ({})",
            self.column_list(),
            quote_table(&self.table.schema, &self.table.name),
            self.key_names().join(", "),
            tuples.join(", ")
        );
        self.select(&sql).await
    }

    /// Which of these keys (position texts) still exist.
    pub async fn existing(&self, keys: &[Vec<String>]) -> Result<Vec<bool>, TidelinkError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut tuples = Vec::with_capacity(keys.len());
        for key in keys {
            tuples.push(format!("({})", self.literals(key)?.join(", ")));
        }
        let names = self.key_names().join(", ");
        let sql = format!(
            "SELECT {} FROM {} WHERE ({names}) IN ({})",
            self.column_list(),
            quote_table(&self.table.schema, &self.table.name),
            tuples.join(", ")
        );
        let found: std::collections::HashSet<Vec<String>> = self
            .select(&sql)
            .await?
            .into_iter()
            .map(|(_, _, k)| k)
            .collect();
        Ok(keys.iter().map(|k| found.contains(k)).collect())
    }
}

/// A chunk of rows as the server's text protocol sent them, every column in table order,
/// for a `LOAD DATA` into a table of the same column types, which takes that text as it
/// is ([`crate::direct::MysqlDirectLoader::load_text`]); [`TextChunk::images`] turns them
/// into the JSON images every other path reads.
pub struct TextChunk {
    schema: Arc<TableSchema>,
    rows: Vec<mysql_async::Row>,
    /// The last row's key position, for the next chunk and the progress record.
    pub last_key: Option<Vec<String>>,
}

impl TextChunk {
    /// Rows in the chunk.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The chunk has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The source table's columns, in table order (the order of each row's values).
    pub fn columns(&self) -> &[crate::schema::ColumnInfo] {
        &self.schema.columns
    }

    /// The rows.
    pub fn rows(&self) -> &[mysql_async::Row] {
        &self.rows
    }

    /// The rows as JSON images, as [`TableReader::chunk`] gives them.
    pub fn images(&self) -> Result<Vec<Row>, TidelinkError> {
        Ok(images_of(&self.schema, self.rows.clone())?
            .into_iter()
            .map(|(_, image, _)| image)
            .collect())
    }
}

/// The key position text of a row read in table column order: each key value's JSON text.
fn key_text(schema: &TableSchema, row: &mysql_async::Row) -> Result<Vec<String>, TidelinkError> {
    let mut key = Vec::with_capacity(schema.key.len());
    for &i in &schema.key {
        let column = &schema.columns[i];
        let value = row.as_ref(i).ok_or_else(|| {
            TidelinkError::permanent(format!(
                "{}: no value for key column {}",
                schema.table, column.name
            ))
        })?;
        let json = text_to_json(value, column)
            .map_err(|e| TidelinkError::permanent(format!("{}: {e}", schema.table)))?;
        key.push(json.to_string());
    }
    Ok(key)
}

/// Rows read in table column order as (key, image, key position text).
fn images_of(
    schema: &TableSchema,
    rows: Vec<mysql_async::Row>,
) -> Result<Vec<(Row, Row, Vec<String>)>, TidelinkError> {
    // Cells go into a row in name order, each one a push onto its end.
    let mut by_name: Vec<usize> = (0..schema.columns.len()).collect();
    by_name.sort_by(|&a, &b| schema.columns[a].name.cmp(&schema.columns[b].name));
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let values = row.unwrap();
        let mut image = Row::with_capacity(schema.columns.len());
        for &i in &by_name {
            let (Some(column), Some(value)) = (schema.columns.get(i), values.get(i)) else {
                continue;
            };
            let json = text_to_json(value, column)
                .map_err(|e| TidelinkError::permanent(format!("{}: {e}", schema.table)))?;
            image.insert(column.name.clone(), json);
        }
        let mut key = Row::with_capacity(schema.key.len());
        let mut key_text = Vec::with_capacity(schema.key.len());
        for &i in &schema.key {
            let name = &schema.columns[i].name;
            let value = image[name].clone();
            key_text.push(value.to_string());
            key.insert(name.clone(), value);
        }
        out.push((key, image, key_text));
    }
    Ok(out)
}
