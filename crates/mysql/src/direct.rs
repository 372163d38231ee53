//! Direct backfill into a MySQL/MariaDB target: each chunk goes in with one
//! `LOAD DATA LOCAL INFILE` fed from memory (multi-row `INSERT`s of up to 4 MiB where the
//! server refuses LOCAL or a column type has no field form), in one transaction that also
//! records the chunk's last key in `<state_database>.direct_backfill`, so a killed load
//! resumes after the last committed chunk and never inserts a row twice.
//!
//! The server turns `LOAD DATA LOCAL`'s errors into warnings (LOCAL implies IGNORE: a
//! duplicate key or a value the column cannot hold would be skipped or changed). A chunk
//! that loads with a warning, or with fewer rows than were sent, is rolled back and
//! inserted again with `INSERT`s, which in strict mode either store it exactly or fail
//! naming the value.
//!
//! A MySQL-family source's chunk whose columns all have the same types in the target, and
//! a text form `LOAD DATA` reads back exactly, goes in as the source server's text
//! ([`MysqlDirectLoader::load_text`]), without a JSON image in between.

use crate::backfill::TextChunk;
use crate::connection::{classify, connect, quote_ident, quote_table, string_literal};
use crate::schema::{load_table, ColumnInfo, TableSchema};
use crate::sink::{quoted_list, statements, TargetTable};
use crate::values::{load_field_expression, loads_as_field, push_load_field};
use futures::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use tidelink_core::{DirectProgress, Row, TableId, TidelinkError};

/// Loads rows into one MySQL-family target.
pub struct MysqlDirectLoader {
    conn: Conn,
    state_database: String,
    /// The server takes `LOAD DATA LOCAL`; cleared at its first refusal.
    local_infile: bool,
    /// For the table of the last [`Self::load_text`], its `LOAD DATA` statement when the
    /// target's columns take the source's text as it is, else `None`.
    text_statement: Option<(TableId, Option<String>)>,
}

/// Server errors refusing `LOAD DATA LOCAL` (`local_infile=OFF`): "command not allowed"
/// (MySQL 5.7, older MariaDB), MySQL 8's "loading local data is disabled", MariaDB 10.5+'s
/// "disabled the local infile capability".
const LOCAL_INFILE_REFUSED: [u16; 3] = [1148, 3948, 4166];

/// How a `LOAD DATA` attempt ended when it did not fail.
enum LoadData {
    Committed,
    /// Rolled back; the chunk goes in with `INSERT`s instead.
    RolledBack,
}

fn fail(what: String) -> impl Fn(mysql_async::Error) -> TidelinkError {
    move |e| classify(&e).context(what.clone())
}

impl MysqlDirectLoader {
    /// Connects and creates the progress table when absent.
    pub async fn connect(dsn: &str, state_database: &str) -> Result<Self, TidelinkError> {
        let mut conn = connect(dsn, "direct backfill").await?;
        let db = quote_ident(state_database);
        for sql in [
            format!("CREATE DATABASE IF NOT EXISTS {db}"),
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.direct_backfill (
                     target_table varchar(255) NOT NULL PRIMARY KEY,
                     after_key text,
                     rows_loaded bigint NOT NULL,
                     done tinyint(1) NOT NULL,
                     updated_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
            ),
        ] {
            conn.query_drop(&sql)
                .await
                .map_err(fail("creating the direct backfill progress table".into()))?;
        }
        Ok(Self {
            conn,
            state_database: state_database.to_string(),
            local_infile: true,
            text_statement: None,
        })
    }

    /// What an earlier run recorded for this target table.
    pub async fn progress(&mut self, table: &TableId) -> Result<DirectProgress, TidelinkError> {
        let row: Option<(Option<String>, i64, i64)> = self
            .conn
            .exec_first(
                format!(
                    "SELECT after_key, rows_loaded, done FROM {} WHERE target_table = ?",
                    quote_table(&self.state_database, "direct_backfill")
                ),
                (table.to_string(),),
            )
            .await
            .map_err(fail("reading direct backfill progress".into()))?;
        Ok(match row {
            None => DirectProgress::default(),
            Some((after, rows, done)) => DirectProgress {
                after: after.and_then(|k| serde_json::from_str(&k).ok()),
                rows: rows as u64,
                done: done != 0,
            },
        })
    }

    /// Forgets recorded progress (a `--restart`).
    pub async fn reset(&mut self, table: &TableId) -> Result<(), TidelinkError> {
        self.conn
            .exec_drop(
                format!(
                    "DELETE FROM {} WHERE target_table = ?",
                    quote_table(&self.state_database, "direct_backfill")
                ),
                (table.to_string(),),
            )
            .await
            .map_err(fail("resetting direct backfill progress".into()))
    }

    /// Inserts `rows` into `table` and records `progress`, in one transaction.
    pub async fn load(
        &mut self,
        table: &TableId,
        rows: &[Row],
        progress: &DirectProgress,
    ) -> Result<(), TidelinkError> {
        let schema = self.target_schema(table).await?;
        let target = TargetTable {
            quoted: quote_table(&table.schema, &table.name),
            columns: schema
                .columns
                .iter()
                .map(|c| (c.name.to_string(), c.clone()))
                .collect(),
        };
        let columns: Vec<&ColumnInfo> = schema
            .columns
            .iter()
            .filter(|c| rows.first().is_none_or(|r| r.contains_key(&c.name)))
            .collect();
        let record = self.progress_record(table, progress);
        if self.local_infile && !rows.is_empty() && columns.iter().all(|c| loads_as_field(c)) {
            let data = load_data_fields(table, &columns, rows)?;
            let statement = load_data_statement(&target.quoted, &columns);
            match self
                .load_data(table, &statement, data, rows.len(), &record)
                .await?
            {
                LoadData::Committed => return Ok(()),
                LoadData::RolledBack => {}
            }
        }
        let columns: Vec<String> = columns.iter().map(|c| c.name.to_string()).collect();
        let head = format!(
            "INSERT INTO {} ({}) VALUES ",
            target.quoted,
            quoted_list(&columns)
        );
        let inserts = statements(&head, "", &target, table, rows.iter(), &columns)
            .map_err(|e| TidelinkError::permanent(e.to_string()))?;
        let what = format!("loading into {table}");
        self.conn
            .query_drop("START TRANSACTION")
            .await
            .map_err(fail(what.clone()))?;
        let result = async {
            for statement in inserts {
                self.conn
                    .query_drop(statement)
                    .await
                    .map_err(fail(what.clone()))?;
            }
            self.conn
                .query_drop(&record)
                .await
                .map_err(fail(what.clone()))
        }
        .await;
        match result {
            Ok(()) => self.conn.query_drop("COMMIT").await.map_err(fail(what)),
            Err(e) => {
                let _ = self.conn.query_drop("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Inserts a chunk read from a MySQL-family source into `table` and records
    /// `progress`, in one transaction: as the source's text when every column of the
    /// chunk has the same type in the target and a text form `LOAD DATA` reads back as it
    /// was (integers, DECIMAL, dates and times, text in the same character set, ENUM,
    /// SET), else, or when that load is rolled back, as [`Self::load`] inserts rows.
    pub async fn load_text(
        &mut self,
        table: &TableId,
        chunk: &TextChunk,
        progress: &DirectProgress,
    ) -> Result<(), TidelinkError> {
        if self.local_infile && !chunk.is_empty() {
            let statement = match &self.text_statement {
                Some((known, statement)) if known == table => statement.clone(),
                _ => {
                    let statement = self.text_load_statement(table, chunk.columns()).await?;
                    if statement.is_none() {
                        tracing::info!(
                            %table,
                            "the target's column types differ from the source's, or have no \
                             exact text form: loading rows converted value by value"
                        );
                    }
                    self.text_statement = Some((table.clone(), statement.clone()));
                    statement
                }
            };
            if let (Some(statement), Some(data)) = (statement, load_data_text(chunk)) {
                let record = self.progress_record(table, progress);
                match self
                    .load_data(table, &statement, data, chunk.len(), &record)
                    .await?
                {
                    LoadData::Committed => return Ok(()),
                    LoadData::RolledBack => {}
                }
            }
        }
        self.load(table, &chunk.images()?, progress).await
    }

    /// The `LOAD DATA` statement taking `source` columns' text as it is into `table`, when
    /// each of them has the same type in `table` and an exact text form.
    async fn text_load_statement(
        &mut self,
        table: &TableId,
        source: &[ColumnInfo],
    ) -> Result<Option<String>, TidelinkError> {
        let target = self.target_schema(table).await?;
        let same = source.iter().all(|column| {
            passes_as_text(column)
                && target.columns.iter().any(|t| {
                    t.name == column.name
                        && t.column_type == column.column_type
                        && t.charset == column.charset
                })
        });
        let columns: Vec<&ColumnInfo> = source.iter().collect();
        Ok(same.then(|| load_data_statement(&quote_table(&table.schema, &table.name), &columns)))
    }

    /// The target table's definition; an error naming it when it does not exist.
    async fn target_schema(&mut self, table: &TableId) -> Result<TableSchema, TidelinkError> {
        load_table(&mut self.conn, table).await?.ok_or_else(|| {
            TidelinkError::permanent(format!(
                "target table {table} does not exist: create it before a direct backfill"
            ))
        })
    }

    /// The statement recording `progress` for `table`.
    fn progress_record(&self, table: &TableId, progress: &DirectProgress) -> String {
        let after = progress
            .after
            .as_ref()
            .map(|k| string_literal(&serde_json::to_string(k).expect("keys serialize")))
            .unwrap_or_else(|| "NULL".into());
        format!(
            "INSERT INTO {} (target_table, after_key, rows_loaded, done) VALUES ({}, {after}, {}, {}) \
             ON DUPLICATE KEY UPDATE after_key = VALUES(after_key), rows_loaded = VALUES(rows_loaded), \
             done = VALUES(done), updated_at = CURRENT_TIMESTAMP(6)",
            quote_table(&self.state_database, "direct_backfill"),
            string_literal(&table.to_string()),
            progress.rows,
            u8::from(progress.done)
        )
    }

    /// Loads `data`, the `LOAD DATA` text of `rows` rows, with one `statement` and runs
    /// `record`, in one transaction. Rolls back, for `INSERT`s to take over, when the
    /// server refuses LOCAL (then for good) or the load skipped or changed anything.
    async fn load_data(
        &mut self,
        table: &TableId,
        statement: &str,
        data: Vec<bytes::Bytes>,
        rows: usize,
        record: &str,
    ) -> Result<LoadData, TidelinkError> {
        let what = format!("loading into {table}");
        self.conn
            .query_drop("START TRANSACTION")
            .await
            .map_err(fail(what.clone()))?;
        self.conn.set_infile_handler(async move {
            Ok(futures::stream::iter(data.into_iter().map(Ok)).boxed())
        });
        let loaded = self.conn.query_drop(statement).await;
        let outcome = match loaded {
            Err(mysql_async::Error::Server(e)) if LOCAL_INFILE_REFUSED.contains(&e.code) => {
                tracing::warn!(
                    %table,
                    error = %e.message,
                    "the target refuses LOAD DATA LOCAL INFILE: loading with multi-row INSERTs \
                     instead (SET GLOBAL local_infile = 1 on the target loads faster)"
                );
                self.local_infile = false;
                Ok(LoadData::RolledBack)
            }
            Err(e) => Err(fail(what.clone())(e)),
            Ok(()) => {
                let affected = self.conn.affected_rows();
                let warnings = self.conn.get_warnings();
                if affected == rows as u64 && warnings == 0 {
                    match self.conn.query_drop(record).await {
                        Ok(()) => {
                            return self
                                .conn
                                .query_drop("COMMIT")
                                .await
                                .map(|()| LoadData::Committed)
                                .map_err(fail(what));
                        }
                        Err(e) => Err(fail(what.clone())(e)),
                    }
                } else {
                    let shown: Vec<(String, u32, String)> = self
                        .conn
                        .query("SHOW WARNINGS LIMIT 3")
                        .await
                        .unwrap_or_default();
                    let shown: Vec<String> = shown.into_iter().map(|(_, _, m)| m).collect();
                    tracing::warn!(
                        %table,
                        sent = rows,
                        loaded = affected,
                        warnings,
                        first_warnings = %shown.join("; "),
                        "LOAD DATA did not store the chunk exactly: rolled back, inserting it \
                         with INSERTs, which name any value the target cannot hold"
                    );
                    Ok(LoadData::RolledBack)
                }
            }
        };
        let _ = self.conn.query_drop("ROLLBACK").await;
        outcome
    }
}

/// The `LOAD DATA` statement for `columns` of a table, reading [`load_data_fields`]' text.
fn load_data_statement(quoted_table: &str, columns: &[&ColumnInfo]) -> String {
    let mut targets = Vec::with_capacity(columns.len());
    let mut assignments = Vec::new();
    for (i, column) in columns.iter().enumerate() {
        match load_field_expression(column) {
            None => targets.push(quote_ident(&column.name)),
            Some(expression) => {
                let variable = format!("@field{i}");
                assignments.push(format!(
                    "{} = {}",
                    quote_ident(&column.name),
                    expression.replace("{}", &variable)
                ));
                targets.push(variable);
            }
        }
    }
    let mut statement = format!(
        "LOAD DATA LOCAL INFILE 'tidelink-direct-backfill' INTO TABLE {quoted_table} \
         CHARACTER SET utf8mb4 FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' \
         LINES TERMINATED BY '\\n' ({})",
        targets.join(", ")
    );
    if !assignments.is_empty() {
        statement.push_str(" SET ");
        statement.push_str(&assignments.join(", "));
    }
    statement
}

/// The rows as `LOAD DATA` text, in pieces of about 1 MiB. A value the column cannot hold
/// is an error naming the table and the column.
fn load_data_fields(
    table: &TableId,
    columns: &[&ColumnInfo],
    rows: &[Row],
) -> Result<Vec<bytes::Bytes>, TidelinkError> {
    let mut pieces = Vec::new();
    let mut text = String::with_capacity(PIECE_CAPACITY);
    for row in rows {
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                text.push('\t');
            }
            let value = row.get(&column.name).unwrap_or(&serde_json::Value::Null);
            push_load_field(&mut text, value, column)
                .map_err(|e| TidelinkError::permanent(format!("loading into {table}: {e}")))?;
        }
        text.push('\n');
        end_row(&mut pieces, &mut text, false, String::with_capacity);
    }
    end_row(&mut pieces, &mut text, true, String::with_capacity);
    Ok(pieces)
}

/// `LOAD DATA` text goes to the server in pieces of about this many bytes of whole rows.
const PIECE: usize = 1 << 20;

/// Room for a piece and the row that takes it over [`PIECE`].
const PIECE_CAPACITY: usize = PIECE + 4096;

/// After a row of `LOAD DATA` text: moves the text into `pieces` once it holds a
/// [`PIECE`], leaving a `fresh` buffer of [`PIECE_CAPACITY`] in its place, or when it is
/// the `last` row.
fn end_row<T: AsRef<[u8]> + Into<bytes::Bytes>>(
    pieces: &mut Vec<bytes::Bytes>,
    text: &mut T,
    last: bool,
    fresh: fn(usize) -> T,
) {
    let len = text.as_ref().len();
    if len >= PIECE {
        pieces.push(std::mem::replace(text, fresh(PIECE_CAPACITY)).into());
    } else if last && len > 0 {
        pieces.push(std::mem::replace(text, fresh(0)).into());
    }
}

/// A column whose text, as the server sends it over a `SET NAMES utf8mb4` connection in
/// UTC, `LOAD DATA … CHARACTER SET utf8mb4` reads back into the same type as it was.
/// Floating-point, BIT, binary and JSON values go through [`push_load_field`] instead.
fn passes_as_text(column: &ColumnInfo) -> bool {
    loads_as_field(column)
        && !column.is_binary()
        && !matches!(
            column.data_type.as_str(),
            "float" | "double" | "real" | "bit" | "json"
        )
}

/// A text chunk as `LOAD DATA` text, in pieces of about 1 MiB; `None` when a value did
/// not arrive as text.
fn load_data_text(chunk: &TextChunk) -> Option<Vec<bytes::Bytes>> {
    let width = chunk.columns().len();
    let mut pieces = Vec::new();
    let mut text: Vec<u8> = Vec::with_capacity(PIECE_CAPACITY);
    for row in chunk.rows() {
        for i in 0..width {
            if i > 0 {
                text.push(b'\t');
            }
            match row.as_ref(i)? {
                mysql_async::Value::NULL => text.extend_from_slice(b"\\N"),
                mysql_async::Value::Bytes(bytes) => push_escaped_bytes(&mut text, bytes),
                _ => return None,
            }
        }
        text.push(b'\n');
        end_row(&mut pieces, &mut text, false, Vec::with_capacity);
    }
    end_row(&mut pieces, &mut text, true, Vec::with_capacity);
    Some(pieces)
}

/// Bytes escaped for a `LOAD DATA` field, as `push_load_field` escapes text.
fn push_escaped_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut rest = bytes;
    while let Some(at) = rest
        .iter()
        .position(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r' | 0))
    {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(match rest[at] {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => b"\\0",
        });
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_escaped_as_load_data_reads_them() {
        let mut out = Vec::new();
        push_escaped_bytes(&mut out, b"a\\b\tc\nd\re\0f \\N");
        assert_eq!(out, b"a\\\\b\\tc\\nd\\re\\0f \\\\N".to_vec());
        let mut text = String::new();
        push_load_field(
            &mut text,
            &serde_json::Value::String("a\\b\tc\nd\re\0f \\N".into()),
            &ColumnInfo {
                name: "t".into(),
                data_type: "varchar".into(),
                column_type: "varchar(40)".into(),
                unsigned: false,
                charset: Some("utf8mb4".into()),
                labels: Vec::new(),
                bits: 0,
                key: false,
                not_null: false,
            },
        )
        .expect("a text value");
        assert_eq!(
            text.as_bytes(),
            out,
            "the same escapes as a converted value"
        );
    }

    #[test]
    fn pieces_hold_whole_rows_and_the_last_one_is_kept() {
        let mut pieces = Vec::new();
        let mut text = vec![b'x'; PIECE - 1];
        end_row(&mut pieces, &mut text, false, Vec::with_capacity);
        assert!(pieces.is_empty(), "under a piece: kept open");
        text.push(b'\n');
        end_row(&mut pieces, &mut text, false, Vec::with_capacity);
        assert_eq!(pieces.len(), 1);
        assert!(text.is_empty());
        end_row(&mut pieces, &mut text, true, Vec::with_capacity);
        assert_eq!(pieces.len(), 1, "nothing left: no empty piece");
        text.extend_from_slice(b"1\n");
        end_row(&mut pieces, &mut text, true, Vec::with_capacity);
        assert_eq!(pieces.len(), 2);
        assert_eq!(&pieces[1][..], b"1\n");
    }
}
