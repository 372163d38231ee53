//! `tidelink status`: where each pipeline stands, read from the systems themselves (the
//! source's slot, Kafka's watermarks, the offsets each sink recorded in its target), so it
//! works whether or not tidelink is running and from any machine that reaches them.

use serde::Serialize;
use tidelink_config::{Config, SinkTarget, SourceKind};
use tidelink_core::TidelinkError;
use tidelink_kafka::admin::watermarks;
use tidelink_kafka::topics::is_table_topic;
use tidelink_postgres::sink::recorded_offsets;
use tidelink_postgres::source::{slot_status, SlotStatus};

/// The status of every pipeline.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Per pipeline.
    pub pipelines: Vec<PipelineStatus>,
}

/// One pipeline.
#[derive(Debug, Serialize)]
pub struct PipelineStatus {
    /// Pipeline name.
    pub name: String,
    /// The source's slot, or why it could not be read.
    pub source: SourceState,
    /// Per sink.
    pub sinks: Vec<SinkStatus>,
    /// The snapshot of each table, as recorded in `<prefix>.backfill` (empty before the
    /// first snapshot).
    pub snapshot: Vec<crate::backfill::TableSnapshot>,
}

/// The source's slot, or why it could not be read.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum SourceState {
    /// The slot as the server reports it.
    Slot(SlotStatus),
    /// A MySQL-family source: the position tidelink stored, and the server's current one.
    Binlog {
        /// Stored position (`None`: the pipeline never ran).
        stored_position: Option<String>,
        /// The server's current binlog file and position.
        current_position: Option<String>,
    },
    /// The source could not be reached or read.
    Unavailable {
        /// Why.
        error: String,
    },
}

/// One sink.
#[derive(Debug, Serialize)]
pub struct SinkStatus {
    /// Sink name.
    pub name: String,
    /// Consumer group.
    pub group: String,
    /// Per partition of the pipeline's topics.
    pub partitions: Vec<PartitionStatus>,
    /// Messages not yet applied, over all partitions.
    pub total_lag: i64,
    /// When the sink last committed a batch (UTC), if ever.
    pub last_applied: Option<String>,
    /// Messages in the dead-letter topic.
    pub dead_letters: i64,
    /// What could not be read, if anything.
    pub error: Option<String>,
}

/// One partition of a sink.
#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Next offset Kafka will write.
    pub high_watermark: i64,
    /// Next offset the sink will apply (`None`: nothing applied yet).
    pub next_offset: Option<i64>,
    /// Messages not yet applied.
    pub lag: i64,
}

/// Reads the status of the selected pipelines.
pub async fn collect(config: &Config, only: Option<&str>) -> Result<Status, TidelinkError> {
    let mut pipelines = Vec::new();
    for pipeline in config
        .pipelines
        .iter()
        .filter(|p| only.is_none_or(|n| n == p.name))
    {
        let source =
            match pipeline.source.kind() {
                Some(SourceKind::Postgres(pg)) => {
                    match slot_status(&pg.dsn, &pg.slot_name(&pipeline.name)).await {
                        Ok(slot) => SourceState::Slot(slot),
                        Err(e) => SourceState::Unavailable { error: e.message },
                    }
                }
                Some(SourceKind::Mysql(my)) => {
                    let stored = crate::position_store::load_position::<
                        tidelink_mysql::BinlogPosition,
                    >(&pipeline.kafka, &pipeline.name)
                    .await;
                    match stored {
                        Ok(stored) => SourceState::Binlog {
                            stored_position: stored.map(|p| p.to_string()),
                            current_position: tidelink_mysql::source::current_position(&my.dsn)
                                .await
                                .ok(),
                        },
                        Err(e) => SourceState::Unavailable { error: e.message },
                    }
                }
                None => SourceState::Unavailable {
                    error: "no source configured".into(),
                },
            };
        let prefix = pipeline.kafka.topic_prefix.clone();
        let table_marks = watermarks(&pipeline.kafka, move |t| is_table_topic(&prefix, t)).await;
        let mut sinks = Vec::new();
        for sink in &pipeline.sinks {
            let group = sink.group_id(&pipeline.name);
            let dlq = sink.dead_letter_topic(&pipeline.name, &pipeline.kafka);
            let mut status = SinkStatus {
                name: sink.name.clone(),
                group: group.clone(),
                partitions: Vec::new(),
                total_lag: 0,
                last_applied: None,
                dead_letters: 0,
                error: None,
            };
            let marks = match &table_marks {
                Ok(m) => m,
                Err(e) => {
                    status.error = Some(e.message.clone());
                    sinks.push(status);
                    continue;
                }
            };
            let recorded = match sink.target() {
                Some(SinkTarget::Postgres(pg)) => {
                    recorded_offsets(&pg.dsn, &pg.state_schema, &group).await
                }
                Some(SinkTarget::Mysql(my)) => {
                    tidelink_mysql::sink::recorded_offsets(&my.dsn, &my.state_database, &group)
                        .await
                }
                None => Err(TidelinkError::permanent("no target configured")),
            };
            let recorded = match recorded {
                Ok(r) => r,
                Err(e) => {
                    status.error = Some(e.message);
                    Vec::new()
                }
            };
            for mark in marks {
                let stored = recorded
                    .iter()
                    .find(|(t, p, _, _)| t == &mark.topic && *p == mark.partition);
                let next = stored.map(|(_, _, n, _)| *n);
                let lag = (mark.high - next.unwrap_or(mark.low)).max(0);
                status.total_lag += lag;
                status.partitions.push(PartitionStatus {
                    topic: mark.topic.clone(),
                    partition: mark.partition,
                    high_watermark: mark.high,
                    next_offset: next,
                    lag,
                });
            }
            status.last_applied = recorded.iter().map(|(_, _, _, at)| at.clone()).max();
            let dlq_name = dlq.clone();
            status.dead_letters = watermarks(&pipeline.kafka, move |t| t == dlq_name)
                .await
                .map(|m| m.iter().map(|w| w.high - w.low).sum())
                .unwrap_or(0);
            sinks.push(status);
        }
        let snapshot = crate::backfill::snapshot_progress(&pipeline.kafka)
            .await
            .unwrap_or_default();
        pipelines.push(PipelineStatus {
            name: pipeline.name.clone(),
            source,
            sinks,
            snapshot,
        });
    }
    if pipelines.is_empty() {
        return Err(TidelinkError::permanent(format!(
            "no pipeline named `{}` in the configuration",
            only.unwrap_or_default()
        )));
    }
    Ok(Status { pipelines })
}

fn bytes(n: Option<i64>) -> String {
    match n {
        None => "-".into(),
        Some(n) if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        Some(n) if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        Some(n) if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        Some(n) => format!("{n} B"),
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.pipelines {
            writeln!(f, "pipeline {}", p.name)?;
            match &p.source {
                SourceState::Slot(s) if !s.exists => writeln!(f, "  source  slot {} does not exist yet (created on first run)", s.slot)?,
                SourceState::Slot(s) => writeln!(
                    f,
                    "  source  slot {} {}  confirmed {}  current {}  unconfirmed {}  retained WAL {}{}",
                    s.slot,
                    if s.active { "streaming" } else { "idle" },
                    s.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                    s.current_wal_lsn,
                    bytes(s.unconfirmed_wal_bytes),
                    bytes(s.retained_wal_bytes),
                    s.flush_lag_seconds.map(|l| format!("  flush lag {l:.1}s")).unwrap_or_default(),
                )?,
                SourceState::Binlog { stored_position, current_position } => writeln!(
                    f,
                    "  source  binlog stored {}  server at {}",
                    stored_position.as_deref().unwrap_or("- (never ran)"),
                    current_position.as_deref().unwrap_or("-"),
                )?,
                SourceState::Unavailable { error } => writeln!(f, "  source  unavailable: {error}")?,
            }
            if !p.snapshot.is_empty() {
                let done = p.snapshot.iter().filter(|t| t.done).count();
                writeln!(
                    f,
                    "  snapshot  {done} of {} tables copied",
                    p.snapshot.len()
                )?;
                for t in p.snapshot.iter().filter(|t| !t.done) {
                    match &t.error {
                        Some(e) => {
                            writeln!(f, "    {}  FAILED after {} rows: {e}", t.table, t.rows)?
                        }
                        None => writeln!(f, "    {}  in progress, {} rows", t.table, t.rows)?,
                    }
                }
            }
            for s in &p.sinks {
                writeln!(
                    f,
                    "  sink {}  group {}  lag {} messages  last applied {}  dead letters {}",
                    s.name,
                    s.group,
                    s.total_lag,
                    s.last_applied.as_deref().unwrap_or("never"),
                    s.dead_letters
                )?;
                if let Some(e) = &s.error {
                    writeln!(f, "    unavailable: {e}")?;
                }
                if !s.partitions.is_empty() {
                    writeln!(
                        f,
                        "    {:<40} {:>9} {:>12} {:>12} {:>9}",
                        "topic", "partition", "high", "next", "lag"
                    )?;
                    for p in &s.partitions {
                        writeln!(
                            f,
                            "    {:<40} {:>9} {:>12} {:>12} {:>9}",
                            p.topic,
                            p.partition,
                            p.high_watermark,
                            p.next_offset
                                .map(|n| n.to_string())
                                .unwrap_or_else(|| "-".into()),
                            p.lag
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}
