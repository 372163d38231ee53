//! The PostgreSQL source: preflight checks, publication and slot set-up, and the streaming
//! loop that turns pgoutput messages into change events and checkpoints.
//!
//! # Protocol
//! The source opens a replication connection and runs `START_REPLICATION SLOT … LOGICAL`
//! with `pgoutput` (protocol version 1) from the slot's `confirmed_flush_lsn`. The server
//! sends, per transaction, Begin, then a Relation message before the first change of each
//! table (and again after its DDL), then Insert/Update/Delete/Truncate, then Commit. Column
//! values come in text form, typed by the Relation's type OIDs, which are classified once
//! through the catalog. Keepalives between transactions become checkpoints, so an idle slot
//! still advances.
//!
//! # Positions
//! A Commit yields a checkpoint at the transaction's end LSN. The runtime confirms it only
//! after Kafka acknowledged every earlier change; only then is the LSN reported to the
//! server as flushed, so the slot never releases WAL that Kafka does not hold.

pub mod pgoutput;
mod preflight;

pub use preflight::{
    new_tables, preflight, slot_status, slot_status_on, PreflightReport, SlotStatus, SourceTable,
};

use crate::backfill::SnapshotVisibility;
use crate::catalog::{self, TypeCache};
use crate::connection::{self, parse_dsn};
use crate::types::{text_to_json, ValueKind};
use pgoutput::{OldTuple, PgOutputMessage, TupleValue};
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tidelink_config::redact_dsn;
use tidelink_core::{
    ChangeEvent, ColumnDefinition, Lsn, Op, Row, Source, SourceInfo, SourceMessage, TableColumns,
    TableId, TidelinkError, UNAVAILABLE_VALUE,
};
use tidelink_tls::Verify;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The replication worker's pause between socket reads while changes keep arriving: a
/// walsender that keeps up sends each change on its own, and reading each one cost a
/// socket read and two wake-ups (about a tenth of the CPU per change; docs/tuning.md).
const READ_COALESCE: std::time::Duration = std::time::Duration::from_millis(1);

/// What the source needs to know beyond the connection string.
#[derive(Debug, Clone)]
pub struct PgSourceSettings {
    /// Pipeline name, reported as the envelope's `source.name`.
    pub pipeline: String,
    /// Connection string.
    pub dsn: String,
    /// `schema.table` patterns to capture.
    pub tables: Vec<String>,
    /// Replication slot.
    pub slot: String,
    /// Publication.
    pub publication: String,
    /// How often the confirmed position is reported to the server.
    pub status_interval: Duration,
}

/// A column as the source decodes it.
#[derive(Debug, Clone)]
struct ColumnInfo {
    /// Shared by the rows of every change of the table.
    name: Arc<str>,
    kind: ValueKind,
}

/// A table as the stream describes it.
#[derive(Debug, Clone)]
struct RelationInfo {
    table: TableId,
    columns: Vec<ColumnInfo>,
    /// Indexes of the columns forming the message key (primary key, else replica identity).
    key: Vec<usize>,
    /// No primary key or identity index (REPLICA IDENTITY FULL): the whole row is the key.
    keyless: bool,
    /// Column definitions sent with every event of the table.
    definitions: Arc<TableColumns>,
    /// The envelope's `source` block for the table, without the transaction's fields.
    source: SourceInfo,
}

#[derive(Debug, Clone, Copy)]
struct OpenTransaction {
    final_lsn: u64,
    /// Events emitted so far.
    events: u64,
    xid: u32,
    commit_ts_ms: i64,
}

/// The streaming PostgreSQL source. Build it with [`PgSource::start`].
pub struct PgSource {
    settings: PgSourceSettings,
    client: ReplicationClient,
    /// A regular connection for catalog look-ups while streaming.
    catalog: tokio_postgres::Client,
    types: TypeCache,
    relations: HashMap<u32, RelationInfo>,
    transaction: Option<OpenTransaction>,
    ready: VecDeque<SourceMessage<Lsn>>,
    confirmed: Lsn,
    /// The parts of every change's `source` block that never change (version, connector,
    /// pipeline name, snapshot flag, database), built once.
    source_block: SourceInfo,
    /// Tables copied whole with a snapshot, and which transactions it saw: their changes
    /// are in the copy already and are not emitted again.
    snapshotted: HashMap<TableId, SnapshotVisibility>,
    /// Ticks every `status_interval` while `next` waits for the stream: an
    /// [`SourceMessage::Idle`]. One timer for the stream, not one per read.
    idle_tick: tokio::time::Interval,
}

impl PgSource {
    /// Runs preflight (which creates the publication and slot when absent) and starts
    /// streaming from the slot's confirmed position.
    pub async fn start(
        settings: PgSourceSettings,
    ) -> Result<(Self, PreflightReport), TidelinkError> {
        let report = Self::prepare(&settings).await?;
        let source = Self::open(settings, &report).await?;
        Ok((source, report))
    }

    /// Runs preflight, which creates the publication and slot when absent, and logs its
    /// warnings. The slot then holds every change committed from here on, so a snapshot
    /// taken before [`Self::open`] misses nothing.
    pub async fn prepare(settings: &PgSourceSettings) -> Result<PreflightReport, TidelinkError> {
        Self::prepare_with(settings, false).await
    }

    /// [`Self::prepare`]; `lenient` leaves out (with a warning) matching tables that
    /// cannot be captured instead of refusing them, for a source that already runs.
    pub async fn prepare_with(
        settings: &PgSourceSettings,
        lenient: bool,
    ) -> Result<PreflightReport, TidelinkError> {
        let report = preflight::preflight_with(settings, lenient).await?;
        for warning in &report.warnings {
            tracing::warn!(pipeline = %settings.pipeline, "{warning}");
        }
        Ok(report)
    }

    /// Starts streaming from the slot's confirmed position, after [`Self::prepare`].
    pub async fn open(
        settings: PgSourceSettings,
        report: &PreflightReport,
    ) -> Result<Self, TidelinkError> {
        let config = parse_dsn(&settings.dsn)?;
        let source_block = SourceInfo {
            version: Arc::from(env!("CARGO_PKG_VERSION")),
            connector: Arc::from("postgresql"),
            name: Arc::from(settings.pipeline.as_str()),
            snapshot: Arc::from("false"),
            db: Arc::from(config.get_dbname().unwrap_or("postgres")),
            ..Default::default()
        };
        let catalog = connection::connect(&settings.dsn, "source catalog").await?;
        let client = open_stream(&settings, &config).await?;
        let settings_status_interval = settings.status_interval;
        tracing::info!(
            pipeline = %settings.pipeline,
            slot = %settings.slot,
            publication = %settings.publication,
            tables = report.tables.len(),
            confirmed_flush_lsn = %report.confirmed_flush_lsn,
            "PostgreSQL source streaming from {}",
            redact_dsn(&settings.dsn)
        );
        Ok(Self {
            confirmed: report.confirmed_flush_lsn,
            source_block,
            settings,
            client,
            catalog,
            types: TypeCache::default(),
            relations: HashMap::new(),
            transaction: None,
            ready: VecDeque::new(),
            snapshotted: HashMap::new(),
            idle_tick: idle_tick(settings_status_interval),
        })
    }

    /// Leaves out the streamed changes of `table` that `visibility`'s snapshot already
    /// saw: rows read with that snapshot hold them (a table without a key, copied whole).
    pub fn skip_seen_by(&mut self, table: TableId, visibility: SnapshotVisibility) {
        self.snapshotted.insert(table, visibility);
    }

    /// Stops the stream, telling the server the last confirmed position.
    pub async fn shutdown(mut self) {
        self.client
            .update_applied_lsn(pgwire_replication::Lsn(self.confirmed.0));
        if let Err(e) = self.client.shutdown().await {
            tracing::debug!(error = %e, "replication stream ended with an error during shutdown");
        }
    }

    fn source_info(rel: &RelationInfo, tx: OpenTransaction) -> SourceInfo {
        SourceInfo {
            ts_ms: tx.commit_ts_ms,
            tx_id: Some(u64::from(tx.xid)),
            lsn: Some(tx.final_lsn),
            ..rel.source.clone()
        }
    }

    async fn handle_relation(&mut self, rel: pgoutput::Relation) -> Result<(), TidelinkError> {
        let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
        self.types.load(&self.catalog, &oids).await?;
        let columns: Vec<ColumnInfo> = rel
            .columns
            .iter()
            .map(|c| ColumnInfo {
                name: Arc::from(c.name.as_str()),
                kind: self.types.classify(c.type_oid),
            })
            .collect();
        let mut primary_key = catalog::primary_key(&self.catalog, rel.id).await?;
        if primary_key.is_empty() {
            primary_key = catalog::replica_identity_index(&self.catalog, rel.id).await?;
        }
        // No primary key and no identity index: REPLICA IDENTITY FULL (preflight refuses
        // the rest). The whole row identifies it; the definitions name no key, which tells
        // sinks to create the target without one and match rows by every column.
        let keyless = primary_key.is_empty();
        let key: Vec<usize> = if keyless {
            rel.columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key)
                .map(|(i, _)| i)
                .collect()
        } else {
            primary_key
                .iter()
                .filter_map(|name| columns.iter().position(|c| *c.name == **name))
                .collect()
        };
        // Types come from the message (the table as this transaction saw it, even when
        // later DDL changed the catalog since); NOT NULL from the catalog, by name.
        let catalog_columns = catalog::column_definitions(&self.catalog, rel.id).await?;
        let types: Vec<(u32, i32)> = rel
            .columns
            .iter()
            .map(|c| (c.type_oid, c.type_modifier))
            .collect();
        let type_names = catalog::type_names(&self.catalog, &types).await?;
        let definitions = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let sql_type = type_names.get(i).cloned().unwrap_or_else(|| "text".into());
                let not_null = catalog_columns
                    .iter()
                    .find(|(name, _, _)| **name == *c.name)
                    .is_some_and(|(_, _, n)| *n);
                ColumnDefinition {
                    name: c.name.to_string(),
                    sql_type,
                    key: !keyless && key.contains(&i),
                    not_null,
                }
            })
            .collect();
        let table = TableId::new(rel.namespace, rel.name);
        tracing::debug!(%table, columns = columns.len(), "relation described");
        let source = SourceInfo {
            schema: table.schema.clone(),
            table: table.name.clone(),
            ..self.source_block.clone()
        };
        self.relations.insert(
            rel.id,
            RelationInfo {
                table,
                columns,
                key,
                keyless,
                definitions: Arc::new(TableColumns::new(definitions)),
                source,
            },
        );
        Ok(())
    }

    fn relation(&self, id: u32, what: &str) -> Result<&RelationInfo, TidelinkError> {
        self.relations.get(&id).ok_or_else(|| {
            TidelinkError::permanent(format!(
                "pgoutput {what} for relation {id} arrived before its Relation message"
            ))
        })
    }

    /// Queues a change, numbering it within its transaction (`source.seq`).
    fn emit(&mut self, mut event: ChangeEvent) {
        if let (Some(tx), false) = (self.transaction, self.snapshotted.is_empty()) {
            if self
                .snapshotted
                .get(&event.table)
                .is_some_and(|v| v.sees(tx.xid, tx.final_lsn))
            {
                return;
            }
        }
        if let Some(tx) = self.transaction.as_mut() {
            event.source.seq = Some(tx.events);
            tx.events += 1;
        }
        self.ready.push_back(SourceMessage::Change(event));
    }

    fn handle_change(&mut self, message: PgOutputMessage) -> Result<(), TidelinkError> {
        let Some(tx) = self.transaction else {
            return Err(TidelinkError::permanent(
                "pgoutput change outside a transaction (no Begin seen)",
            ));
        };
        match message {
            PgOutputMessage::Insert { relation, new } => {
                let rel = self.relation(relation, "Insert")?;
                let key = key_of(rel, &new)?;
                let after = build_row(rel, new, None)?;
                let event = ChangeEvent {
                    table: rel.table.clone(),
                    op: Op::Create,
                    key,
                    before: None,
                    after: Some(after),
                    source: Self::source_info(rel, tx),
                    columns: Some(rel.definitions.clone()),
                };
                self.emit(event);
            }
            PgOutputMessage::Update { relation, old, new } => {
                let rel = self.relation(relation, "Update")?;
                let mut key = key_of(rel, &new)?;
                let mut old_key = match &old {
                    Some(old) => Some(key_of(rel, &old.values)?),
                    None => None,
                };
                let after = build_row(rel, new, old.as_ref())?;
                let before = match old {
                    Some(old) => Some(build_old_row(rel, old)?),
                    None => None,
                };
                if rel.keyless {
                    // The key is the whole row, with unchanged TOASTed values taken from
                    // the old row (the server sends all of it under REPLICA IDENTITY FULL).
                    key = after.clone();
                    old_key = before.clone();
                }
                let source = Self::source_info(rel, tx);
                let table = rel.table.clone();
                let columns = Some(rel.definitions.clone());
                match old_key {
                    // The key changed: the old row is gone and a new one exists, as two
                    // events keyed by their own keys (Debezium does the same).
                    Some(old_key) if old_key != key => {
                        self.emit(ChangeEvent {
                            table: table.clone(),
                            op: Op::Delete,
                            key: old_key,
                            before,
                            after: None,
                            source: source.clone(),
                            columns: columns.clone(),
                        });
                        self.emit(ChangeEvent {
                            table,
                            op: Op::Create,
                            key,
                            before: None,
                            after: Some(after),
                            source,
                            columns,
                        });
                    }
                    _ => self.emit(ChangeEvent {
                        table,
                        op: Op::Update,
                        key,
                        before,
                        after: Some(after),
                        source,
                        columns,
                    }),
                }
            }
            PgOutputMessage::Delete { relation, old } => {
                let rel = self.relation(relation, "Delete")?;
                let key = key_of(rel, &old.values)?;
                let event = ChangeEvent {
                    table: rel.table.clone(),
                    op: Op::Delete,
                    key,
                    before: Some(build_old_row(rel, old)?),
                    after: None,
                    source: Self::source_info(rel, tx),
                    columns: Some(rel.definitions.clone()),
                };
                self.emit(event);
            }
            PgOutputMessage::Truncate { relations, .. } => {
                for id in relations {
                    let rel = self.relation(id, "Truncate")?;
                    let event = ChangeEvent {
                        table: rel.table.clone(),
                        op: Op::Truncate,
                        key: Row::new(),
                        before: None,
                        after: None,
                        source: Self::source_info(rel, tx),
                        columns: Some(rel.definitions.clone()),
                    };
                    self.emit(event);
                }
            }
            PgOutputMessage::Relation(_)
            | PgOutputMessage::Type { .. }
            | PgOutputMessage::Origin { .. }
            | PgOutputMessage::Boundary(_) => {}
        }
        Ok(())
    }

    async fn pull(&mut self) -> Result<(), TidelinkError> {
        // recv is cancel-safe, so the tick winning loses nothing. Polled first, recv
        // returns what is waiting without looking at the clock.
        let received = tokio::select! {
            biased;
            received = self.client.recv() => received,
            _ = self.idle_tick.tick() => {
                self.ready.push_back(SourceMessage::Idle);
                return Ok(());
            }
        };
        let event = received
            .map_err(|e| stream_error(&e))?
            .ok_or_else(|| TidelinkError::transient("the replication stream ended"))?;
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.transaction = Some(OpenTransaction {
                    final_lsn: final_lsn.0,
                    events: 0,
                    xid,
                    commit_ts_ms: (commit_time_micros + PG_EPOCH_OFFSET_MICROS) / 1000,
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.transaction = None;
                self.ready
                    .push_back(SourceMessage::Checkpoint(Lsn(end_lsn.0)));
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Between transactions everything up to wal_end has been sent: a heartbeat.
                if self.transaction.is_none() && wal_end.0 > self.confirmed.0 {
                    self.ready
                        .push_back(SourceMessage::Checkpoint(Lsn(wal_end.0)));
                }
            }
            ReplicationEvent::XLogData {
                data, wal_start, ..
            } => {
                let message = pgoutput::decode(&data).map_err(|e| {
                    TidelinkError::permanent(format!(
                        "slot {} at {}: {e}",
                        self.settings.slot,
                        Lsn(wal_start.0)
                    ))
                })?;
                match message {
                    PgOutputMessage::Relation(rel) => self.handle_relation(rel).await?,
                    other => self.handle_change(other)?,
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {
                return Err(TidelinkError::transient("the replication stream stopped"));
            }
        }
        Ok(())
    }
}

impl Source for PgSource {
    type Position = Lsn;

    async fn next(&mut self) -> Result<SourceMessage<Lsn>, TidelinkError> {
        loop {
            if let Some(message) = self.ready.pop_front() {
                return Ok(message);
            }
            self.pull().await?;
        }
    }

    fn confirm(&mut self, position: Lsn) {
        if position > self.confirmed {
            self.confirmed = position;
            self.client
                .update_applied_lsn(pgwire_replication::Lsn(position.0));
        }
    }
}

/// A tick every `period`, the first one a period from now; a late tick is not made up.
fn idle_tick(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

fn stream_error(error: &pgwire_replication::PgWireError) -> TidelinkError {
    use pgwire_replication::PgWireError as E;
    let message = format!("replication stream: {error}");
    match error {
        E::Auth(_) | E::Tls(_) => TidelinkError::permanent(message),
        E::Server(text)
            if text.contains("does not exist")
                || text.contains("permission denied")
                || text.contains("must be superuser or replication role") =>
        {
            TidelinkError::permanent(message)
        }
        _ => TidelinkError::transient(message),
    }
}

async fn open_stream(
    settings: &PgSourceSettings,
    config: &tokio_postgres::Config,
) -> Result<ReplicationClient, TidelinkError> {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_string();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = config.get_dbname().unwrap_or(&user).to_string();
    let tls = match connection::tls_of(&settings.dsn)? {
        None => pgwire_replication::TlsConfig::disabled(),
        Some(tls) => {
            let base = match tls.verify {
                Verify::Full => pgwire_replication::TlsConfig::verify_full(tls.root_cert),
                Verify::Chain => pgwire_replication::TlsConfig::verify_ca(tls.root_cert),
                Verify::Nothing => pgwire_replication::TlsConfig::require(),
            };
            match (tls.client_cert, tls.client_key) {
                (Some(cert), Some(key)) => base.with_client_cert(cert, key),
                _ => base,
            }
        }
    };
    let replication = ReplicationConfig::new(
        host,
        user,
        password,
        database,
        settings.slot.clone(),
        settings.publication.clone(),
    )
    .with_port(port)
    .with_tls(tls)
    // Pin the text forms of values so every source renders them identically.
    .with_options(connection::VALUE_FORMAT_OPTIONS)
    .with_status_interval(settings.status_interval)
    .with_wakeup_interval(settings.status_interval)
    .with_read_coalesce(READ_COALESCE)
    .with_application_name(format!("tidelink {}", settings.pipeline));
    ReplicationClient::connect(replication).await.map_err(|e| {
        stream_error(&e).context(format!("starting replication on slot {}", settings.slot))
    })
}

fn value_of(value: &TupleValue, column: &ColumnInfo) -> Value {
    match value {
        TupleValue::Text(text) => text_to_json(text.as_str(), &column.kind),
        other => value_into(other.clone(), column),
    }
}

/// The JSON form of a value, taking over its text where the text is that form.
fn value_into(value: TupleValue, column: &ColumnInfo) -> Value {
    match value {
        TupleValue::Null => Value::Null,
        TupleValue::UnchangedToast => Value::String(UNAVAILABLE_VALUE.to_string()),
        TupleValue::Text(text) => text_to_json(text, &column.kind),
        TupleValue::Binary(bytes) => Value::String(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }),
    }
}

fn check_width(rel: &RelationInfo, values: &[TupleValue]) -> Result<(), TidelinkError> {
    if values.len() != rel.columns.len() {
        return Err(TidelinkError::permanent(format!(
            "{}: tuple has {} columns, the relation {}",
            rel.table,
            values.len(),
            rel.columns.len()
        )));
    }
    Ok(())
}

/// The new row; an unchanged TOASTed value is taken from the old row when the server sent
/// it (REPLICA IDENTITY FULL), otherwise marked unavailable so the sink keeps it.
fn build_row(
    rel: &RelationInfo,
    values: Vec<TupleValue>,
    old: Option<&OldTuple>,
) -> Result<Row, TidelinkError> {
    check_width(rel, &values)?;
    let mut row = Row::with_capacity(values.len());
    for (i, (column, value)) in rel.columns.iter().zip(values).enumerate() {
        let old_value = old
            .filter(|old| !old.key_only)
            .and_then(|old| old.values.get(i));
        let value = match (value, old_value) {
            (TupleValue::UnchangedToast, Some(old_value @ TupleValue::Text(_))) => {
                value_of(old_value, column)
            }
            (value, _) => value_into(value, column),
        };
        row.insert(column.name.clone(), value);
    }
    Ok(row)
}

/// The old row: all columns under REPLICA IDENTITY FULL, only the identity columns
/// otherwise (the others were not sent, which is not the same as NULL).
fn build_old_row(rel: &RelationInfo, old: OldTuple) -> Result<Row, TidelinkError> {
    check_width(rel, &old.values)?;
    let mut row = Row::with_capacity(old.values.len());
    for (column, value) in rel.columns.iter().zip(old.values) {
        if old.key_only && matches!(value, TupleValue::Null) {
            continue;
        }
        row.insert(column.name.clone(), value_into(value, column));
    }
    Ok(row)
}

fn key_of(rel: &RelationInfo, values: &[TupleValue]) -> Result<Row, TidelinkError> {
    check_width(rel, values)?;
    let mut key = Row::with_capacity(rel.key.len());
    for &i in &rel.key {
        let column = &rel.columns[i];
        key.insert(column.name.clone(), value_of(&values[i], column));
    }
    Ok(key)
}

/// Re-exported for preflight and tests: a regular connection to the source.
pub async fn connect_catalog(dsn: &str) -> Result<tokio_postgres::Client, TidelinkError> {
    connection::connect(dsn, "source catalog").await
}
