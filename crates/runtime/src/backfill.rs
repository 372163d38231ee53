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
//! created together with it), so the stream delivers them.
//!
//! # Resuming
//! After each chunk the last key is recorded in the compacted topic `<prefix>.backfill`
//! (keyed by table). A rerun of the same command continues after it and skips finished
//! tables (`--restart` copies them again).

use crate::publisher::{now_ms, publish_definitions};
use crate::{Metrics, Shutdown};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tidelink_config::{PipelineConfig, SourceKind};
use tidelink_core::{ChangeEvent, Op, SourceInfo, TableId, TidelinkError};
use tidelink_core::{Row, TableColumns};
use tidelink_kafka::topics::table_topic;
use tidelink_kafka::{admin, encode_change, EventProducer};

/// A table reader of either source engine.
enum Reader {
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

    fn estimated_rows(&self) -> i64 {
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

    async fn chunk(
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
}

/// What a backfill needs to know of the pipeline's source.
struct SourceSide<'a> {
    connector: &'static str,
    database: String,
    kind: SourceKind<'a>,
}

impl SourceSide<'_> {
    async fn tables(&self, pipeline: &PipelineConfig) -> Result<Vec<TableId>, TidelinkError> {
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

    async fn open(&self, table: &TableId) -> Result<Reader, TidelinkError> {
        Ok(match self.kind {
            SourceKind::Postgres(pg) => Reader::Postgres(
                tidelink_postgres::backfill::TableReader::open(&pg.dsn, table).await?,
            ),
            SourceKind::Mysql(my) => {
                Reader::Mysql(tidelink_mysql::backfill::TableReader::open(&my.dsn, table).await?)
            }
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
}

/// Progress of one table, as recorded after each chunk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TableProgress {
    /// Key (text form) of the last row copied.
    after: Option<Vec<String>>,
    /// Rows copied so far.
    rows: u64,
    /// The table is finished.
    done: bool,
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
    let side = match pipeline.source.kind() {
        Some(kind @ SourceKind::Postgres(pg)) => SourceSide {
            connector: "postgresql",
            database: tidelink_postgres::connection::parse_dsn(&pg.dsn)?
                .get_dbname()
                .unwrap_or("postgres")
                .to_string(),
            kind,
        },
        Some(kind @ SourceKind::Mysql(_)) => SourceSide {
            connector: "mysql",
            database: String::new(),
            kind,
        },
        None => {
            return Err(TidelinkError::permanent(format!(
                "pipeline {}: no source configured",
                pipeline.name
            )))
        }
    };
    let tables = if options.tables.is_empty() {
        side.tables(pipeline).await?
    } else {
        options
            .tables
            .iter()
            .map(|t| match t.split_once('.') {
                Some((schema, name)) if !schema.is_empty() && !name.is_empty() => {
                    Ok(TableId::new(schema, name))
                }
                _ => Err(TidelinkError::permanent(format!(
                    "--table {t}: write it schema.table"
                ))),
            })
            .collect::<Result<_, _>>()?
    };
    let kafka = &pipeline.kafka;
    let producer = EventProducer::new(kafka)?;
    let progress_topic = progress_topic(&kafka.topic_prefix);
    admin::ensure_compacted_topic(kafka, &progress_topic).await?;
    let recorded: HashMap<String, Vec<u8>> =
        admin::read_latest_by_key(kafka, &progress_topic).await?;
    let mut definitions = HashMap::new();
    let mut report = Vec::new();
    for table in tables {
        let mut progress: TableProgress = recorded
            .get(&table.to_string())
            .and_then(|bytes| serde_json::from_slice(bytes).ok())
            .unwrap_or_default();
        if options.restart {
            progress = TableProgress::default();
        }
        if progress.done {
            tracing::info!(%table, rows = progress.rows, "already backfilled by an earlier run; skipping (--restart copies it again)");
            report.push((table, progress.rows));
            continue;
        }
        if progress.rows > 0 {
            tracing::info!(%table, rows_done = progress.rows, "resuming after the last completed chunk");
        }
        let reader = side.open(&table).await?;
        let topic = table_topic(&kafka.topic_prefix, &table.schema, &table.name);
        admin::ensure_topics(kafka, std::slice::from_ref(&topic)).await?;
        publish_definitions(
            &producer,
            kafka,
            &mut definitions,
            &table,
            reader.definitions(),
        )
        .await?;
        let source = |op_ts: i64| SourceInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            connector: side.connector.into(),
            name: pipeline.name.clone(),
            ts_ms: op_ts,
            snapshot: "true".into(),
            db: if side.database.is_empty() {
                table.schema.clone()
            } else {
                side.database.clone()
            },
            schema: table.schema.clone(),
            table: table.name.clone(),
            tx_id: None,
            lsn: None,
            ..Default::default()
        };
        // Rows with larger keys are inserted after this point and reach sinks through the
        // stream: the copy stops at the largest key there is now.
        let upto = reader.max_key().await?;
        let started = Instant::now();
        let rows_at_start = progress.rows;
        let mut last_report = Instant::now();
        let table_label = table.to_string();
        let labels = [pipeline.name.as_str(), table_label.as_str()];
        loop {
            if shutdown.is_triggered() {
                tracing::info!(%table, rows = progress.rows, "stopped; rerun the same command to continue");
                return Ok(report);
            }
            // An empty table has nothing to copy: every row it gets is streamed.
            let chunk = match &upto {
                None => Vec::new(),
                Some(upto) => {
                    reader
                        .chunk(progress.after.as_deref(), Some(upto), options.chunk_size)
                        .await?
                }
            };
            if chunk.is_empty() {
                progress.done = true;
                record(&producer, &progress_topic, &table, &progress).await?;
                if let Some(metrics) = metrics {
                    metrics
                        .backfill_remaining
                        .with_label_values(&labels)
                        .set(0.0);
                }
                if options.progress_bar {
                    report_progress(
                        &table,
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
            for delivery in deliveries {
                delivery.acknowledged().await?;
            }
            // Rows deleted since the chunk was read get a delete after their snapshot.
            let keys: Vec<Vec<String>> = chunk.iter().map(|(_, _, k)| k.clone()).collect();
            let existing = reader.existing(&keys).await?;
            for ((key, _, _), exists) in chunk.iter().zip(existing) {
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
                    producer
                        .send(&topic, key.as_deref(), &value, None, None)
                        .await?
                        .acknowledged()
                        .await?;
                }
            }
            progress.rows += chunk.len() as u64;
            progress.after = chunk.last().map(|(_, _, k)| k.clone());
            record(&producer, &progress_topic, &table, &progress).await?;
            if let Some(metrics) = metrics {
                metrics
                    .backfill_rows
                    .with_label_values(&labels)
                    .inc_by(chunk.len() as u64);
                metrics.backfill_chunks.with_label_values(&labels).inc();
                let remaining =
                    (reader.estimated_rows().max(0) as u64).saturating_sub(progress.rows);
                metrics
                    .backfill_remaining
                    .with_label_values(&labels)
                    .set(remaining as f64);
            }
            let every = if options.progress_bar {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(2)
            };
            if last_report.elapsed() >= every {
                last_report = Instant::now();
                report_progress(
                    &table,
                    &progress,
                    reader.estimated_rows(),
                    rows_at_start,
                    started,
                    options.progress_bar,
                );
            }
        }
        report.push((table, progress.rows));
    }
    Ok(report)
}

async fn record(
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
