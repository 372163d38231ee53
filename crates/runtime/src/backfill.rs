//! `tidelink backfill`: copies the rows a table already holds through Kafka as `op: "r"`
//! events, so every sink of the pipeline receives them, while the stream keeps flowing.
//!
//! # Why the result is right while the stream runs
//! Rows are read in primary-key chunks, each by one short statement. Their keys are encoded
//! exactly like the stream's, so a row's snapshot and its streamed changes share a
//! partition. Sinks apply a snapshot row only where the target has no row with its key:
//! whatever the stream applied first wins, and a change committed after the chunk was read
//! reaches Kafka after the chunk (it is decoded after it commits, the chunk was acknowledged
//! before) and overwrites it. The one race left is a row deleted after its chunk was read
//! but streamed before the chunk landed — the snapshot would bring it back. So once a
//! chunk is acknowledged its keys are looked up again, and each key gone by then gets a
//! delete event after the chunk.
//!
//! Each table is copied up to the largest key it holds when its copy starts: rows inserted
//! later commit after the pipeline's slot exists (the publication a backfill reads is
//! created together with it) or after the binlog position a MySQL-family source stored on
//! its first start, so the stream delivers them.
//!
//! `--direct` ([`BackfillOptions::direct`]) writes into one sink's target instead; see
//! `backfill_direct`.
//!
//! # Resuming
//! After each chunk the last key is recorded in the compacted topic `<prefix>.backfill`
//! (keyed by table). A rerun of the same command continues after it and skips finished
//! tables (`--restart` copies them again).

use crate::publisher::{now_ms, publish_definitions};
use crate::{Metrics, Shutdown};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidelink_config::{PipelineConfig, SinkTarget, SourceKind};
use tidelink_core::{ChangeEvent, Op, SourceInfo, TableId, TidelinkError};
use tidelink_core::{DirectProgress, Row, TableColumns};
use tidelink_kafka::topics::topic_of;
use tidelink_kafka::{admin, encode_change, EventProducer};
use tidelink_postgres::backfill::CopyFormat;

/// A table reader of either engine.
pub(crate) enum Reader {
    Postgres(tidelink_postgres::backfill::TableReader),
    Mysql(tidelink_mysql::backfill::TableReader),
}

type Chunk = Vec<(Row, Row, Vec<String>)>;

impl Reader {
    fn definitions(&self) -> &std::sync::Arc<TableColumns> {
        match self {
            Reader::Postgres(r) => &r.definitions,
            Reader::Mysql(r) => &r.definitions,
        }
    }

    pub(crate) fn estimated_rows(&self) -> i64 {
        match self {
            Reader::Postgres(r) => r.estimated_rows,
            Reader::Mysql(r) => r.estimated_rows,
        }
    }

    async fn max_key(&self) -> Result<Option<Vec<String>>, TidelinkError> {
        match self {
            Reader::Postgres(r) => r.max_key().await,
            Reader::Mysql(r) => r.max_key().await,
        }
    }

    /// Column names in table order.
    pub(crate) fn column_names(&self) -> Vec<String> {
        match self {
            Reader::Postgres(r) => r.column_names(),
            Reader::Mysql(r) => r.column_names(),
        }
    }

    /// Both readers read the same engine (their checksums can be compared).
    pub(crate) fn same_engine(&self, other: &Reader) -> bool {
        matches!(
            (self, other),
            (Reader::Postgres(_), Reader::Postgres(_)) | (Reader::Mysql(_), Reader::Mysql(_))
        )
    }

    /// Count, checksum (computed in the database) and last key of a key range: see the
    /// engines' `range_digest`.
    pub(crate) async fn range_digest(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: Option<usize>,
        columns: &[String],
    ) -> Result<Option<(i64, String, Vec<String>)>, TidelinkError> {
        match self {
            Reader::Postgres(r) => r.range_digest(after, upto, limit, columns).await,
            Reader::Mysql(r) => r.range_digest(after, upto, limit, columns).await,
        }
    }

    pub(crate) async fn chunk(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: usize,
    ) -> Result<Chunk, TidelinkError> {
        match self {
            Reader::Postgres(r) => r.chunk(after, upto, limit).await,
            Reader::Mysql(r) => r.chunk(after, upto, limit).await,
        }
    }

    async fn existing(&self, keys: &[Vec<String>]) -> Result<Vec<bool>, TidelinkError> {
        match self {
            Reader::Postgres(r) => r.existing(keys).await,
            Reader::Mysql(r) => r.existing(keys).await,
        }
    }

    /// The table has no key (opened with [`open_whole_reader`]).
    pub(crate) fn is_keyless(&self) -> bool {
        match self {
            Reader::Postgres(r) => r.is_keyless(),
            Reader::Mysql(r) => r.is_keyless(),
        }
    }

    /// Every row, in no particular order.
    pub(crate) async fn all_rows(&self) -> Result<Vec<Row>, TidelinkError> {
        match self {
            Reader::Postgres(r) => r.all_rows().await,
            Reader::Mysql(r) => r.all_rows().await,
        }
    }

    pub(crate) async fn rows_for(&self, keys: &[Row]) -> Result<Chunk, TidelinkError> {
        match self {
            Reader::Postgres(r) => r.rows_for(keys).await,
            Reader::Mysql(r) => r.rows_for(keys).await,
        }
    }
}

/// Opens a reader on any table of either engine: `(is PostgreSQL, DSN)`.
pub(crate) async fn open_reader(
    (postgres, dsn): (bool, String),
    table: &TableId,
) -> Result<Reader, TidelinkError> {
    Ok(if postgres {
        Reader::Postgres(tidelink_postgres::backfill::TableReader::open(&dsn, table, &[]).await?)
    } else {
        Reader::Mysql(tidelink_mysql::backfill::TableReader::open(&dsn, table, &[]).await?)
    })
}

/// Opens a reader on any table of either engine, with or without a key.
pub(crate) async fn open_whole_reader(
    (postgres, dsn): (bool, String),
    table: &TableId,
) -> Result<Reader, TidelinkError> {
    Ok(if postgres {
        Reader::Postgres(tidelink_postgres::backfill::TableReader::open_whole(&dsn, table).await?)
    } else {
        Reader::Mysql(tidelink_mysql::backfill::TableReader::open_whole(&dsn, table).await?)
    })
}

/// The pipeline's source as backfills and verification read it.
pub(crate) fn source_side(pipeline: &PipelineConfig) -> Result<SourceSide<'_>, TidelinkError> {
    match pipeline.source.kind() {
        Some(kind @ SourceKind::Postgres(pg)) => Ok(SourceSide {
            connector: "postgresql",
            database: tidelink_postgres::connection::parse_dsn(&pg.dsn)?
                .get_dbname()
                .unwrap_or("postgres")
                .to_string(),
            kind,
        }),
        Some(kind @ SourceKind::Mysql(_)) => Ok(SourceSide {
            connector: "mysql",
            database: String::new(),
            kind,
        }),
        None => Err(TidelinkError::permanent(format!(
            "pipeline {}: no source configured",
            pipeline.name
        ))),
    }
}

/// What a backfill needs to know of the pipeline's source.
pub(crate) struct SourceSide<'a> {
    connector: &'static str,
    database: String,
    kind: SourceKind<'a>,
}

impl SourceSide<'_> {
    pub(crate) async fn tables(
        &self,
        pipeline: &PipelineConfig,
    ) -> Result<Vec<TableId>, TidelinkError> {
        match self.kind {
            SourceKind::Postgres(pg) => {
                tidelink_postgres::backfill::published_tables(
                    &pg.dsn,
                    &pg.publication_name(&pipeline.name),
                )
                .await
            }
            SourceKind::Mysql(my) => {
                tidelink_mysql::backfill::captured_tables(&my.dsn, &my.tables).await
            }
        }
    }

    /// The `--table` arguments as tables, or every captured table when there are none.
    pub(crate) async fn selected_tables(
        &self,
        pipeline: &PipelineConfig,
        requested: &[String],
    ) -> Result<Vec<TableId>, TidelinkError> {
        if requested.is_empty() {
            return self.tables(pipeline).await;
        }
        requested
            .iter()
            .map(|t| match t.split_once('.') {
                Some((schema, name)) if !schema.is_empty() && !name.is_empty() => {
                    Ok(TableId::new(schema, name))
                }
                _ => Err(TidelinkError::permanent(format!(
                    "--table {t}: write it schema.table"
                ))),
            })
            .collect()
    }

    /// A reader on a source table that may have no key.
    pub(crate) async fn open_whole(&self, table: &TableId) -> Result<Reader, TidelinkError> {
        let location = match self.kind {
            SourceKind::Postgres(pg) => (true, pg.dsn.clone()),
            SourceKind::Mysql(my) => (false, my.dsn.clone()),
        };
        open_whole_reader(location, table).await
    }

    pub(crate) async fn open(
        &self,
        table: &TableId,
        key_columns: &[String],
    ) -> Result<Reader, TidelinkError> {
        Ok(match self.kind {
            SourceKind::Postgres(pg) => Reader::Postgres(
                tidelink_postgres::backfill::TableReader::open(&pg.dsn, table, key_columns).await?,
            ),
            SourceKind::Mysql(my) => Reader::Mysql(
                tidelink_mysql::backfill::TableReader::open(&my.dsn, table, key_columns).await?,
            ),
        })
    }
}

/// What to copy and how.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Tables as `schema.table`; empty means every table of the pipeline's publication.
    pub tables: Vec<String>,
    /// Rows per chunk.
    pub chunk_size: usize,
    /// Copy tables again even if a previous run finished them.
    pub restart: bool,
    /// Draw a progress bar (stderr is a terminal) instead of periodic log lines.
    pub progress_bar: bool,
    /// Chunks in flight at once: the next chunks are read while earlier ones are being
    /// delivered (or, with `direct`, written).
    pub parallel: usize,
    /// Copy straight into this sink's target instead of through Kafka.
    pub direct: Option<String>,
    /// Page by these columns (a unique NOT NULL index) instead of the primary key.
    pub key_columns: Vec<String>,
    /// Read at most this many rows per second from each table (`None`: as fast as the
    /// pipeline takes them), to spare a busy source.
    pub max_rows_per_second: Option<u64>,
    /// Tables left out (the daemon copies tables without a key itself, see
    /// `whole_table`).
    pub exclude: Vec<TableId>,
}

/// Holds the reading of one table to [`BackfillOptions::max_rows_per_second`].
struct ReadPace {
    limit: Option<u64>,
    started: Instant,
    rows: u64,
}

impl ReadPace {
    fn new(limit: Option<u64>) -> Self {
        Self {
            limit: limit.filter(|&l| l > 0),
            started: Instant::now(),
            rows: 0,
        }
    }

    /// Counts `rows` just read and waits while reading is ahead of the limit.
    async fn read(&mut self, rows: usize) {
        let Some(limit) = self.limit else { return };
        self.rows += rows as u64;
        let due = Duration::from_secs_f64(self.rows as f64 / limit as f64);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
}

/// Progress of one table, as recorded after each chunk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct TableProgress {
    /// Key (text form) of the last row copied.
    pub(crate) after: Option<Vec<String>>,
    /// Rows copied so far.
    pub(crate) rows: u64,
    /// The table is finished.
    pub(crate) done: bool,
    /// A table without a key, copied whole: which transactions its snapshot saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) visibility: Option<tidelink_postgres::backfill::SnapshotVisibility>,
    /// A MySQL-family table without a key, copied whole: the binlog place its snapshot
    /// matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) binlog_snapshot: Option<crate::whole_table::BinlogSnapshot>,
    /// Why the last attempt at the table failed (cleared once it is copied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// A table's snapshot as `<prefix>.backfill` records it, for `tidelink status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableSnapshot {
    /// `schema.table`.
    pub table: String,
    /// Rows copied so far.
    pub rows: u64,
    /// Finished.
    pub done: bool,
    /// Why the last attempt failed, while it is not finished.
    pub error: Option<String>,
}

/// Every table's recorded snapshot progress of a pipeline.
pub async fn snapshot_progress(
    kafka: &tidelink_config::KafkaConfig,
) -> Result<Vec<TableSnapshot>, TidelinkError> {
    let recorded = admin::read_latest_by_key(kafka, &progress_topic(&kafka.topic_prefix)).await?;
    let mut tables: Vec<TableSnapshot> = recorded
        .into_iter()
        .filter_map(|(table, bytes)| {
            let progress: TableProgress = serde_json::from_slice(&bytes).ok()?;
            Some(TableSnapshot {
                table,
                rows: progress.rows,
                done: progress.done,
                error: progress.error,
            })
        })
        .collect();
    tables.sort_by(|a, b| a.table.cmp(&b.table));
    Ok(tables)
}

/// The compacted topic recording backfill progress.
pub fn progress_topic(prefix: &str) -> String {
    format!("{prefix}.backfill")
}

/// Runs a backfill of a pipeline's tables; returns rows copied per table.
pub async fn backfill(
    pipeline: &PipelineConfig,
    options: &BackfillOptions,
    metrics: Option<&Metrics>,
    shutdown: &Shutdown,
) -> Result<Vec<(TableId, u64)>, TidelinkError> {
    let side = source_side(pipeline)?;
    let mut tables = side.selected_tables(pipeline, &options.tables).await?;
    tables.retain(|t| !options.exclude.contains(t));
    if let Some(sink) = &options.direct {
        return backfill_direct(pipeline, &side, tables, sink, options, shutdown).await;
    }
    let kafka = &pipeline.kafka;
    let producer = EventProducer::new(kafka)?;
    let progress_topic = progress_topic(&kafka.topic_prefix);
    admin::ensure_compacted_topic(kafka, &progress_topic).await?;
    let recorded: HashMap<String, Vec<u8>> =
        admin::read_latest_by_key(kafka, &progress_topic).await?;
    let mut schemas_topic_ready = false;
    let mut report = Vec::new();
    let run = KafkaBackfill {
        pipeline,
        side: &side,
        options,
        metrics,
        shutdown,
        producer: &producer,
        progress_topic: &progress_topic,
        recorded: &recorded,
    };
    // One table's failure does not keep the others from being copied: it is reported,
    // counted, and the backfill ends with an error naming every table that failed.
    let mut failed: Vec<(TableId, TidelinkError)> = Vec::new();
    for table in tables {
        let labels = [pipeline.name.as_str(), &table.to_string()].map(str::to_string);
        match run.table(&table, &mut schemas_topic_ready).await {
            Ok(Some(rows)) => {
                set_table_failed(metrics, &labels, false);
                report.push((table, rows));
            }
            Ok(None) => return Ok(report),
            Err(e) => {
                tracing::error!(pipeline = %pipeline.name, %table, error = %e,
                    "snapshot of the table failed; the other tables are still copied");
                set_table_failed(metrics, &labels, true);
                // `tidelink status` shows the reason until the table is copied.
                let mut progress: TableProgress = recorded
                    .get(&table.to_string())
                    .and_then(|bytes| serde_json::from_slice(bytes).ok())
                    .unwrap_or_default();
                progress.done = false;
                progress.error = Some(e.message.clone());
                if let Err(record_error) =
                    record(&producer, &progress_topic, &table, &progress).await
                {
                    tracing::debug!(error = %record_error, "cannot record the failure");
                }
                failed.push((table, e));
            }
        }
    }
    if !failed.is_empty() {
        let transient = failed.iter().all(|(_, e)| e.is_transient());
        let list = failed
            .iter()
            .map(|(t, e)| format!("{t}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        let message = format!("{} of the tables could not be copied: {list}", failed.len());
        return Err(if transient {
            TidelinkError::transient(message)
        } else {
            TidelinkError::permanent(message)
        });
    }
    Ok(report)
}

/// What every table of one backfill through Kafka shares.
struct KafkaBackfill<'a> {
    pipeline: &'a PipelineConfig,
    side: &'a SourceSide<'a>,
    options: &'a BackfillOptions,
    metrics: Option<&'a Metrics>,
    shutdown: &'a Shutdown,
    producer: &'a EventProducer,
    progress_topic: &'a str,
    recorded: &'a HashMap<String, Vec<u8>>,
}

impl KafkaBackfill<'_> {
    /// Copies one table; `None` when stopped before it finished.
    async fn table(
        &self,
        table: &TableId,
        schemas_topic_ready: &mut bool,
    ) -> Result<Option<u64>, TidelinkError> {
        let KafkaBackfill {
            pipeline,
            side,
            options,
            metrics,
            shutdown,
            producer,
            progress_topic,
            recorded,
        } = *self;
        let kafka = &pipeline.kafka;
        let mut progress: TableProgress = recorded
            .get(&table.to_string())
            .and_then(|bytes| serde_json::from_slice(bytes).ok())
            .unwrap_or_default();
        // This attempt's outcome replaces an earlier attempt's failure.
        progress.error = None;
        if options.restart {
            progress = TableProgress::default();
        }
        if progress.done {
            tracing::info!(%table, rows = progress.rows, "already backfilled by an earlier run; skipping (--restart copies it again)");
            return Ok(Some(progress.rows));
        }
        if progress.rows > 0 {
            tracing::info!(%table, rows_done = progress.rows, "resuming after the last completed chunk");
        }
        let reader = side.open(table, &options.key_columns).await?;
        let topic = topic_of(kafka, &table.schema, &table.name);
        admin::ensure_topics(kafka, std::slice::from_ref(&topic)).await?;
        publish_definitions(
            producer,
            kafka,
            schemas_topic_ready,
            &mut None,
            table,
            reader.definitions(),
        )
        .await?;
        let block = SourceInfo {
            version: Arc::from(env!("CARGO_PKG_VERSION")),
            connector: Arc::from(side.connector),
            name: Arc::from(pipeline.name.as_str()),
            snapshot: Arc::from("true"),
            db: if side.database.is_empty() {
                table.schema.clone()
            } else {
                Arc::from(side.database.as_str())
            },
            schema: table.schema.clone(),
            table: table.name.clone(),
            ..Default::default()
        };
        let source = |op_ts: i64| SourceInfo {
            ts_ms: op_ts,
            ..block.clone()
        };
        // Rows with larger keys are inserted after this point and reach sinks through the
        // stream: the copy stops at the largest key there is now.
        let upto = reader.max_key().await?;
        let started = Instant::now();
        let rows_at_start = progress.rows;
        let mut last_report = Instant::now();
        let table_label = table.to_string();
        let labels = [pipeline.name.as_str(), table_label.as_str()];
        // Chunks in flight: sent to Kafka, not yet acknowledged. Reading the next chunk
        // overlaps with waiting for the earlier ones; progress is recorded in order.
        let mut in_flight: VecDeque<SentChunk> = VecDeque::new();
        let mut cursor = progress.after.clone();
        let mut finished = false;
        let mut pace = ReadPace::new(options.max_rows_per_second);
        loop {
            let stopping = shutdown.is_triggered();
            if !stopping && !finished {
                // An empty table has nothing to copy: every row it gets is streamed.
                let chunk = match &upto {
                    None => Vec::new(),
                    Some(upto) => {
                        reader
                            .chunk(cursor.as_deref(), Some(upto), options.chunk_size)
                            .await?
                    }
                };
                if chunk.is_empty() {
                    finished = true;
                } else {
                    cursor = chunk.last().map(|(_, _, k)| k.clone());
                    let now = now_ms();
                    let mut deliveries = Vec::with_capacity(chunk.len());
                    for (key, image, _) in &chunk {
                        let event = ChangeEvent {
                            table: table.clone(),
                            op: Op::Read,
                            key: key.clone(),
                            before: None,
                            after: Some(image.clone()),
                            source: source(now),
                            columns: None,
                        };
                        let (key, value) = encode_change(&event, now);
                        deliveries.push(
                            producer
                                .send(&topic, key.as_deref(), &value, None, None)
                                .await?,
                        );
                    }
                    in_flight.push_back(SentChunk { chunk, deliveries });
                    tokio::select! {
                        () = pace.read(in_flight.back().map_or(0, |c| c.chunk.len())) => {}
                        () = shutdown.wait() => {}
                    }
                }
            }
            // Up to `parallel` chunks stay in flight while reading goes on; all of them
            // are completed (in order) before finishing or stopping.
            let keep = if stopping || finished {
                0
            } else {
                options.parallel.max(1) - 1
            };
            while in_flight.len() > keep {
                let sent = in_flight.pop_front().expect("not empty");
                let rows = sent.chunk.len() as u64;
                complete_chunk(
                    sent,
                    &reader,
                    producer,
                    &topic,
                    table,
                    &source,
                    &mut progress,
                )
                .await?;
                record(producer, progress_topic, table, &progress).await?;
                count_chunk(
                    metrics,
                    &labels,
                    rows,
                    progress.rows,
                    reader.estimated_rows(),
                );
            }
            if stopping && !finished {
                tracing::info!(%table, rows = progress.rows, "stopped; rerun the same command to continue");
                return Ok(None);
            }
            if finished {
                progress.done = true;
                record(producer, progress_topic, table, &progress).await?;
                if let Some(metrics) = metrics {
                    metrics
                        .backfill_remaining
                        .with_label_values(&labels)
                        .set(0.0);
                }
                if options.progress_bar {
                    report_progress(
                        table,
                        &progress,
                        progress.rows as i64,
                        rows_at_start,
                        started,
                        true,
                    );
                    eprintln!();
                }
                tracing::info!(%table, rows = progress.rows, seconds = started.elapsed().as_secs_f64(), "backfill of the table finished");
                break;
            }
            let every = if options.progress_bar {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(2)
            };
            if last_report.elapsed() >= every {
                last_report = Instant::now();
                report_progress(
                    table,
                    &progress,
                    reader.estimated_rows(),
                    rows_at_start,
                    started,
                    options.progress_bar,
                );
            }
        }
        Ok(Some(progress.rows))
    }
}

fn set_table_failed(metrics: Option<&Metrics>, labels: &[String; 2], failed: bool) {
    if let Some(metrics) = metrics {
        metrics
            .backfill_failed_tables
            .with_label_values(&[&labels[0], &labels[1]])
            .set(if failed { 1 } else { 0 });
    }
}

fn count_chunk(
    metrics: Option<&Metrics>,
    labels: &[&str; 2],
    rows: u64,
    done: u64,
    estimated: i64,
) {
    if let Some(metrics) = metrics {
        metrics.backfill_rows.with_label_values(labels).inc_by(rows);
        metrics.backfill_chunks.with_label_values(labels).inc();
        let remaining = (estimated.max(0) as u64).saturating_sub(done);
        metrics
            .backfill_remaining
            .with_label_values(labels)
            .set(remaining as f64);
    }
}

/// A direct-backfill writer of either target engine.
enum Loader {
    Postgres(tidelink_postgres::direct::PgDirectLoader),
    Mysql(tidelink_mysql::direct::MysqlDirectLoader),
}

impl Loader {
    async fn progress(&mut self, table: &TableId) -> Result<DirectProgress, TidelinkError> {
        match self {
            Loader::Postgres(l) => l.progress(table).await,
            Loader::Mysql(l) => l.progress(table).await,
        }
    }

    async fn reset(&mut self, table: &TableId) -> Result<(), TidelinkError> {
        match self {
            Loader::Postgres(l) => l.reset(table).await,
            Loader::Mysql(l) => l.reset(table).await,
        }
    }

    async fn load(
        &mut self,
        table: &TableId,
        rows: &[Row],
        progress: &DirectProgress,
    ) -> Result<(), TidelinkError> {
        match self {
            Loader::Postgres(l) => l.load(table, rows, progress).await,
            Loader::Mysql(l) => l.load(table, rows, progress).await,
        }
    }
}

/// `--direct SINK`: copies each table straight into one sink's target with its bulk path
/// (COPY for PostgreSQL, LOAD DATA LOCAL INFILE for MySQL), honouring the sink's table filter
/// and renames. Progress is recorded in the target with each chunk, so a rerun continues
/// after the last loaded chunk. Meant for the first load, before that sink starts: the
/// stream's changes since then are applied on top when it does.
async fn backfill_direct(
    pipeline: &PipelineConfig,
    side: &SourceSide<'_>,
    tables: Vec<TableId>,
    sink_name: &str,
    options: &BackfillOptions,
    shutdown: &Shutdown,
) -> Result<Vec<(TableId, u64)>, TidelinkError> {
    let Some(sink) = pipeline.sinks.iter().find(|s| s.name == sink_name) else {
        let names: Vec<&str> = pipeline.sinks.iter().map(|s| s.name.as_str()).collect();
        return Err(TidelinkError::permanent(format!(
            "--direct {sink_name}: pipeline {} has no such sink (its sinks: {})",
            pipeline.name,
            names.join(", ")
        )));
    };
    let mut loader = match sink.target() {
        Some(SinkTarget::Postgres(pg)) => Loader::Postgres(
            tidelink_postgres::direct::PgDirectLoader::connect(&pg.dsn, &pg.state_schema).await?,
        ),
        Some(SinkTarget::Mysql(my)) => Loader::Mysql(
            tidelink_mysql::direct::MysqlDirectLoader::connect(&my.dsn, &my.state_database).await?,
        ),
        None => {
            return Err(TidelinkError::permanent(format!(
                "sink {sink_name}: no target configured"
            )))
        }
    };
    let mut report = Vec::new();
    for table in tables {
        if !sink.replays(&table) {
            tracing::info!(%table, sink = sink_name, "not replayed by this sink; skipping");
            continue;
        }
        let target = sink.target_table(&table);
        if options.restart {
            loader.reset(&target).await?;
        }
        let mut progress = loader.progress(&target).await?;
        if progress.done {
            tracing::info!(%table, %target, rows = progress.rows, "already loaded by an earlier run; skipping (--restart loads it again)");
            report.push((table, progress.rows));
            continue;
        }
        if progress.rows > 0 {
            tracing::info!(%table, %target, rows_done = progress.rows, "resuming after the last loaded chunk");
        }
        let reader = side.open(&table, &options.key_columns).await?;
        let estimated = reader.estimated_rows();
        let upto = reader.max_key().await?;
        let last_key = upto.clone();
        let finishes = |after: &Option<Vec<String>>| reaches(after.as_deref(), last_key.as_deref());
        // The sink's transforms apply to the rows copied, as to the changes it replays.
        let transform = sink.transform_for(&table);
        // PostgreSQL to PostgreSQL: COPY data passes through untouched, in binary where
        // the column types allow it.
        let copy_format = match (&reader, &loader, &transform) {
            (Reader::Postgres(r), Loader::Postgres(l), None) => {
                let format = l.copy_format_for(&target, r).await?;
                tracing::info!(%table, %target, ?format, "copying in COPY format");
                Some(format)
            }
            _ => None,
        };
        // MySQL family to MySQL family: rows pass as the source server's text where the
        // target's column types are the same (`MysqlDirectLoader::load_text`).
        let as_text = matches!(
            (&reader, &loader, &transform),
            (Reader::Mysql(_), Loader::Mysql(_), None)
        );
        let columns = match &reader {
            Reader::Postgres(r) => r.column_names(),
            Reader::Mysql(_) => Vec::new(),
        };
        // The reader runs ahead of the writer by up to `parallel` chunks (of COPY data: by
        // up to COPY_PIECES_AHEAD pieces, the writer copying while the reader reads).
        let (chunks, mut received) = tokio::sync::mpsc::channel::<Result<DirectChunk, TidelinkError>>(
            options.parallel.max(1),
        );
        let chunk_size = options.chunk_size;
        // Row chunks start small and double up to the chunk size, so that the target is
        // writing while the reader fills the larger chunks rather than waiting for a whole
        // first one.
        let mut rows_chunk = (chunk_size / 16).max(1);
        let mut after = progress.after.clone();
        let mut pace = ReadPace::new(options.max_rows_per_second);
        // Stopping aborts this task, sleeping in `pace` or not.
        let reading = tokio::spawn(async move {
            let Some(upto) = upto else { return };
            loop {
                if let (Reader::Postgres(r), Some(format)) = (&reader, copy_format) {
                    let read =
                        stream_copy_chunk(r, after.as_deref(), &upto, chunk_size, format, &chunks);
                    match read.await {
                        Some(last) if !reaches(Some(&last), Some(&upto)) => after = Some(last),
                        _ => return,
                    }
                    // Every chunk but the last is full.
                    pace.read(chunk_size).await;
                    continue;
                }
                let reading_since = Instant::now();
                let chunk = match (&reader, as_text) {
                    (Reader::Mysql(r), true) => r
                        .text_chunk(after.as_deref(), Some(&upto), rows_chunk)
                        .await
                        .map(DirectChunk::Text),
                    _ => reader
                        .chunk(after.as_deref(), Some(&upto), rows_chunk)
                        .await
                        .map(DirectChunk::Rows),
                };
                rows_chunk = (rows_chunk * 2).min(chunk_size);
                let rows = chunk.as_ref().map_or(0, DirectChunk::rows);
                tracing::debug!(
                    rows,
                    seconds = reading_since.elapsed().as_secs_f64(),
                    "chunk read"
                );
                let last = match &chunk {
                    Ok(_) if rows == 0 => return,
                    Ok(c) => c.last_key(),
                    Err(_) => None,
                };
                let failed = chunk.is_err();
                let finished = reaches(last.as_deref(), Some(&upto));
                if chunks.send(chunk).await.is_err() || failed || finished {
                    return;
                }
                after = last;
                pace.read(rows).await;
            }
        });
        let started = Instant::now();
        let rows_at_start = progress.rows;
        let mut last_report = Instant::now();
        while let Some(chunk) = received.recv().await {
            match chunk? {
                DirectChunk::Rows(chunk) => {
                    progress.rows += chunk.len() as u64;
                    progress.after = chunk.last().map(|(_, _, k)| k.clone());
                    progress.done = finishes(&progress.after);
                    let rows = match &transform {
                        None => chunk.into_iter().map(|(_, image, _)| image).collect(),
                        Some(transform) => transformed_rows(&table, transform, chunk)?,
                    };
                    let loading_since = Instant::now();
                    loader.load(&target, &rows, &progress).await?;
                    tracing::debug!(
                        rows = rows.len(),
                        seconds = loading_since.elapsed().as_secs_f64(),
                        "chunk loaded"
                    );
                }
                DirectChunk::Text(chunk) => {
                    let Loader::Mysql(l) = &mut loader else {
                        unreachable!("text chunks are only read for a MySQL-family target")
                    };
                    progress.rows += chunk.len() as u64;
                    progress.after = chunk.last_key.clone();
                    progress.done = finishes(&progress.after);
                    l.load_text(&target, &chunk, &progress).await?;
                }
                DirectChunk::Copy { format, mut pieces } => {
                    let Loader::Postgres(l) = &mut loader else {
                        unreachable!("COPY data is only read for a PostgreSQL target")
                    };
                    let mut copy = l.begin_copy_rows(&target, &columns, format).await?;
                    match copy_pieces(&table, &mut pieces, &mut copy, &mut progress).await {
                        Ok(()) => {
                            progress.done = finishes(&progress.after);
                            copy.commit(&progress).await?
                        }
                        Err(e) => {
                            copy.abort().await;
                            return Err(e);
                        }
                    }
                }
            }
            if shutdown.is_triggered() {
                reading.abort();
                tracing::info!(%table, rows = progress.rows, "stopped; rerun the same command to continue");
                return Ok(report);
            }
            let every = if options.progress_bar {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(2)
            };
            if last_report.elapsed() >= every {
                last_report = Instant::now();
                let shown = TableProgress {
                    after: None,
                    rows: progress.rows,
                    done: false,
                    visibility: None,
                    binlog_snapshot: None,
                    error: None,
                };
                report_progress(
                    &table,
                    &shown,
                    estimated,
                    rows_at_start,
                    started,
                    options.progress_bar,
                );
            }
        }
        reading
            .await
            .map_err(|e| TidelinkError::permanent(format!("reading {table} failed: {e}")))?;
        if !progress.done {
            // The table ended before its last key (rows deleted meanwhile) or was empty.
            progress.done = true;
            loader.load(&target, &[], &progress).await?;
        }
        if options.progress_bar {
            let shown = TableProgress {
                after: None,
                rows: progress.rows,
                done: true,
                visibility: None,
                binlog_snapshot: None,
                error: None,
            };
            report_progress(
                &table,
                &shown,
                progress.rows as i64,
                rows_at_start,
                started,
                true,
            );
            eprintln!();
        }
        tracing::info!(%table, %target, rows = progress.rows, seconds = started.elapsed().as_secs_f64(), "direct backfill of the table finished");
        report.push((table, progress.rows));
    }
    Ok(report)
}

/// Whether a chunk whose last key is `last` reaches `upto`, the table's last key when the
/// load began. That chunk finishes the table: it records `done` itself, and the reader stops
/// after it instead of reading one more (empty) range.
fn reaches(last: Option<&[String]>, upto: Option<&[String]>) -> bool {
    last.is_some() && last == upto
}

/// A chunk's rows as the sink's transform leaves them: filtered, then shaped.
fn transformed_rows(
    table: &TableId,
    transform: &tidelink_core::TableTransform,
    chunk: Chunk,
) -> Result<Vec<Row>, TidelinkError> {
    let mut rows = Vec::with_capacity(chunk.len());
    for (key, image, _) in chunk {
        transform.check_key(&key).map_err(|reason| {
            TidelinkError::permanent(format!("transform of {table}: {reason}"))
        })?;
        rows.extend(transform.transformed(image));
    }
    Ok(rows)
}

/// A chunk on its way from the source reader to a direct loader.
enum DirectChunk {
    /// Rows as JSON images.
    Rows(Chunk),
    /// Rows of a MySQL-family source as its server's text.
    Text(tidelink_mysql::backfill::TextChunk),
    /// PostgreSQL `COPY` data of every column, arriving in pieces while it is read.
    Copy {
        format: CopyFormat,
        pieces: tokio::sync::mpsc::Receiver<Result<CopyPiece, TidelinkError>>,
    },
}

impl DirectChunk {
    /// Rows in a chunk of rows (a `COPY` chunk counts its rows as they arrive).
    fn rows(&self) -> usize {
        match self {
            DirectChunk::Rows(chunk) => chunk.len(),
            DirectChunk::Text(chunk) => chunk.len(),
            DirectChunk::Copy { .. } => 0,
        }
    }

    /// The last row's key position, of a chunk of rows.
    fn last_key(&self) -> Option<Vec<String>> {
        match self {
            DirectChunk::Rows(chunk) => chunk.last().map(|(_, _, k)| k.clone()),
            DirectChunk::Text(chunk) => chunk.last_key.clone(),
            DirectChunk::Copy { .. } => None,
        }
    }
}

/// Part of a chunk of `COPY` data.
enum CopyPiece {
    /// Whole rows.
    Data(bytes::Bytes),
    /// The chunk is read: how many rows it held and the last one's key.
    End {
        rows: usize,
        last: Option<Vec<String>>,
    },
}

/// How many pieces of `COPY` data (about 256 KiB each) the reader may run ahead.
const COPY_PIECES_AHEAD: usize = 16;

/// Reads one chunk as `COPY` data in `format`: sends the chunk once its first piece is read
/// (nothing for an empty range), then its pieces and its end, so the writer copies while
/// the reader reads. Returns the chunk's last key; `None` when no rows are left, reading
/// failed (the writer gets the error) or the writer is gone.
async fn stream_copy_chunk(
    reader: &tidelink_postgres::backfill::TableReader,
    after: Option<&[String]>,
    upto: &[String],
    limit: usize,
    format: CopyFormat,
    chunks: &tokio::sync::mpsc::Sender<Result<DirectChunk, TidelinkError>>,
) -> Option<Vec<String>> {
    let mut copy = match reader.copy_chunk(after, Some(upto), limit, format).await {
        Ok(copy) => copy,
        Err(e) => {
            let _ = chunks.send(Err(e)).await;
            return None;
        }
    };
    let mut next = match copy.next_piece().await {
        Ok(Some(text)) => Ok(Some(text)),
        Ok(None) => return None,
        Err(e) => {
            let _ = chunks.send(Err(e)).await;
            return None;
        }
    };
    let (pieces, received) = tokio::sync::mpsc::channel(COPY_PIECES_AHEAD);
    chunks
        .send(Ok(DirectChunk::Copy {
            format,
            pieces: received,
        }))
        .await
        .ok()?;
    loop {
        match next {
            Ok(Some(text)) => pieces.send(Ok(CopyPiece::Data(text))).await.ok()?,
            Ok(None) => {
                let last = match copy.last_key() {
                    Ok(last) => last,
                    Err(e) => {
                        let _ = pieces.send(Err(e)).await;
                        return None;
                    }
                };
                let end = CopyPiece::End {
                    rows: copy.rows(),
                    last: last.clone(),
                };
                pieces.send(Ok(end)).await.ok()?;
                return last;
            }
            Err(e) => {
                let _ = pieces.send(Err(e)).await;
                return None;
            }
        }
        next = copy.next_piece().await;
    }
}

/// Sends a chunk's pieces into its copy as they arrive and moves `progress` past the chunk.
async fn copy_pieces(
    table: &TableId,
    pieces: &mut tokio::sync::mpsc::Receiver<Result<CopyPiece, TidelinkError>>,
    copy: &mut tidelink_postgres::direct::CopyLoad<'_>,
    progress: &mut DirectProgress,
) -> Result<(), TidelinkError> {
    loop {
        match pieces.recv().await {
            Some(Ok(CopyPiece::Data(text))) => copy.send(text).await?,
            Some(Ok(CopyPiece::End { rows, last })) => {
                progress.rows += rows as u64;
                progress.after = last;
                return Ok(());
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(TidelinkError::permanent(format!(
                    "reading a chunk of {table} stopped before its end"
                )))
            }
        }
    }
}

/// A chunk whose read events were sent to Kafka.
struct SentChunk {
    chunk: Chunk,
    deliveries: Vec<tidelink_kafka::producer::PendingDelivery>,
}

/// Waits for a chunk's acknowledgements, sends deletes for keys gone since the chunk was
/// read, and moves `progress` past it (the caller records it).
async fn complete_chunk(
    sent: SentChunk,
    reader: &Reader,
    producer: &EventProducer,
    topic: &str,
    table: &TableId,
    source: &impl Fn(i64) -> SourceInfo,
    progress: &mut TableProgress,
) -> Result<(), TidelinkError> {
    for delivery in sent.deliveries {
        delivery.acknowledged().await?;
    }
    // Rows deleted since the chunk was read get a delete after their snapshot. The deletes
    // are sent together and acknowledged before the chunk counts as done, not one round
    // trip each: a snapshot beside a workload that deletes much sends many.
    let keys: Vec<Vec<String>> = sent.chunk.iter().map(|(_, _, k)| k.clone()).collect();
    let existing = reader.existing(&keys).await?;
    let mut deletes = Vec::new();
    for ((key, _, _), exists) in sent.chunk.iter().zip(existing) {
        if !exists {
            let event = ChangeEvent {
                table: table.clone(),
                op: Op::Delete,
                key: key.clone(),
                before: Some(key.clone()),
                after: None,
                source: source(now_ms()),
                columns: None,
            };
            let (key, value) = encode_change(&event, now_ms());
            deletes.push(
                producer
                    .send(topic, key.as_deref(), &value, None, None)
                    .await?,
            );
        }
    }
    for delivery in deletes {
        delivery.acknowledged().await?;
    }
    progress.rows += sent.chunk.len() as u64;
    progress.after = sent.chunk.last().map(|(_, _, k)| k.clone());
    Ok(())
}

pub(crate) async fn record(
    producer: &EventProducer,
    topic: &str,
    table: &TableId,
    progress: &TableProgress,
) -> Result<(), TidelinkError> {
    let value = serde_json::to_vec(progress).expect("progress serializes");
    producer
        .send(
            topic,
            Some(table.to_string().as_bytes()),
            &value,
            None,
            None,
        )
        .await?
        .acknowledged()
        .await
        .map(|_| ())
}

fn report_progress(
    table: &TableId,
    progress: &TableProgress,
    estimated: i64,
    rows_at_start: u64,
    started: Instant,
    bar: bool,
) {
    let copied_now = progress.rows.saturating_sub(rows_at_start) as f64;
    let rate = copied_now / started.elapsed().as_secs_f64().max(0.001);
    let total = (estimated.max(0) as u64).max(progress.rows);
    let remaining = total.saturating_sub(progress.rows) as f64;
    let eta = if rate > 0.0 { remaining / rate } else { 0.0 };
    let percent = if total > 0 {
        progress.rows as f64 * 100.0 / total as f64
    } else {
        100.0
    };
    if bar {
        let filled = ((percent / 100.0 * 30.0).round() as usize).min(30);
        eprint!(
            "\r{table} [{}{}] {percent:>3.0}%  {}/{} rows  {rate:.0} rows/s  ETA {eta:.0}s   ",
            "#".repeat(filled),
            "-".repeat(30 - filled),
            progress.rows,
            total
        );
        return;
    }
    tracing::info!(
        %table,
        rows = progress.rows,
        estimated_total = total,
        "backfill {percent:.0}%  {:.0} rows/s  ETA {eta:.0}s",
        rate
    );
}

#[cfg(test)]
mod tests {
    use super::ReadPace;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn a_rate_limit_holds_reading_to_it_and_none_does_not_wait() {
        let started = Instant::now();
        let mut held = ReadPace::new(Some(1000));
        for _ in 0..3 {
            held.read(100).await;
        }
        // 300 rows at 1,000 rows/s end 0.3 s after the start.
        assert!(started.elapsed() >= Duration::from_millis(300));

        let started = Instant::now();
        let mut free = ReadPace::new(None);
        free.read(1_000_000).await;
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
