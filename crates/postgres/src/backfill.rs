//! Reading existing rows for a backfill: keyset pagination by primary key, one short
//! statement per chunk (no lock beyond the chunk's read), values rendered by the types'
//! output functions so every value — and every key, hence every Kafka partition — is
//! byte-for-byte what the replication stream produces for the same row.

use crate::catalog::{column_definitions, primary_key, TypeCache};
use crate::connection::{
    classify, connect, connect_with_options, quote_ident, quote_table, VALUE_FORMAT_OPTIONS,
};
use crate::copy_binary::TupleWalker;
use crate::types::{text_to_json, ValueKind};
use std::sync::Arc;
use tidelink_core::{ColumnDefinition, Row, TableColumns, TableId, TidelinkError};
use tokio_postgres::SimpleQueryMessage;

/// A table being backfilled.
pub struct TableReader {
    client: tokio_postgres::Client,
    /// The table.
    pub table: TableId,
    /// Names (shared by every row read) and how values are decoded.
    columns: Vec<(Arc<str>, ValueKind)>,
    /// Indexes of the primary-key columns, in key order.
    key: Vec<usize>,
    /// SQL type of each key column, for literals.
    key_types: Vec<String>,
    /// Type OID of each column, in table order.
    type_oids: Vec<u32>,
    /// Column definitions, as the stream publishes them.
    pub definitions: Arc<TableColumns>,
    /// The planner's row estimate, for progress.
    pub estimated_rows: i64,
}

/// The tables a pipeline's publication covers.
pub async fn published_tables(dsn: &str, publication: &str) -> Result<Vec<TableId>, TidelinkError> {
    let client = connect(dsn, "backfill").await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| classify(&e).context("reading publications"))?;
    if exists.is_none() {
        return Err(TidelinkError::permanent(format!(
            "publication {publication} does not exist yet: start the pipeline once (`tidelink run`), \
             which creates it, or name the tables with --table"
        )));
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(|e| classify(&e).context("reading the publication's tables"))?;
    Ok(rows
        .iter()
        .map(|r| TableId::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

impl TableReader {
    /// Describes the table. Rows are paged by `key_columns` when given (they must be
    /// exactly the columns of a unique index, all NOT NULL), else by the primary key, else
    /// by the replica identity index; a table with none of these is refused.
    pub async fn open(
        dsn: &str,
        table: &TableId,
        key_columns: &[String],
    ) -> Result<Self, TidelinkError> {
        Self::open_with(dsn, table, key_columns, false).await
    }

    /// Describes a table that may have no key at all (REPLICA IDENTITY FULL), to read it
    /// whole in one consistent transaction ([`Self::begin_consistent`]).
    pub async fn open_whole(dsn: &str, table: &TableId) -> Result<Self, TidelinkError> {
        Self::open_with(dsn, table, &[], true).await
    }

    async fn open_with(
        dsn: &str,
        table: &TableId,
        key_columns: &[String],
        keyless_allowed: bool,
    ) -> Result<Self, TidelinkError> {
        let client = connect_with_options(dsn, "backfill", VALUE_FORMAT_OPTIONS).await?;
        let oid: Option<u32> = client
            .query_one(
                "SELECT to_regclass($1)::oid",
                &[&quote_table(&table.schema, &table.name)],
            )
            .await
            .map_err(|e| classify(&e).context(format!("looking up {table}")))?
            .get(0);
        let oid = oid.ok_or_else(|| {
            TidelinkError::permanent(format!("table {table} does not exist in the source"))
        })?;
        let rows = client
            .query(
                "SELECT attname::text, atttypid, format_type(atttypid, NULL) FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(|e| classify(&e).context(format!("reading the columns of {table}")))?;
        let oids: Vec<u32> = rows.iter().map(|r| r.get(1)).collect();
        let mut types = TypeCache::default();
        types.load(&client, &oids).await?;
        let columns: Vec<(Arc<str>, ValueKind)> = rows
            .iter()
            .map(|r| (Arc::from(r.get::<_, &str>(0)), types.classify(r.get(1))))
            .collect();
        let primary_key = if key_columns.is_empty() {
            let mut key = primary_key(&client, oid).await?;
            if key.is_empty() {
                key = crate::catalog::replica_identity_index(&client, oid).await?;
            }
            key
        } else {
            crate::catalog::check_unique_key(&client, oid, table, key_columns).await?;
            key_columns.to_vec()
        };
        if primary_key.is_empty() && !keyless_allowed {
            return Err(TidelinkError::permanent(format!(
                "table {table} has no primary key: a backfill pages through rows by key. Add one, or name the columns of a unique NOT NULL index with --key-columns. \
                 (A running pipeline copies a table without a key by itself, in one consistent read: `snapshot: initial`.)"
            )));
        }
        let key: Vec<usize> = primary_key
            .iter()
            .filter_map(|k| columns.iter().position(|(name, _)| **name == **k))
            .collect();
        let key_types = key.iter().map(|&i| rows[i].get::<_, String>(2)).collect();
        let definitions = column_definitions(&client, oid)
            .await?
            .into_iter()
            .enumerate()
            .map(|(i, (name, sql_type, not_null))| ColumnDefinition {
                name,
                sql_type,
                key: key.contains(&i),
                not_null,
            })
            .collect();
        let estimated_rows: f32 = client
            .query_one(
                "SELECT greatest(reltuples, 0)::float4 FROM pg_class WHERE oid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| classify(&e).context(format!("estimating the size of {table}")))?
            .get(0);
        Ok(Self {
            client,
            table: table.clone(),
            columns,
            key,
            key_types,
            type_oids: oids,
            definitions: Arc::new(TableColumns::new(definitions)),
            estimated_rows: estimated_rows as i64,
        })
    }

    /// The table has no key (no primary key, identity index or `--key-columns`).
    pub fn is_keyless(&self) -> bool {
        self.key.is_empty()
    }

    /// Opens a `REPEATABLE READ` transaction and a cursor over every row of the table,
    /// and returns which transactions its snapshot sees. Rows then come from
    /// [`Self::fetch_consistent`] until it returns none; [`Self::end_consistent`] closes
    /// the transaction. The stream's changes of the transactions the snapshot sees are
    /// already in these rows ([`SnapshotVisibility::sees`]).
    pub async fn begin_consistent(&self) -> Result<SnapshotVisibility, TidelinkError> {
        let columns = self
            .columns
            .iter()
            .map(|(name, _)| quote_ident(name))
            .collect::<Vec<_>>()
            .join(", ");
        let context = |what: &str| format!("{what} of {}", self.table);
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| classify(&e).context(context("starting the consistent read")))?;
        // The snapshot is taken by the first statement; the WAL position read after it
        // lies past every commit the snapshot sees.
        let row = self
            .client
            .query_one(
                "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text",
                &[],
            )
            .await
            .map_err(|e| classify(&e).context(context("reading the snapshot")))?;
        let snapshot: String = row.get(0);
        let lsn: String = row.get(1);
        let visibility = SnapshotVisibility::parse(&snapshot, &lsn).ok_or_else(|| {
            TidelinkError::permanent(format!("unexpected snapshot {snapshot:?} at {lsn:?}"))
        })?;
        self.client
            .batch_execute(&format!(
                "DECLARE tidelink_whole_table NO SCROLL CURSOR FOR SELECT {columns} FROM {}",
                quote_table(&self.table.schema, &self.table.name)
            ))
            .await
            .map_err(|e| classify(&e).context(context("opening the consistent read")))?;
        Ok(visibility)
    }

    /// The next `limit` rows of the consistent read: each row's key (for a table without
    /// a key, the whole row) and image.
    pub async fn fetch_consistent(&self, limit: usize) -> Result<Vec<(Row, Row)>, TidelinkError> {
        let rows = self
            .rows(&format!("FETCH {limit} FROM tidelink_whole_table"))
            .await?;
        Ok(rows
            .into_iter()
            .map(|(key, image, _)| {
                if self.key.is_empty() {
                    (image.clone(), image)
                } else {
                    (key, image)
                }
            })
            .collect())
    }

    /// Every row of the table, in no particular order (one consistent read).
    pub async fn all_rows(&self) -> Result<Vec<Row>, TidelinkError> {
        self.begin_consistent().await?;
        let mut rows = Vec::new();
        loop {
            let chunk = self.fetch_consistent(10_000).await?;
            if chunk.is_empty() {
                break;
            }
            rows.extend(chunk.into_iter().map(|(_, image)| image));
        }
        self.end_consistent().await?;
        Ok(rows)
    }

    /// Ends the consistent read.
    pub async fn end_consistent(&self) -> Result<(), TidelinkError> {
        self.client.batch_execute("COMMIT").await.map_err(|e| {
            classify(&e).context(format!("ending the consistent read of {}", self.table))
        })
    }

    /// Each column's name and type OID, in table order.
    pub fn column_types(&self) -> impl Iterator<Item = (&str, u32)> {
        self.columns
            .iter()
            .zip(&self.type_oids)
            .map(|((name, _), &oid)| (&**name, oid))
    }

    /// The source server's major version.
    pub async fn server_major(&self) -> Result<i32, TidelinkError> {
        server_major(&self.client).await
    }

    /// Whether chunks can be read in binary `COPY` format: every key column is of a type
    /// whose binary form [`crate::copy_binary::key_text`] renders as text.
    pub fn binary_keys_readable(&self) -> bool {
        self.key
            .iter()
            .all(|&i| crate::copy_binary::key_type_readable(self.type_oids[i]))
    }

    fn key_list(&self) -> String {
        self.key
            .iter()
            .map(|&i| quote_ident(&self.columns[i].0))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_literal(&self, key: &[String]) -> String {
        key.iter()
            .zip(&self.key_types)
            .map(|(value, sql_type)| format!("'{}'::{sql_type}", value.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `WHERE` clause for keys after `after` and up to `upto` (empty when both are absent).
    fn key_range(&self, after: Option<&[String]>, upto: Option<&[String]>) -> String {
        let keys = self.key_list();
        let mut conditions = Vec::new();
        if let Some(after) = after {
            conditions.push(format!("({keys}) > ({})", self.key_literal(after)));
        }
        if let Some(upto) = upto {
            conditions.push(format!("({keys}) <= ({})", self.key_literal(upto)));
        }
        if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        }
    }

    /// The largest key (text form) the table holds now, `None` when it is empty. A copy
    /// can stop there: rows inserted later commit after the pipeline's slot exists, so the
    /// stream delivers them.
    pub async fn max_key(&self) -> Result<Option<Vec<String>>, TidelinkError> {
        let descending = self
            .key
            .iter()
            .map(|&i| format!("{} DESC", quote_ident(&self.columns[i].0)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {descending} LIMIT 1",
            self.key_list(),
            quote_table(&self.table.schema, &self.table.name)
        );
        let messages = self.client.simple_query(&sql).await.map_err(|e| {
            classify(&e).context(format!("reading the largest key of {}", self.table))
        })?;
        Ok(messages.into_iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..self.key.len())
                    .map(|i| row.get(i).unwrap_or_default().to_string())
                    .collect(),
            ),
            _ => None,
        }))
    }

    /// Up to `limit` rows after `after` and up to `upto` (key values in text form), in key
    /// order: each row's key, its full image, and its key in text form for the next call.
    pub async fn chunk(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<(Row, Row, Vec<String>)>, TidelinkError> {
        let columns = self
            .columns
            .iter()
            .map(|(name, _)| quote_ident(name))
            .collect::<Vec<_>>()
            .join(", ");
        let keys = self.key_list();
        let filter = self.key_range(after, upto);
        let sql = format!(
            "SELECT {columns} FROM {} {filter} ORDER BY {keys} LIMIT {limit}",
            quote_table(&self.table.schema, &self.table.name)
        );
        self.rows(&sql).await
    }

    /// Starts reading up to `limit` rows after `after` and up to `upto`, in key order, as
    /// `COPY` data in `format` (every column, in table order): the bytes a PostgreSQL
    /// target's `COPY … FROM STDIN` in the same format takes as they are. The data arrives
    /// in pieces of whole rows ([`CopyChunk::next_piece`]), so a writer can start before
    /// the chunk is read. [`CopyFormat::Binary`] needs [`Self::binary_keys_readable`].
    pub async fn copy_chunk(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: usize,
        format: CopyFormat,
    ) -> Result<CopyChunk, TidelinkError> {
        let columns = self
            .column_names()
            .iter()
            .map(|n| quote_ident(n))
            .collect::<Vec<_>>()
            .join(", ");
        let keys = self.key_list();
        let filter = self.key_range(after, upto);
        let sql = format!(
            "COPY (SELECT {columns} FROM {} {filter} ORDER BY {keys} LIMIT {limit}) TO STDOUT{}",
            quote_table(&self.table.schema, &self.table.name),
            format.option()
        );
        let stream = self
            .client
            .copy_out(&sql)
            .await
            .map_err(|e| classify(&e).context(format!("copying a chunk of {}", self.table)))?;
        Ok(CopyChunk {
            stream: Box::pin(stream),
            table: self.table.clone(),
            key: self.key.clone(),
            piece: bytes::BytesMut::new(),
            rows: 0,
            last_row: None,
            binary: (format == CopyFormat::Binary).then(|| BinaryChunk {
                walker: TupleWalker::default(),
                key_oids: self.key.iter().map(|&i| self.type_oids[i]).collect(),
            }),
            ended: false,
        })
    }

    /// Count and md5, computed in the database, of the rows after `after` and up to `upto`
    /// (at most `limit` of them, in key order), each rendered as `ROW(columns)::text`; and
    /// the last row's key in text form. `None` when the range holds no row. Two tables
    /// whose ranges give the same count and digest hold the same rows.
    pub async fn range_digest(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: Option<usize>,
        columns: &[String],
    ) -> Result<Option<(i64, String, Vec<String>)>, TidelinkError> {
        let key_names: Vec<String> = self
            .key
            .iter()
            .map(|&i| quote_ident(&self.columns[i].0))
            .collect();
        let keys = key_names.join(", ");
        let row = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let filter = self.key_range(after, upto);
        let limit = limit.map_or("ALL".to_string(), |l| l.to_string());
        let last_key = key_names
            .iter()
            .map(|k| format!("last.{k}::text"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "WITH c AS (SELECT {keys}, ROW({row})::text AS tidelink_row FROM {} {filter} ORDER BY {keys} LIMIT {limit}) \
             SELECT (SELECT count(*) FROM c), \
                    (SELECT coalesce(md5(string_agg(tidelink_row, E'\\n' ORDER BY {keys})), '') FROM c), \
                    {last_key} \
             FROM (SELECT * FROM c ORDER BY {} LIMIT 1) last",
            quote_table(&self.table.schema, &self.table.name),
            key_names
                .iter()
                .map(|k| format!("{k} DESC"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let row =
            self.client.query_opt(&sql, &[]).await.map_err(|e| {
                classify(&e).context(format!("checksumming a range of {}", self.table))
            })?;
        Ok(row.map(|r| {
            let last = (0..key_names.len())
                .map(|i| r.get::<_, String>(i + 2))
                .collect();
            (r.get(0), r.get(1), last)
        }))
    }

    /// Column names in table order.
    pub fn column_names(&self) -> Vec<String> {
        self.columns
            .iter()
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// The rows with these keys (JSON values, as images carry them), for comparisons.
    pub async fn rows_for(
        &self,
        keys: &[Row],
    ) -> Result<Vec<(Row, Row, Vec<String>)>, TidelinkError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&Arc<str>> = self.key.iter().map(|&i| &self.columns[i].0).collect();
        let list = keys
            .iter()
            .map(|key| {
                let texts: Vec<String> = names
                    .iter()
                    .map(|n| match key.get(n) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    })
                    .collect();
                format!("({})", self.key_literal(&texts))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let columns = self
            .columns
            .iter()
            .map(|(name, _)| quote_ident(name))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns} FROM {} WHERE ({}) IN ({list})",
            quote_table(&self.table.schema, &self.table.name),
            self.key_list()
        );
        self.rows(&sql).await
    }

    async fn rows(&self, sql: &str) -> Result<Vec<(Row, Row, Vec<String>)>, TidelinkError> {
        let messages = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| classify(&e).context(format!("reading {}", self.table)))?;
        let mut out = Vec::new();
        for message in messages {
            if let SimpleQueryMessage::Row(row) = message {
                let mut image = Row::with_capacity(self.columns.len());
                for (i, (name, kind)) in self.columns.iter().enumerate() {
                    let value = row
                        .get(i)
                        .map(|text| text_to_json(text, kind))
                        .unwrap_or(serde_json::Value::Null);
                    image.insert(name.clone(), value);
                }
                let mut key = Row::with_capacity(self.key.len());
                let mut key_text = Vec::with_capacity(self.key.len());
                for &i in &self.key {
                    let name = &self.columns[i].0;
                    key.insert(name.clone(), image[name].clone());
                    key_text.push(row.get(i).unwrap_or_default().to_string());
                }
                out.push((key, image, key_text));
            }
        }
        Ok(out)
    }

    /// Which of these keys (text form) still exist.
    pub async fn existing(&self, keys: &[Vec<String>]) -> Result<Vec<bool>, TidelinkError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let list = keys
            .iter()
            .map(|k| format!("({})", self.key_literal(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {} FROM {} WHERE ({}) IN ({list})",
            // Rendered by the output functions, exactly as `chunk` renders them (a `::text`
            // cast would trim char(n) padding and make present keys look deleted).
            self.key_list(),
            quote_table(&self.table.schema, &self.table.name),
            self.key_list()
        );
        let messages =
            self.client.simple_query(&sql).await.map_err(|e| {
                classify(&e).context(format!("re-checking a chunk of {}", self.table))
            })?;
        let mut found = std::collections::HashSet::new();
        for message in messages {
            if let SimpleQueryMessage::Row(row) = message {
                let key: Vec<String> = (0..self.key.len())
                    .map(|i| row.get(i).unwrap_or_default().to_string())
                    .collect();
                found.insert(key);
            }
        }
        Ok(keys.iter().map(|k| found.contains(k)).collect())
    }
}

/// How much `COPY` data a piece holds (whole rows, so a little more).
const COPY_PIECE_BYTES: usize = 256 * 1024;

/// The `COPY` format a direct backfill moves rows in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    /// Text: any target column type that accepts the text takes it.
    Text,
    /// Binary ([`crate::copy_binary`]): no output or input functions on either side, for
    /// columns of the same common built-in types on servers of the same major version.
    Binary,
}

impl CopyFormat {
    /// The option that asks `COPY` for this format.
    pub(crate) fn option(self) -> &'static str {
        match self {
            Self::Text => "",
            Self::Binary => " (FORMAT binary)",
        }
    }
}

/// The server's major version.
pub(crate) async fn server_major(client: &tokio_postgres::Client) -> Result<i32, TidelinkError> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| classify(&e).context("reading the server's version"))?
        .get(0);
    Ok(version / 10_000)
}

/// What a chunk read in binary format tracks: its tuples, and how to read its key.
struct BinaryChunk {
    walker: TupleWalker,
    key_oids: Vec<u32>,
}

/// A chunk of `COPY` data being read from the source ([`TableReader::copy_chunk`]).
pub struct CopyChunk {
    stream: std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    table: TableId,
    key: Vec<usize>,
    piece: bytes::BytesMut,
    /// Rows read so far (text format).
    rows: usize,
    /// PostgreSQL sends one row per `CopyData` message: the last one read (text format).
    last_row: Option<bytes::Bytes>,
    /// Set when the chunk is read in binary format.
    binary: Option<BinaryChunk>,
    /// The stream has ended (it must not be polled again).
    ended: bool,
}

impl CopyChunk {
    /// The next piece of whole rows (about [`COPY_PIECE_BYTES`]), or `None` once the chunk
    /// is read.
    pub async fn next_piece(&mut self) -> Result<Option<bytes::Bytes>, TidelinkError> {
        use futures::StreamExt;
        while !self.ended {
            let Some(part) = self.stream.next().await else {
                self.ended = true;
                break;
            };
            let part = part
                .map_err(|e| classify(&e).context(format!("copying a chunk of {}", self.table)))?;
            if self.piece.is_empty() {
                self.piece.reserve(COPY_PIECE_BYTES + part.len());
            }
            self.piece.extend_from_slice(&part);
            match &mut self.binary {
                None => {
                    self.rows += part.iter().filter(|&&b| b == b'\n').count();
                    self.last_row = Some(part);
                }
                Some(binary) => binary.walker.read(&part).map_err(|e| {
                    TidelinkError::permanent(format!("copying a chunk of {}: {e}", self.table))
                })?,
            }
            if self.piece.len() >= COPY_PIECE_BYTES {
                return Ok(Some(self.piece.split().freeze()));
            }
        }
        if let Some(binary) = &self.binary {
            if !binary.walker.complete() {
                return Err(TidelinkError::permanent(format!(
                    "copying a chunk of {}: the binary COPY stream ended without its trailer",
                    self.table
                )));
            }
        }
        Ok((!self.piece.is_empty()).then(|| self.piece.split().freeze()))
    }

    /// Rows read so far.
    pub fn rows(&self) -> usize {
        match &self.binary {
            None => self.rows,
            Some(binary) => binary.walker.tuples(),
        }
    }

    /// The key of the last row read, in text form: where the next chunk starts.
    pub fn last_key(&self) -> Result<Option<Vec<String>>, TidelinkError> {
        match &self.binary {
            None => Ok(self.last_text_key()),
            Some(binary) => {
                let Some(fields) = binary.walker.last_fields() else {
                    return Ok(None);
                };
                let read = |(&i, &oid): (&usize, &u32)| match fields.get(i).copied().flatten() {
                    Some(value) => crate::copy_binary::key_text(oid, value),
                    None => Err(format!("key column {} is NULL", i + 1)),
                };
                let key: Result<Vec<String>, String> =
                    self.key.iter().zip(&binary.key_oids).map(read).collect();
                key.map(Some).map_err(|e| {
                    TidelinkError::permanent(format!(
                        "reading the last key of a chunk of {}: {e}",
                        self.table
                    ))
                })
            }
        }
    }

    fn last_text_key(&self) -> Option<Vec<String>> {
        let row = self.last_row.as_ref()?;
        let line = row[..row.len().saturating_sub(1)]
            .rsplit(|&b| b == b'\n')
            .next()
            .filter(|line| !line.is_empty())?;
        let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
        Some(
            self.key
                .iter()
                .map(|&i| copy_unescape(fields.get(i).copied().unwrap_or_default()))
                .collect(),
        )
    }
}

/// One field of `COPY` text format back to its text (backslash escapes undone).
fn copy_unescape(field: &[u8]) -> String {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 1 < field.len() {
            i += 1;
            let c = field[i];
            match c {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'v' => out.push(11),
                b'0'..=b'7' => {
                    let mut value = 0u32;
                    let mut n = 0;
                    while n < 3 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                        value = value * 8 + u32::from(field[i] - b'0');
                        i += 1;
                        n += 1;
                    }
                    out.push(value as u8);
                    continue;
                }
                other => out.push(other),
            }
            i += 1;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod copy_tests {
    use super::copy_unescape;

    #[test]
    fn copy_fields_unescape() {
        assert_eq!(copy_unescape(b"a\\tb\\\\c\\n"), "a\tb\\c\n");
        assert_eq!(copy_unescape(b"\\101x"), "Ax");
        assert_eq!(copy_unescape(b"plain"), "plain");
    }
}

/// Which transactions a snapshot sees (`pg_current_snapshot()`), and a WAL position past
/// the commit of every one of them. A streamed transaction that committed before `upto`
/// and that the snapshot sees is already in rows read with the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotVisibility {
    /// Every transaction id below this had finished.
    pub xmin: u64,
    /// No transaction id from this on had finished.
    pub xmax: u64,
    /// Transactions between the two that were still running.
    pub running: Vec<u64>,
    /// WAL position (LSN) read after the snapshot was taken.
    pub upto: u64,
}

impl SnapshotVisibility {
    /// From `pg_current_snapshot()`'s text (`xmin:xmax:xip,…`) and an LSN's (`X/Y`).
    pub fn parse(snapshot: &str, lsn: &str) -> Option<Self> {
        let mut parts = snapshot.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        let (high, low) = lsn.split_once('/')?;
        let upto =
            (u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?;
        Some(Self {
            xmin,
            xmax,
            running,
            upto,
        })
    }

    /// Whether the snapshot sees the transaction `xid` (32 bits, as the stream names it)
    /// that committed at `commit_lsn`.
    pub fn sees(&self, xid: u32, commit_lsn: u64) -> bool {
        if commit_lsn >= self.upto {
            return false;
        }
        // Widen the 32-bit id to the 64-bit one nearest xmax: ids in use lie within 2^31
        // of it.
        let epoch = self.xmax >> 32;
        let mut full = (epoch << 32) | u64::from(xid);
        if full > self.xmax + (1 << 31) && epoch > 0 {
            full -= 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.running.contains(&full))
    }
}

#[cfg(test)]
mod visibility_tests {
    use super::SnapshotVisibility;

    #[test]
    fn sees_what_finished_before_the_snapshot() {
        let v = SnapshotVisibility::parse("100:105:101,103", "0/16B3748").expect("parses");
        assert_eq!(v.upto, 0x16B3748);
        assert!(v.sees(99, 10));
        assert!(v.sees(100, 10));
        assert!(!v.sees(101, 10), "running then");
        assert!(v.sees(102, 10));
        assert!(!v.sees(105, 10), "started after");
        assert!(!v.sees(99, 0x16B3748), "committed after the position");
        let empty = SnapshotVisibility::parse("7:7:", "1/0").expect("parses");
        assert!(empty.running.is_empty());
        assert_eq!(empty.upto, 1 << 32);
        // Ids wrap at 2^32: xmax of epoch 1.
        let wrapped = SnapshotVisibility::parse("4294967290:4294967300:", "0/10").expect("parses");
        assert!(wrapped.sees(4_294_967_295, 1));
        assert!(wrapped.sees(2, 1), "epoch 1, below xmax");
        assert!(!wrapped.sees(5, 1), "epoch 1, at xmax");
    }
}
