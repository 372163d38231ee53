//! The MySQL/MariaDB source: registers as a replica, tails the row binlog, and turns row
//! events into change events keyed by primary key.
//!
//! # Positions
//! After each committed transaction (an XID, a `COMMIT` query, or a standalone DDL) the
//! source emits a checkpoint. Checkpoints are sequence numbers standing for binlog
//! positions the source keeps; when the runtime confirms one (Kafka acknowledged every
//! change before it), the matching [`BinlogPosition`] is published on the
//! [`MysqlSource::confirmed`] channel for the runtime to store durably. A restart resumes
//! from the stored position: on MariaDB by GTID state when known, otherwise by file and
//! position.
//!
//! # Column names
//! Row events carry columns by position. Names, signedness, character sets, ENUM/SET
//! labels and keys come from `information_schema`, cached per table and dropped whenever
//! a DDL statement passes in the binlog, so rows after an `ALTER TABLE` are read with the
//! new definition.

mod position;
mod preflight;

pub use position::{BinlogCheckpoint, BinlogPosition, GtidState};
pub use preflight::{preflight, PreflightReport};

use crate::connection::{classify, connect, describe, parse_dsn};
use crate::schema::{load_table, ColumnInfo, TableSchema};
use crate::values::binlog_to_json;
use futures::StreamExt;
use mysql_async::binlog::events::{EventData, OptionalMetadataField, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::EventType;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn};
use position::{clean_file_name, decode_mariadb_gtid, mariadb_event, MariadbGtid};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tidelink_core::{
    ChangeEvent, Op, Row, Source, SourceInfo, SourceMessage, TableId, TidelinkError,
};
use tokio::sync::watch;

/// Options of a MySQL/MariaDB source.
#[derive(Debug, Clone)]
pub struct MysqlSourceSettings {
    /// Pipeline name (the envelope's `source.name`).
    pub pipeline: String,
    /// Connection URL.
    pub dsn: String,
    /// `database.table` patterns to capture.
    pub tables: Vec<String>,
    /// Replica server id to register with.
    pub server_id: u32,
    /// Heartbeat period asked of the server.
    pub heartbeat: Duration,
}

/// What starting found.
#[derive(Debug)]
pub struct StartReport {
    /// Captured tables existing now.
    pub tables: Vec<TableSchema>,
    /// No stored position: streaming starts at the server's current position.
    pub fresh: bool,
    /// Where streaming starts.
    pub position: BinlogPosition,
}

struct Transaction {
    gtid: Option<Arc<str>>,
    mariadb_gtid: Option<MariadbGtid>,
    standalone: bool,
}

/// A running binlog source.
pub struct MysqlSource {
    settings: MysqlSourceSettings,
    stream: BinlogStream,
    meta: Conn,
    mariadb: bool,
    /// The binlog file being read (shared with the changes' `source` blocks).
    file: Arc<str>,
    /// The parts of every change's `source` block that never change (version, connector,
    /// pipeline name, snapshot flag), built once.
    source_block: SourceInfo,
    table_maps: HashMap<u64, TableMapEvent<'static>>,
    schemas: HashMap<TableId, Arc<TableSchema>>,
    ready: VecDeque<SourceMessage<BinlogCheckpoint>>,
    tx: Option<Transaction>,
    gtid_state: GtidState,
    next_checkpoint: u64,
    unconfirmed: VecDeque<(BinlogCheckpoint, BinlogPosition)>,
    confirmed: watch::Sender<Option<BinlogPosition>>,
    /// The `server_id` of the server streamed from (see `SourceInfo::binlog_server_id`).
    binlog_server_id: u32,
    /// Tables copied whole with a consistent snapshot: the server and binlog place
    /// (file number, position) it matched. Rows events of such a table before that place
    /// are in the copy already and are not emitted.
    snapshotted: HashMap<TableId, (u32, [u64; 2])>,
}

impl MysqlSource {
    /// Checks the server, then starts streaming at `resume` (a position stored by an
    /// earlier run) or, without one, at the server's current position.
    pub async fn start(
        settings: MysqlSourceSettings,
        resume: Option<BinlogPosition>,
    ) -> Result<(Self, StartReport), TidelinkError> {
        let mut meta = connect(&settings.dsn, "source").await?;
        let report = preflight(&mut meta, &settings.tables, settings.server_id).await?;
        let fresh = resume.is_none();
        let position = resume.unwrap_or_else(|| BinlogPosition {
            file: report.current_file.clone(),
            pos: report.current_pos,
            gtid: report.current_gtid.clone().filter(|g| !g.is_empty()),
        });
        let gtid_state = match &position.gtid {
            Some(g) if report.mariadb => GtidState::parse(g).map_err(TidelinkError::permanent)?,
            _ => GtidState::default(),
        };
        let stream = open_stream(&settings, &position, report.mariadb, fresh).await?;
        tracing::info!(pipeline = %settings.pipeline, %position, fresh, server_id = settings.server_id,
            "streaming the binlog");
        let schemas = report
            .tables
            .iter()
            .map(|t| (t.table.clone(), Arc::new(t.clone())))
            .collect();
        let source = Self {
            file: Arc::from(position.file.as_str()),
            source_block: SourceInfo {
                version: Arc::from(env!("CARGO_PKG_VERSION")),
                connector: Arc::from("mysql"),
                name: Arc::from(settings.pipeline.as_str()),
                snapshot: Arc::from("false"),
                ..Default::default()
            },
            settings,
            stream,
            meta,
            mariadb: report.mariadb,
            table_maps: HashMap::new(),
            schemas,
            ready: VecDeque::new(),
            tx: None,
            gtid_state,
            next_checkpoint: 0,
            unconfirmed: VecDeque::new(),
            confirmed: watch::channel(None).0,
            binlog_server_id: report.server_id,
            snapshotted: HashMap::new(),
        };
        Ok((
            source,
            StartReport {
                tables: report.tables,
                fresh,
                position,
            },
        ))
    }

    /// Leaves out the rows events of `table` written before `file`:`pos` of the binlog of
    /// server `server_id`: a consistent snapshot matching that place holds them (a table
    /// without a key, copied whole).
    pub fn skip_seen_by(&mut self, table: TableId, server_id: u32, file: &str, pos: u64) {
        if let Some(number) = binlog_file_number(file) {
            self.snapshotted.insert(table, (server_id, [number, pos]));
        }
    }

    /// The `server_id` of the server streamed from.
    pub fn binlog_server_id(&self) -> u32 {
        self.binlog_server_id
    }

    /// The last position whose changes Kafka acknowledged; store it to resume there.
    pub fn confirmed(&self) -> watch::Receiver<Option<BinlogPosition>> {
        self.confirmed.subscribe()
    }

    /// Closes the stream.
    pub async fn shutdown(self) {
        let _ = self.stream.close().await;
        let _ = self.meta.disconnect().await;
    }

    fn checkpoint(&mut self, pos: u64) {
        let position = BinlogPosition {
            file: self.file.to_string(),
            pos,
            gtid: (self.mariadb && !self.gtid_state.is_empty())
                .then(|| self.gtid_state.to_string()),
        };
        self.next_checkpoint += 1;
        let token = BinlogCheckpoint(self.next_checkpoint);
        self.unconfirmed.push_back((token, position));
        self.ready.push_back(SourceMessage::Checkpoint(token));
    }

    fn commit(&mut self, end_pos: u64) {
        if let Some(tx) = self.tx.take() {
            if let Some(gtid) = &tx.mariadb_gtid {
                self.gtid_state.record(gtid);
            }
        }
        self.checkpoint(end_pos);
    }

    /// After a statement that commits by itself (DDL, TRUNCATE): a checkpoint, unless it
    /// belongs to a MariaDB transaction that ends with its own COMMIT.
    fn commit_if_standalone(&mut self, end_pos: u64) {
        let standalone = self
            .tx
            .as_ref()
            .is_none_or(|t| t.standalone || t.mariadb_gtid.is_none());
        if standalone {
            self.commit(end_pos);
        }
    }

    /// Whether the consistent snapshot of `table` was taken after the binlog place
    /// `header_pos` of the current file, so the event there is in the copy already.
    fn covered_by_snapshot(&self, table: &TableId, header_pos: u64) -> bool {
        self.snapshotted.get(table).is_some_and(|(server, place)| {
            let here = binlog_file_number(&self.file).map(|n| [n, header_pos]);
            *server == self.binlog_server_id && here.is_some_and(|here| here < *place)
        })
    }

    async fn schema(
        &mut self,
        table: &TableId,
        columns: usize,
        binlog_names: Option<&[String]>,
    ) -> Result<Option<Arc<TableSchema>>, TidelinkError> {
        let matches = |schema: &TableSchema| {
            schema.columns.len() == columns
                && binlog_names.is_none_or(|names| {
                    names
                        .iter()
                        .zip(&schema.columns)
                        .all(|(n, c)| **n == *c.name)
                })
        };
        if let Some(schema) = self.schemas.get(table) {
            if matches(schema) {
                return Ok(Some(schema.clone()));
            }
        }
        let Some(mut schema) = load_table(&mut self.meta, table).await? else {
            return Err(TidelinkError::permanent(format!(
                "{table}: the binlog has rows for a table that no longer exists; its definition is unknown"
            )));
        };
        if let (Some(names), false) = (binlog_names, matches(&schema)) {
            // The server sends column names (binlog_row_metadata=FULL): read the rows by
            // them, exactly as they were written before a later ALTER.
            let mut by_name = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let column = match schema.columns.iter().find(|c| *c.name == **name) {
                    Some(column) => column.clone(),
                    // Renamed since (same place, and the name there now is not in these
                    // rows): read as the column now in its place, under the name the rows
                    // were written with; sinks follow the rename.
                    None if names.len() == schema.columns.len()
                        && !names.iter().any(|n| **n == *schema.columns[i].name) =>
                    {
                        ColumnInfo {
                            name: Arc::from(name.as_str()),
                            ..schema.columns[i].clone()
                        }
                    }
                    // Dropped since: its values have no place in the table any more and
                    // are left out of the rows (targets drop the column too).
                    None => {
                        tracing::debug!(%table, column = %name, "rows carry a column the table no longer has; its values are left out");
                        ColumnInfo {
                            name: Arc::from(name.as_str()),
                            data_type: String::new(),
                            key: false,
                            not_null: false,
                            ..schema.columns[0].clone()
                        }
                    }
                };
                by_name.push(column);
            }
            let key_names: Vec<Arc<str>> = schema
                .key
                .iter()
                .map(|&k| schema.columns[k].name.clone())
                .collect();
            schema.key = key_names
                .iter()
                .filter_map(|k| by_name.iter().position(|c| &c.name == k))
                .collect();
            schema.columns = by_name;
        } else if schema.columns.len() != columns {
            // The table changed again after these rows were written (we are behind).
            // Columns added at the end are the common case: read the first ones.
            if columns < schema.columns.len() {
                tracing::warn!(%table, binlog_columns = columns, current_columns = schema.columns.len(),
                    "rows were written before a later ALTER TABLE; reading them with the first columns of the current definition");
                schema.columns.truncate(columns);
                schema.key.retain(|&k| k < columns);
            } else {
                return Err(TidelinkError::permanent(format!(
                    "{table}: the binlog rows have {columns} columns but the table now has {}; its definition at that point is unknown (start the server with binlog_row_metadata=FULL)",
                    schema.columns.len()
                )));
            }
        }
        let schema = Arc::new(schema);
        self.schemas.insert(table.clone(), schema.clone());
        Ok(Some(schema))
    }

    async fn rows(
        &mut self,
        rows: &RowsEventData<'_>,
        header_pos: u64,
        ts_ms: i64,
        server_id: u32,
    ) -> Result<(), TidelinkError> {
        let Some(tme) = self.table_maps.get(&rows.table_id()) else {
            return Err(TidelinkError::permanent(format!(
                "rows event for unknown table id {} at {}:{header_pos}",
                rows.table_id(),
                self.file
            )));
        };
        let table = TableId::new(
            tme.database_name().to_string(),
            tme.table_name().to_string(),
        );
        if !tidelink_config::matches_any(&self.settings.tables, &table.schema, &table.name) {
            return Ok(());
        }
        if self.covered_by_snapshot(&table, header_pos) {
            return Ok(());
        }
        let tme = tme.clone();
        let columns = tme.columns_count() as usize;
        let binlog_names: Option<Vec<String>> =
            tme.iter_optional_meta().find_map(|field| match field {
                Ok(OptionalMetadataField::ColumnName(names)) => Some(
                    names
                        .iter_names()
                        .filter_map(Result::ok)
                        .map(|n| n.name().to_string())
                        .collect(),
                ),
                _ => None,
            });
        let Some(schema) = self
            .schema(&table, columns, binlog_names.as_deref())
            .await?
        else {
            return Ok(());
        };
        // The id kept with the table's schema: its names are shared by all its changes.
        let table = self
            .schemas
            .get_key_value(&table)
            .map_or(table, |(known, _)| known.clone());
        // The `source` block shared by the rows of this event; each row sets its index.
        let source = SourceInfo {
            ts_ms,
            db: table.schema.clone(),
            schema: table.schema.clone(),
            table: table.name.clone(),
            file: Some(self.file.clone()),
            pos: Some(header_pos),
            gtid: self.tx.as_ref().and_then(|t| t.gtid.clone()),
            server_id: Some(server_id),
            binlog_server_id: Some(self.binlog_server_id),
            ..self.source_block.clone()
        };
        // Numbers the events of this rows event (a key change makes two of one row), so
        // (file, position, seq) orders every event of the binlog.
        let mut seq = 0u64;
        for (index, row) in rows.rows(&tme).enumerate() {
            let (before, after) = row.map_err(|e| {
                TidelinkError::permanent(format!(
                    "cannot decode a row of {table} at {}:{header_pos}: {e}",
                    self.file
                ))
            })?;
            let before = before.map(|r| image(&r, &schema)).transpose()?;
            let after = after.map(|r| image(&r, &schema)).transpose()?;
            let source = SourceInfo {
                row: Some(index as u32),
                ..source.clone()
            };
            let mut event = |op: Op, key: Row, before: Option<Row>, after: Option<Row>| {
                seq += 1;
                SourceMessage::Change(ChangeEvent {
                    table: table.clone(),
                    op,
                    key,
                    before,
                    after,
                    source: SourceInfo {
                        seq: Some(seq - 1),
                        ..source.clone()
                    },
                    columns: Some(schema.definitions.clone()),
                })
            };
            match (before, after) {
                (None, Some(after)) => {
                    let key = key_of(&after, &schema);
                    self.ready
                        .push_back(event(Op::Create, key, None, Some(after)));
                }
                (Some(before), None) => {
                    let key = key_of(&before, &schema);
                    self.ready
                        .push_back(event(Op::Delete, key, Some(before), None));
                }
                (Some(before), Some(after)) => {
                    let old_key = key_of(&before, &schema);
                    let new_key = key_of(&after, &schema);
                    if old_key == new_key {
                        self.ready
                            .push_back(event(Op::Update, new_key, Some(before), Some(after)));
                    } else {
                        // A key change moves the row to another Kafka key: delete the old
                        // one, create the new one (each ordered in its own partition).
                        self.ready
                            .push_back(event(Op::Delete, old_key, Some(before), None));
                        self.ready
                            .push_back(event(Op::Create, new_key, None, Some(after)));
                    }
                }
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// Emits the truncate of a captured table (a `TRUNCATE TABLE` query event at
    /// `header_pos`), unless a consistent snapshot taken after it already holds the table.
    async fn truncate(
        &mut self,
        table: TableId,
        header_pos: u64,
        ts_ms: i64,
        server_id: u32,
    ) -> Result<(), TidelinkError> {
        if !tidelink_config::matches_any(&self.settings.tables, &table.schema, &table.name) {
            return Ok(());
        }
        if self.covered_by_snapshot(&table, header_pos) {
            return Ok(());
        }
        // The definitions tell the publisher whether the table has a key (a keyed
        // table's truncate is a barrier across its partitions). A table dropped since has
        // none to read; its truncate still goes out, to every partition.
        let columns = match self.schemas.get(&table) {
            Some(schema) => Some(schema.definitions.clone()),
            None => load_table(&mut self.meta, &table).await?.map(|schema| {
                let schema = Arc::new(schema);
                self.schemas.insert(table.clone(), schema.clone());
                schema.definitions.clone()
            }),
        };
        let table = self
            .schemas
            .get_key_value(&table)
            .map_or(table, |(known, _)| known.clone());
        tracing::info!(pipeline = %self.settings.pipeline, %table, "TRUNCATE in the binlog");
        self.ready.push_back(SourceMessage::Change(ChangeEvent {
            op: Op::Truncate,
            key: Row::new(),
            before: None,
            after: None,
            source: SourceInfo {
                ts_ms,
                db: table.schema.clone(),
                schema: table.schema.clone(),
                table: table.name.clone(),
                file: Some(self.file.clone()),
                pos: Some(header_pos),
                gtid: self.tx.as_ref().and_then(|t| t.gtid.clone()),
                server_id: Some(server_id),
                binlog_server_id: Some(self.binlog_server_id),
                seq: Some(0),
                ..self.source_block.clone()
            },
            columns,
            table,
        }));
        Ok(())
    }

    async fn handle(
        &mut self,
        event: mysql_async::binlog::events::Event,
    ) -> Result<(), TidelinkError> {
        let header = event.header();
        let raw_type = header.event_type_raw();
        let end_pos = u64::from(header.log_pos());
        let start_pos = end_pos.saturating_sub(u64::from(header.event_size()));
        let ts_ms = i64::from(header.timestamp()) * 1000;
        if raw_type == mariadb_event::GTID {
            let gtid = decode_mariadb_gtid(event.data(), header.server_id()).ok_or_else(|| {
                TidelinkError::permanent(format!(
                    "malformed MariaDB GTID event at {}:{start_pos}",
                    self.file
                ))
            })?;
            self.tx = Some(Transaction {
                gtid: Some(Arc::from(gtid.to_string())),
                mariadb_gtid: Some(gtid),
                standalone: gtid.standalone,
            });
            return Ok(());
        }
        if raw_type == mariadb_event::QUERY_COMPRESSED
            || mariadb_event::ROWS_COMPRESSED.contains(&raw_type)
        {
            return Err(TidelinkError::permanent(format!(
                "compressed binlog event (type {raw_type:#x}) at {}:{start_pos}: set log_bin_compress=OFF on the source",
                self.file
            )));
        }
        if matches!(
            raw_type,
            mariadb_event::ANNOTATE_ROWS
                | mariadb_event::BINLOG_CHECKPOINT
                | mariadb_event::GTID_LIST
        ) {
            // Bookkeeping only: the GTID state is tracked from the GTID events themselves.
            return Ok(());
        }
        if raw_type == EventType::HEARTBEAT_EVENT as u8 {
            // An idle stream: the server is at `end_pos`, and nothing is open.
            if self.tx.is_none() && end_pos > 0 {
                self.checkpoint(end_pos);
            }
            return Ok(());
        }
        let data = event.read_data().map_err(|e| {
            TidelinkError::permanent(format!(
                "cannot decode binlog event at {}:{start_pos}: {e}",
                self.file
            ))
        })?;
        match data {
            Some(EventData::RotateEvent(rotate)) => {
                self.file = Arc::from(clean_file_name(&rotate.name()));
            }
            Some(EventData::GtidEvent(gtid)) => {
                let sid = gtid.sid();
                let uuid = format!(
                    "{}-{}-{}-{}-{}",
                    hex(&sid[0..4]),
                    hex(&sid[4..6]),
                    hex(&sid[6..8]),
                    hex(&sid[8..10]),
                    hex(&sid[10..16])
                );
                self.tx = Some(Transaction {
                    gtid: Some(Arc::from(format!("{uuid}:{}", gtid.gno()))),
                    mariadb_gtid: None,
                    standalone: false,
                });
            }
            Some(EventData::QueryEvent(query)) => {
                let sql = query.query();
                let statement = sql.trim_start().to_ascii_uppercase();
                if statement.starts_with("BEGIN") || statement.starts_with("XA START") {
                    if self.tx.is_none() {
                        self.tx = Some(Transaction {
                            gtid: None,
                            mariadb_gtid: None,
                            standalone: false,
                        });
                    }
                } else if statement.starts_with("COMMIT") || statement.starts_with("XA COMMIT") {
                    self.commit(end_pos);
                } else if statement.starts_with("ROLLBACK") || statement.starts_with("SAVEPOINT") {
                    // Non-transactional changes before a rollback are in the binlog already.
                } else if let Some(table) = truncated_table(&sql, &query.schema()) {
                    // Definitions stay as they are; the table's rows are gone.
                    self.truncate(table, start_pos, ts_ms, header.server_id())
                        .await?;
                    self.commit_if_standalone(end_pos);
                } else {
                    // DDL: table definitions may have changed.
                    tracing::info!(pipeline = %self.settings.pipeline, schema = %query.schema(), statement = %sql.chars().take(200).collect::<String>(), "DDL in the binlog; table definitions reloaded on next use");
                    self.schemas.clear();
                    self.commit_if_standalone(end_pos);
                }
            }
            Some(EventData::XidEvent(_)) => self.commit(end_pos),
            Some(EventData::TableMapEvent(tme)) => {
                self.table_maps.insert(tme.table_id(), tme.into_owned());
            }
            Some(EventData::RowsEvent(rows)) => {
                self.rows(&rows, start_pos, ts_ms, header.server_id())
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The server's current binlog file and position, for `tidelink status`.
pub async fn current_position(dsn: &str) -> Result<String, TidelinkError> {
    let mut conn = connect(dsn, "status").await?;
    let row: Option<mysql_async::Row> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(|e| classify(&e).context("SHOW MASTER STATUS"))?;
    let mut row = row.ok_or_else(|| TidelinkError::permanent("binary logging is off"))?;
    let file: Option<String> = row.take::<Option<String>, _>(0).flatten();
    let pos: Option<u64> = row.take::<Option<u64>, _>(1).flatten();
    Ok(format!("{}:{}", file.unwrap_or_default(), pos.unwrap_or(0)))
}

/// The table a `TRUNCATE [TABLE] [db.]name` statement empties; unqualified names are in
/// `default_schema`, the statement's current database. `None` for any other statement.
fn truncated_table(sql: &str, default_schema: &str) -> Option<TableId> {
    let mut rest = skip_comments(sql);
    rest = strip_keyword(rest, "TRUNCATE")?;
    rest = skip_comments(rest);
    if let Some(after) = strip_keyword(rest, "TABLE") {
        rest = skip_comments(after);
    }
    let (first, after) = identifier(rest)?;
    let after = skip_comments(after);
    let (schema, name, after) = match after.strip_prefix('.') {
        Some(after) => {
            let (name, after) = identifier(skip_comments(after))?;
            (first, name, after)
        }
        None => (default_schema.to_string(), first, after),
    };
    let after = skip_comments(after);
    // One table only: MariaDB has no multi-table TRUNCATE; anything more is not ours.
    (after.is_empty() || after == ";").then(|| TableId::new(schema, name))
}

/// `text` after leading whitespace and `/* … */` or `-- …`/`# …` comments.
fn skip_comments(mut text: &str) -> &str {
    loop {
        text = text.trim_start();
        if let Some(after) = text.strip_prefix("/*") {
            text = after.find("*/").map_or("", |end| &after[end + 2..]);
        } else if text.starts_with("-- ") || text.starts_with('#') {
            text = text.find('\n').map_or("", |end| &text[end + 1..]);
        } else {
            return text;
        }
    }
}

/// `text` after the keyword `word` (any case) followed by a non-identifier character.
fn strip_keyword<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let head = text.get(..word.len())?;
    let rest = &text[word.len()..];
    let boundary = rest
        .chars()
        .next()
        .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '$'));
    (head.eq_ignore_ascii_case(word) && boundary).then_some(rest)
}

/// A bare or backquoted identifier at the start of `text`, and what follows it.
fn identifier(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('`') {
        let mut name = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '`' {
                if quoted[i + 1..].starts_with('`') {
                    name.push('`');
                    chars.next();
                } else {
                    return Some((name, &quoted[i + 1..]));
                }
            } else {
                name.push(c);
            }
        }
        None
    } else {
        let end = text
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(text.len());
        (end > 0).then(|| (text[..end].to_string(), &text[end..]))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn image(row: &BinlogRow, schema: &TableSchema) -> Result<Row, TidelinkError> {
    let mut out = Row::with_capacity(schema.columns.len());
    for (i, column) in schema.columns.iter().enumerate() {
        if column.data_type.is_empty() {
            continue; // a column dropped since the row was written
        }
        let value = binlog_to_json(row.as_ref(i), column)
            .map_err(|e| TidelinkError::permanent(format!("{}: {e}", schema.table)))?;
        out.insert(column.name.clone(), value);
    }
    Ok(out)
}

/// `binlog.000042` → 42.
fn binlog_file_number(file: &str) -> Option<u64> {
    file.rsplit_once('.')?.1.parse().ok()
}

/// The row's key: its primary-key columns, or for a table without one the whole row (the
/// binlog carries full images, `binlog_row_image=FULL`).
fn key_of(row: &Row, schema: &TableSchema) -> Row {
    if schema.key.is_empty() {
        return row.clone();
    }
    schema
        .key
        .iter()
        .map(|&i| {
            let name = &schema.columns[i].name;
            (name.clone(), row[name].clone())
        })
        .collect()
}

async fn open_stream(
    settings: &MysqlSourceSettings,
    position: &BinlogPosition,
    mariadb: bool,
    fresh: bool,
) -> Result<BinlogStream, TidelinkError> {
    let mut conn = Conn::new(parse_dsn(&settings.dsn)?)
        .await
        .map_err(|e| classify(&e).context("source: opening the replication connection"))?;
    let heartbeat_ns = settings.heartbeat.as_nanos().max(1_000_000);
    let mut setup = vec![format!("SET @master_heartbeat_period = {heartbeat_ns}")];
    let by_gtid = mariadb && !fresh && position.gtid.is_some();
    if mariadb {
        // Native GTID events instead of BEGIN queries.
        setup.push("SET @mariadb_slave_capability = 4".into());
    }
    if by_gtid {
        let gtid = position.gtid.as_deref().unwrap_or_default();
        setup.push(format!(
            "SET @slave_connect_state = '{}'",
            gtid.replace('\'', "")
        ));
        setup.push("SET @slave_gtid_strict_mode = 0".into());
        setup.push("SET @slave_gtid_ignore_duplicates = 0".into());
    }
    for statement in &setup {
        conn.query_drop(statement)
            .await
            .map_err(|e| classify(&e).context(format!("source: {statement}")))?;
    }
    let file = position.file.as_bytes().to_vec();
    let request = if by_gtid {
        BinlogStreamRequest::new(settings.server_id)
    } else {
        BinlogStreamRequest::new(settings.server_id)
            .with_filename(&file)
            .with_pos(position.pos.max(4))
    };
    conn.get_binlog_stream(request).await.map_err(|e| {
        let message = describe(&e);
        if message.contains("REPLICATION SLAVE") || matches!(crate::connection::server_code(&e), Some(1227)) {
            TidelinkError::permanent(format!(
                "the source user may not stream the binlog: GRANT REPLICATION SLAVE ON *.* ({message})"
            ))
        } else if matches!(crate::connection::server_code(&e), Some(1236)) {
            TidelinkError::permanent(format!(
                "the source cannot serve the binlog from {position}: {message}. The binlog may have been purged; reset the stored position and backfill"
            ))
        } else {
            classify(&e).context("source: requesting the binlog stream")
        }
    })
}

impl Source for MysqlSource {
    type Position = BinlogCheckpoint;

    async fn next(&mut self) -> Result<SourceMessage<BinlogCheckpoint>, TidelinkError> {
        loop {
            if let Some(message) = self.ready.pop_front() {
                return Ok(message);
            }
            let event = match tokio::time::timeout(
                self.settings.heartbeat.max(Duration::from_millis(100)) * 3,
                self.stream.next(),
            )
            .await
            {
                Err(_) => return Ok(SourceMessage::Idle),
                Ok(None) => {
                    return Err(TidelinkError::transient(
                        "the source closed the binlog stream",
                    ))
                }
                Ok(Some(Err(e))) => {
                    let error = classify(&e);
                    return Err(
                        if matches!(crate::connection::server_code(&e), Some(1236)) {
                            TidelinkError::permanent(format!("binlog stream: {}", describe(&e)))
                        } else {
                            error.context("binlog stream")
                        },
                    );
                }
                Ok(Some(Ok(event))) => event,
            };
            self.handle(event).await?;
        }
    }

    fn confirm(&mut self, position: BinlogCheckpoint) {
        let mut last = None;
        while self
            .unconfirmed
            .front()
            .is_some_and(|(token, _)| *token <= position)
        {
            last = self.unconfirmed.pop_front().map(|(_, p)| p);
        }
        if let Some(last) = last {
            self.confirmed.send_replace(Some(last));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::truncated_table;
    use tidelink_core::TableId;

    #[test]
    fn truncate_statements_name_their_table() {
        let t = |sql: &str| truncated_table(sql, "shop");
        assert_eq!(
            t("TRUNCATE TABLE items"),
            Some(TableId::new("shop", "items"))
        );
        assert_eq!(t("truncate items;"), Some(TableId::new("shop", "items")));
        assert_eq!(
            t("/* app */ TRUNCATE TABLE `other`.`odd``name`"),
            Some(TableId::new("other", "odd`name"))
        );
        assert_eq!(
            t("TRUNCATE other . items"),
            Some(TableId::new("other", "items"))
        );
        assert_eq!(
            t("TRUNCATE TABLE table_1"),
            Some(TableId::new("shop", "table_1"))
        );
        assert_eq!(t("TRUNCATEX items"), None);
        assert_eq!(t("ALTER TABLE items ADD c int"), None);
        assert_eq!(t("TRUNCATE TABLE"), None);
        assert_eq!(t("TRUNCATE TABLE a, b"), None);
    }
}
