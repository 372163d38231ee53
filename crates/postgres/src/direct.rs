//! Direct backfill into a PostgreSQL target: rows go straight in with `COPY … FROM STDIN`,
//! the fastest bulk path PostgreSQL has, for the first load of a large table.
//!
//! Each chunk is one transaction that also records the chunk's last key in
//! `<state_schema>.direct_backfill`, so a killed load resumes after the last committed
//! chunk and never copies a row twice.

use crate::backfill::{server_major, CopyFormat, TableReader};
use crate::catalog::TypeCache;
use crate::connection::{classify, connect, quote_ident, quote_table};
use crate::copy_binary;
use crate::sink::{load_target_columns, TargetColumn};
use crate::types::json_to_text;
use bytes::{BufMut, BytesMut};
use futures::SinkExt;
use std::collections::HashMap;
use tidelink_core::{DirectProgress, Row, SinkError, TableId, TidelinkError};
use tokio_postgres::Client;

/// Loads rows into one PostgreSQL target.
pub struct PgDirectLoader {
    client: Client,
    state_schema: String,
    types: TypeCache,
}

impl PgDirectLoader {
    /// Connects and creates the progress table when absent.
    pub async fn connect(dsn: &str, state_schema: &str) -> Result<Self, TidelinkError> {
        let client = connect(dsn, "direct backfill").await?;
        let schema = quote_ident(state_schema);
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {schema}.direct_backfill (
                     target_table text PRIMARY KEY,
                     after_key text,
                     rows_loaded bigint NOT NULL,
                     done boolean NOT NULL,
                     updated_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            .map_err(|e| classify(&e).context("creating the direct backfill progress table"))?;
        Ok(Self {
            client,
            state_schema: state_schema.to_string(),
            types: TypeCache::default(),
        })
    }

    /// What an earlier run recorded for this target table.
    pub async fn progress(&self, table: &TableId) -> Result<DirectProgress, TidelinkError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT after_key, rows_loaded, done FROM {}.direct_backfill WHERE target_table = $1",
                    quote_ident(&self.state_schema)
                ),
                &[&table.to_string()],
            )
            .await
            .map_err(|e| classify(&e).context("reading direct backfill progress"))?;
        Ok(match row {
            None => DirectProgress::default(),
            Some(row) => DirectProgress {
                after: row
                    .get::<_, Option<String>>(0)
                    .and_then(|k| serde_json::from_str(&k).ok()),
                rows: row.get::<_, i64>(1) as u64,
                done: row.get(2),
            },
        })
    }

    /// Forgets recorded progress (a `--restart`).
    pub async fn reset(&self, table: &TableId) -> Result<(), TidelinkError> {
        self.client
            .execute(
                &format!(
                    "DELETE FROM {}.direct_backfill WHERE target_table = $1",
                    quote_ident(&self.state_schema)
                ),
                &[&table.to_string()],
            )
            .await
            .map_err(|e| classify(&e).context("resetting direct backfill progress"))?;
        Ok(())
    }

    /// The format in which `source`'s rows can pass into `table` untouched: binary when
    /// both servers share a major version, every source column has a target column of the
    /// same type among [`copy_binary::column_type_portable`]'s, and the key's types can be
    /// read back from their binary form;
    /// otherwise text, which any type that accepts the text takes (a wider integer,
    /// `text` for an enum).
    pub async fn copy_format_for(
        &self,
        table: &TableId,
        source: &TableReader,
    ) -> Result<CopyFormat, TidelinkError> {
        if !source.binary_keys_readable()
            || source.server_major().await? != server_major(&self.client).await?
        {
            return Ok(CopyFormat::Text);
        }
        let rows = self
            .client
            .query(
                "SELECT attname::text, atttypid FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                &[&quote_table(&table.schema, &table.name)],
            )
            .await
            .map_err(|e| classify(&e).context(format!("reading the columns of {table}")))?;
        let target: HashMap<String, u32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let same = source.column_types().all(|(name, oid)| {
            copy_binary::column_type_portable(oid) && target.get(name) == Some(&oid)
        });
        Ok(if same {
            CopyFormat::Binary
        } else {
            CopyFormat::Text
        })
    }

    /// Starts one transaction that streams `COPY` data of `columns` in `format`, as a
    /// PostgreSQL source produced it, into `table`: the PostgreSQL → PostgreSQL fast path,
    /// with no conversion in between. Send the data with [`CopyLoad::send`] as it is read,
    /// then [`CopyLoad::commit`] with the progress it reaches.
    pub async fn begin_copy_rows(
        &mut self,
        table: &TableId,
        columns: &[String],
        format: CopyFormat,
    ) -> Result<CopyLoad<'_>, TidelinkError> {
        let quoted = quote_table(&table.schema, &table.name);
        let column_list = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let option = format.option();
        self.begin_copy(
            table,
            &format!("COPY {quoted} ({column_list}) FROM STDIN{option}"),
        )
        .await
    }

    async fn begin_copy(
        &mut self,
        table: &TableId,
        copy: &str,
    ) -> Result<CopyLoad<'_>, TidelinkError> {
        let fail = |e: tokio_postgres::Error| classify(&e).context(format!("copying into {table}"));
        self.client.batch_execute("BEGIN").await.map_err(fail)?;
        match self.client.copy_in(copy).await {
            Ok(sink) => Ok(CopyLoad {
                loader: self,
                sink: Box::pin(sink),
                table: table.clone(),
            }),
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                Err(fail(e))
            }
        }
    }

    /// Copies `rows` into `table` and records `progress`, in one transaction.
    pub async fn load(
        &mut self,
        table: &TableId,
        rows: &[Row],
        progress: &DirectProgress,
    ) -> Result<(), TidelinkError> {
        let quoted = quote_table(&table.schema, &table.name);
        let columns: Vec<(String, TargetColumn)> =
            load_target_columns(&self.client, &mut self.types, &quoted)
                .await
                .map_err(|e| match e {
                    SinkError::Transient(m) => TidelinkError::transient(m),
                    other => TidelinkError::permanent(other.to_string()),
                })?;
        if columns.is_empty() {
            return Err(TidelinkError::permanent(format!(
                "target table {table} does not exist: create it before a direct backfill"
            )));
        }
        // Only the columns the source sends; others keep their defaults.
        let present: Vec<&(String, TargetColumn)> = columns
            .iter()
            .filter(|(name, _)| rows.first().is_none_or(|r| r.contains_key(name)))
            .collect();
        let mut data = BytesMut::with_capacity(rows.len() * 128);
        for row in rows {
            for (i, (name, column)) in present.iter().enumerate() {
                if i > 0 {
                    data.put_u8(b'\t');
                }
                let value = row.get(name).unwrap_or(&serde_json::Value::Null);
                match json_to_text(value, &column.kind)
                    .map_err(|e| TidelinkError::permanent(format!("{table}.{name}: {e}")))?
                {
                    None => data.put_slice(b"\\N"),
                    Some(text) => copy_escape(&mut data, &text),
                }
            }
            data.put_u8(b'\n');
        }
        let column_list = present
            .iter()
            .map(|(n, _)| quote_ident(n))
            .collect::<Vec<_>>()
            .join(", ");
        let mut copy = self
            .begin_copy(table, &format!("COPY {quoted} ({column_list}) FROM STDIN"))
            .await?;
        match copy.send(data.freeze()).await {
            Ok(()) => copy.commit(progress).await,
            Err(e) => {
                copy.abort().await;
                Err(e)
            }
        }
    }
}

/// One transaction of a direct load: `COPY` data streaming into a table, then the progress
/// it reached, committed together ([`PgDirectLoader::begin_copy_rows`]).
pub struct CopyLoad<'a> {
    loader: &'a mut PgDirectLoader,
    sink: std::pin::Pin<Box<tokio_postgres::CopyInSink<bytes::Bytes>>>,
    table: TableId,
}

impl CopyLoad<'_> {
    fn failed(&self, e: tokio_postgres::Error) -> TidelinkError {
        classify(&e).context(format!("copying into {}", self.table))
    }

    /// Sends `COPY` data of whole rows.
    pub async fn send(&mut self, data: bytes::Bytes) -> Result<(), TidelinkError> {
        match self.sink.send(data).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Ends the copy, records `progress` and commits; rolls back on any failure.
    pub async fn commit(mut self, progress: &DirectProgress) -> Result<(), TidelinkError> {
        let result = async {
            self.sink
                .as_mut()
                .finish()
                .await
                .map_err(|e| self.failed(e))?;
            let after = progress
                .after
                .as_ref()
                .map(|k| serde_json::to_string(k).expect("keys serialize"));
            self.loader
                .client
                .execute(
                    &format!(
                        "INSERT INTO {}.direct_backfill (target_table, after_key, rows_loaded, done) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (target_table) DO UPDATE SET \
                         after_key = EXCLUDED.after_key, rows_loaded = EXCLUDED.rows_loaded, \
                         done = EXCLUDED.done, updated_at = now()",
                        quote_ident(&self.loader.state_schema)
                    ),
                    &[
                        &self.table.to_string(),
                        &after,
                        &(progress.rows as i64),
                        &progress.done,
                    ],
                )
                .await
                .map_err(|e| self.failed(e))?;
            Ok::<(), TidelinkError>(())
        }
        .await;
        match result {
            Ok(()) => self
                .loader
                .client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| self.failed(e)),
            Err(e) => {
                let _ = self.loader.client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Abandons the copy and rolls its transaction back.
    pub async fn abort(self) {
        let CopyLoad { loader, sink, .. } = self;
        // A copy sink dropped unfinished tells the server the copy failed.
        drop(sink);
        let _ = loader.client.batch_execute("ROLLBACK").await;
    }
}

/// COPY text format: backslash, tab, newline and carriage return are escaped.
fn copy_escape(out: &mut BytesMut, text: &str) {
    for b in text.bytes() {
        match b {
            b'\\' => out.put_slice(b"\\\\"),
            b'\t' => out.put_slice(b"\\t"),
            b'\n' => out.put_slice(b"\\n"),
            b'\r' => out.put_slice(b"\\r"),
            other => out.put_u8(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_is_escaped() {
        let mut out = BytesMut::new();
        copy_escape(&mut out, "a\tb\\c\nd\re");
        assert_eq!(&out[..], b"a\\tb\\\\c\\nd\\re");
    }
}
