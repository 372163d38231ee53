//! The snapshot of a PostgreSQL table without a key (REPLICA IDENTITY FULL, no primary
//! key): one consistent read of the whole table while the stream waits.
//!
//! # Why it is right
//! Such a table's rows can be equal, so the key-range snapshot (insert a row where the
//! target has none with its key, re-check keys after each chunk) cannot work for it.
//! Instead, before the source streams anything, the table is read whole in one
//! `REPEATABLE READ` transaction, after a truncate that empties the target of whatever an
//! earlier attempt left. Everything of such a table goes to partition 0 of its topic, so
//! a sink sees the truncate, then the rows, then the stream's changes, in that order. The
//! stream then leaves out the changes of every transaction that snapshot saw
//! ([`SnapshotVisibility::sees`]): they are in the rows already. Every other transaction
//! committed after the snapshot was taken, hence after the slot existed, so the stream
//! delivers it, after the rows.
//!
//! The snapshot's visibility is recorded with the table's progress in
//! `<prefix>.backfill`, so after a restart the stream leaves out the same transactions. A
//! copy that did not finish is done again from the start (with its truncate first).
//!
//! The stream waits while the table is read: a large table without a key delays every
//! table's changes by the time its copy takes.

use crate::backfill::{progress_topic, TableProgress};
use crate::publisher::{now_ms, publish_definitions};
use crate::{Metrics, Shutdown};
use std::sync::Arc;
use std::time::Instant;
use tidelink_config::PipelineConfig;
use tidelink_core::{ChangeEvent, Op, Row, SourceInfo, TableId, TidelinkError};
use tidelink_kafka::topics::topic_of;
use tidelink_kafka::{admin, encode_change, EventProducer};
use tidelink_postgres::backfill::{SnapshotVisibility, TableReader};

/// Rows read and sent per round trip.
const ROWS_PER_FETCH: usize = 5000;

/// Each table with the progress `<prefix>.backfill` records for it.
async fn recorded_progress(
    pipeline: &PipelineConfig,
    tables: &[TableId],
) -> Result<Vec<(TableId, Option<TableProgress>)>, TidelinkError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let kafka = &pipeline.kafka;
    let progress_topic = progress_topic(&kafka.topic_prefix);
    admin::ensure_compacted_topic(kafka, &progress_topic).await?;
    let recorded = admin::read_latest_by_key(kafka, &progress_topic).await?;
    Ok(tables
        .iter()
        .map(|table| {
            let progress = recorded
                .get(&table.to_string())
                .and_then(|bytes| serde_json::from_slice(bytes).ok());
            (table.clone(), progress)
        })
        .collect())
}

/// Copies each of `tables` (PostgreSQL tables without a key) unless an earlier run did
/// (`restart`: copy them all again), and returns each table's snapshot visibility, which
/// the stream must leave out.
pub(crate) async fn snapshot_whole_tables(
    pipeline: &PipelineConfig,
    dsn: &str,
    tables: &[TableId],
    restart: bool,
    producer: &EventProducer,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<Vec<(TableId, SnapshotVisibility)>, TidelinkError> {
    let mut schemas_topic_ready = false;
    let mut seen = Vec::new();
    for (table, progress) in recorded_progress(pipeline, tables).await? {
        let table = &table;
        if let Some(TableProgress {
            done: true,
            visibility: Some(visibility),
            ..
        }) = progress.filter(|_| !restart)
        {
            seen.push((table.clone(), visibility));
            continue;
        }
        if shutdown.is_triggered() {
            break;
        }
        let visibility = copy_table(
            pipeline,
            dsn,
            table,
            producer,
            &mut schemas_topic_ready,
            metrics,
        )
        .await
        .map_err(|e| e.context(format!("snapshot of {table} (a table without a key)")))?;
        seen.push((table.clone(), visibility));
    }
    Ok(seen)
}

async fn copy_table(
    pipeline: &PipelineConfig,
    dsn: &str,
    table: &TableId,
    producer: &EventProducer,
    schemas_topic_ready: &mut bool,
    metrics: &Metrics,
) -> Result<SnapshotVisibility, TidelinkError> {
    let reader = TableReader::open_whole(dsn, table).await?;
    let database = tidelink_postgres::connection::parse_dsn(dsn)?
        .get_dbname()
        .unwrap_or("postgres")
        .to_string();
    let mut copy = WholeCopy::start(
        pipeline,
        table,
        ("postgresql", &database),
        &reader.definitions,
        reader.estimated_rows,
        producer,
        schemas_topic_ready,
        metrics,
    )
    .await?;
    let visibility = reader.begin_consistent().await?;
    loop {
        let chunk = reader.fetch_consistent(ROWS_PER_FETCH).await?;
        if chunk.is_empty() {
            break;
        }
        copy.rows(chunk).await?;
    }
    reader.end_consistent().await?;
    copy.finish(TableProgress {
        visibility: Some(visibility.clone()),
        ..TableProgress::default()
    })
    .await?;
    Ok(visibility)
}

/// Copies each of `tables` (MySQL-family tables without a key) unless an earlier run did
/// (`restart`: copy them all again), and returns for each the binlog place its snapshot
/// matched: the stream leaves out the table's rows events before it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn snapshot_whole_mysql_tables(
    pipeline: &PipelineConfig,
    dsn: &str,
    server_id: u32,
    tables: &[TableId],
    restart: bool,
    producer: &EventProducer,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<Vec<(TableId, BinlogSnapshot)>, TidelinkError> {
    let mut schemas_topic_ready = false;
    let mut seen = Vec::new();
    for (table, progress) in recorded_progress(pipeline, tables).await? {
        let table = &table;
        if let Some(TableProgress {
            done: true,
            binlog_snapshot: Some(place),
            ..
        }) = progress.filter(|_| !restart)
        {
            seen.push((table.clone(), place));
            continue;
        }
        if shutdown.is_triggered() {
            break;
        }
        let place = copy_mysql_table(
            pipeline,
            (dsn, server_id),
            table,
            producer,
            &mut schemas_topic_ready,
            metrics,
        )
        .await
        .map_err(|e| e.context(format!("snapshot of {table} (a table without a key)")))?;
        seen.push((table.clone(), place));
    }
    Ok(seen)
}

async fn copy_mysql_table(
    pipeline: &PipelineConfig,
    (dsn, server_id): (&str, u32),
    table: &TableId,
    producer: &EventProducer,
    schemas_topic_ready: &mut bool,
    metrics: &Metrics,
) -> Result<BinlogSnapshot, TidelinkError> {
    let reader = tidelink_mysql::backfill::TableReader::open_whole(dsn, table).await?;
    let mut copy = WholeCopy::start(
        pipeline,
        table,
        ("mysql", &table.schema),
        &reader.definitions,
        reader.estimated_rows,
        producer,
        schemas_topic_ready,
        metrics,
    )
    .await?;
    let (file, pos) = reader.begin_consistent().await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Row>>(2);
    let read = reader.stream_consistent(ROWS_PER_FETCH, tx);
    let publish = async {
        while let Some(rows) = rx.recv().await {
            copy.rows(rows.into_iter().map(|r| (r.clone(), r)).collect())
                .await?;
        }
        Ok::<(), TidelinkError>(())
    };
    let (read, published) = tokio::join!(read, publish);
    read?;
    published?;
    reader.end_consistent().await?;
    let place = BinlogSnapshot {
        server_id,
        file,
        pos,
    };
    copy.finish(TableProgress {
        binlog_snapshot: Some(place.clone()),
        ..TableProgress::default()
    })
    .await?;
    Ok(place)
}

/// The binlog place a MySQL-family consistent snapshot matched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct BinlogSnapshot {
    /// The server whose binlog the place is in.
    pub(crate) server_id: u32,
    /// Binlog file.
    pub(crate) file: String,
    /// Position in it.
    pub(crate) pos: u64,
}

/// One whole-table copy on its way to Kafka: a truncate first, then the rows, all in
/// partition 0, then the recorded progress.
struct WholeCopy<'a> {
    pipeline: &'a PipelineConfig,
    table: &'a TableId,
    topic: String,
    block: SourceInfo,
    definitions: Arc<tidelink_core::TableColumns>,
    estimated_rows: i64,
    producer: &'a EventProducer,
    metrics: &'a Metrics,
    labels: [String; 2],
    rows: u64,
    started: Instant,
    previous: Vec<tidelink_kafka::producer::PendingDelivery>,
}

impl<'a> WholeCopy<'a> {
    #[allow(clippy::too_many_arguments)]
    async fn start(
        pipeline: &'a PipelineConfig,
        table: &'a TableId,
        (connector, database): (&str, &str),
        definitions: &Arc<tidelink_core::TableColumns>,
        estimated_rows: i64,
        producer: &'a EventProducer,
        schemas_topic_ready: &mut bool,
        metrics: &'a Metrics,
    ) -> Result<WholeCopy<'a>, TidelinkError> {
        let kafka = &pipeline.kafka;
        let topic = topic_of(kafka, &table.schema, &table.name);
        admin::ensure_topics(kafka, std::slice::from_ref(&topic)).await?;
        publish_definitions(
            producer,
            kafka,
            schemas_topic_ready,
            &mut None,
            table,
            definitions,
        )
        .await?;
        let block = SourceInfo {
            version: Arc::from(env!("CARGO_PKG_VERSION")),
            connector: Arc::from(connector),
            name: Arc::from(pipeline.name.as_str()),
            snapshot: Arc::from("true"),
            db: Arc::from(database),
            schema: table.schema.clone(),
            table: table.name.clone(),
            ..Default::default()
        };
        tracing::info!(pipeline = %pipeline.name, %table, estimated_rows,
            "copying a table without a key in one consistent read; the stream waits until it is done");
        let copy = Self {
            pipeline,
            table,
            topic,
            block,
            definitions: definitions.clone(),
            estimated_rows,
            producer,
            metrics,
            labels: [pipeline.name.clone(), table.to_string()],
            rows: 0,
            started: Instant::now(),
            previous: Vec::new(),
        };
        // Whatever an earlier attempt sent of this table is cleared first.
        let (_, value) = encode_change(&copy.event(Op::Truncate, Row::new(), None), now_ms());
        producer
            .send(&copy.topic, None, &value, Some(0), None)
            .await?
            .acknowledged()
            .await?;
        Ok(copy)
    }

    fn event(&self, op: Op, key: Row, after: Option<Row>) -> ChangeEvent {
        ChangeEvent {
            table: self.table.clone(),
            op,
            key,
            before: None,
            after,
            source: SourceInfo {
                ts_ms: now_ms(),
                ..self.block.clone()
            },
            columns: Some(self.definitions.clone()),
        }
    }

    /// Sends a chunk of (key, image) rows; the previous chunk is acknowledged meanwhile.
    async fn rows(&mut self, chunk: Vec<(Row, Row)>) -> Result<(), TidelinkError> {
        let mut sent = Vec::with_capacity(chunk.len());
        for (key, image) in chunk {
            let (key, value) = encode_change(&self.event(Op::Read, key, Some(image)), now_ms());
            sent.push(
                self.producer
                    .send(&self.topic, key.as_deref(), &value, Some(0), None)
                    .await?,
            );
        }
        for delivery in std::mem::replace(&mut self.previous, sent) {
            delivery.acknowledged().await?;
        }
        let labels = [self.labels[0].as_str(), self.labels[1].as_str()];
        let count = self.previous.len() as u64;
        self.rows += count;
        self.metrics
            .backfill_rows
            .with_label_values(&labels)
            .inc_by(count);
        self.metrics
            .backfill_chunks
            .with_label_values(&labels)
            .inc();
        let remaining = (self.estimated_rows.max(0) as u64).saturating_sub(self.rows);
        self.metrics
            .backfill_remaining
            .with_label_values(&labels)
            .set(remaining as f64);
        Ok(())
    }

    /// Waits for the last rows' acknowledgements and records the table as done.
    async fn finish(self, progress: TableProgress) -> Result<(), TidelinkError> {
        for delivery in self.previous {
            delivery.acknowledged().await?;
        }
        let labels = [self.labels[0].as_str(), self.labels[1].as_str()];
        self.metrics
            .backfill_remaining
            .with_label_values(&labels)
            .set(0.0);
        let progress = TableProgress {
            rows: self.rows,
            done: true,
            ..progress
        };
        crate::backfill::record(
            self.producer,
            &progress_topic(&self.pipeline.kafka.topic_prefix),
            self.table,
            &progress,
        )
        .await?;
        tracing::info!(pipeline = %self.pipeline.name, table = %self.table, rows = self.rows,
            seconds = self.started.elapsed().as_secs_f64(),
            "snapshot of the table without a key finished; streaming resumes");
        Ok(())
    }
}
