//! Runs the pipelines of a configuration: per pipeline, its source (publisher) and one
//! worker per sink, each retried with backoff on transient errors. A permanent error stops
//! that pipeline's components and is reported; while other pipelines still run, the failed
//! one is retried with a long backoff (a fix on the server side, such as a granted
//! privilege, then takes effect without a restart). When every pipeline has failed, the
//! process stops with the first error.

use crate::backfill::{backfill, BackfillOptions};
use crate::position_store::{load_position, store_position, store_positions};
use crate::publisher::{backoff, publish};
use crate::sink_worker::{run_worker, WorkerContext};
use crate::{Metrics, Shutdown};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidelink_config::{Config, PipelineConfig, SinkConfig, SinkTarget, SnapshotMode, SourceKind};
use tidelink_core::{Source, TableId, TidelinkError};
use tidelink_kafka::topics::topic_of;
use tidelink_kafka::{admin, client_config, EventProducer};
use tidelink_mysql::{
    BinlogPosition, MysqlSink, MysqlSinkSettings, MysqlSource, MysqlSourceSettings,
};
use tidelink_postgres::sink::PgSinkSettings;
use tidelink_postgres::{PgSink, PgSource, PgSourceSettings};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Which components this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sources and sinks.
    All,
    /// Only sources (one per pipeline across all processes).
    Source,
    /// Only sink workers (scale out by running more).
    Sink,
}

/// Runs every selected pipeline until shutdown. Returns the first permanent error once
/// every pipeline has failed (and all components stopped).
pub async fn run_pipelines(
    config: &Config,
    only: Option<&str>,
    role: Role,
    metrics: Metrics,
    shutdown: Shutdown,
) -> Result<(), TidelinkError> {
    let selected: Vec<&PipelineConfig> = config
        .pipelines
        .iter()
        .filter(|p| only.is_none_or(|name| name == p.name))
        .collect();
    let health = Arc::new(Health {
        total: selected.len(),
        failed: AtomicUsize::new(0),
        all_failed: Shutdown::new(),
    });
    let mut pipelines = JoinSet::new();
    for pipeline in selected {
        pipelines.spawn(supervise(
            pipeline.clone(),
            role,
            metrics.clone(),
            shutdown.clone(),
            health.clone(),
        ));
    }
    if pipelines.is_empty() {
        return Err(TidelinkError::permanent(format!(
            "no pipeline named `{}` in the configuration",
            only.unwrap_or_default()
        )));
    }
    let mut first_error = None;
    while let Some(result) = pipelines.join_next().await {
        let result = result.unwrap_or_else(|e| {
            Err(TidelinkError::permanent(format!(
                "pipeline task failed: {e}"
            )))
        });
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// How many pipelines are currently failed, to tell "one of several failed" (retry it)
/// from "all failed" (stop).
struct Health {
    total: usize,
    failed: AtomicUsize,
    all_failed: Shutdown,
}

async fn supervise(
    pipeline: PipelineConfig,
    role: Role,
    metrics: Metrics,
    shutdown: Shutdown,
    health: Arc<Health>,
) -> Result<(), TidelinkError> {
    let mut attempt = 0;
    loop {
        let stop = Shutdown::new();
        {
            let (global, all_failed, stop) =
                (shutdown.clone(), health.all_failed.clone(), stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = global.wait() => {}
                    _ = all_failed.wait() => {}
                }
                stop.trigger();
            });
        }
        let error = match run_pipeline(pipeline.clone(), role, metrics.clone(), stop.clone()).await
        {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let failed = health.failed.fetch_add(1, Ordering::SeqCst) + 1;
        if failed >= health.total || shutdown.is_triggered() || health.all_failed.is_triggered() {
            health.all_failed.trigger();
            return Err(error);
        }
        attempt += 1;
        let wait = Duration::from_secs((30u64 << attempt.min(4)).min(300));
        tracing::error!(pipeline = %pipeline.name, error = %error, retry_in_s = wait.as_secs(),
            "pipeline failed; the other pipelines keep running and this one is retried");
        let resumed = tokio::select! {
            ok = shutdown.sleep(wait) => ok,
            _ = health.all_failed.wait() => false,
        };
        health.failed.fetch_sub(1, Ordering::SeqCst);
        if !resumed {
            return Err(error);
        }
    }
}

async fn run_pipeline(
    pipeline: PipelineConfig,
    role: Role,
    metrics: Metrics,
    shutdown: Shutdown,
) -> Result<(), TidelinkError> {
    // Stopping one pipeline (its own failure) must not stop the others.
    let local = Shutdown::new();
    {
        let (global, local) = (shutdown.clone(), local.clone());
        tokio::spawn(async move {
            global.wait().await;
            local.trigger();
        });
    }
    let mut components = JoinSet::new();
    // Set once the source has created the topics of the tables it captures. A sink
    // subscribes by pattern and sees a topic created after it subscribed only at its next
    // metadata refresh; meanwhile changes pile up, and on some brokers (tansu) a backlog
    // makes every fetch slower. So this process's sinks subscribe once the topics exist.
    let (topics_created, source_topics) = watch::channel(false);
    if role != Role::Sink {
        components.spawn(run_source(
            pipeline.clone(),
            metrics.clone(),
            local.clone(),
            topics_created,
        ));
    } else {
        drop(topics_created);
    }
    if role != Role::Source {
        for sink in &pipeline.sinks {
            components.spawn(run_sink(
                pipeline.clone(),
                sink.clone(),
                metrics.clone(),
                local.clone(),
                source_topics.clone(),
            ));
        }
    }
    let mut first_error = None;
    while let Some(result) = components.join_next().await {
        let result =
            result.unwrap_or_else(|e| Err(TidelinkError::permanent(format!("task failed: {e}"))));
        if let Err(e) = result {
            tracing::error!(pipeline = %pipeline.name, error = %e, "pipeline stopped");
            metrics
                .errors
                .with_label_values(&[&pipeline.name, "pipeline", "permanent"])
                .inc();
            local.trigger();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn run_source(
    pipeline: PipelineConfig,
    metrics: Metrics,
    shutdown: Shutdown,
    topics_created: watch::Sender<bool>,
) -> Result<(), TidelinkError> {
    match pipeline.source.kind() {
        Some(SourceKind::Postgres(pg)) => {
            let settings = PgSourceSettings {
                pipeline: pipeline.name.clone(),
                dsn: pg.dsn.clone(),
                tables: pg.tables.clone(),
                slot: pg.slot_name(&pipeline.name),
                publication: pg.publication_name(&pipeline.name),
                status_interval: Duration::from_millis(pg.status_interval_ms),
            };
            run_postgres_source(pipeline, settings, metrics, shutdown, topics_created).await
        }
        Some(SourceKind::Mysql(my)) => {
            let settings = MysqlSourceSettings {
                pipeline: pipeline.name.clone(),
                dsn: my.dsn.clone(),
                tables: my.tables.clone(),
                server_id: my.server_id_for(&pipeline.name),
                heartbeat: Duration::from_millis(my.heartbeat_ms),
            };
            run_mysql_source(pipeline, settings, metrics, shutdown, topics_created).await
        }
        None => Err(TidelinkError::permanent(format!(
            "pipeline {}: no source configured",
            pipeline.name
        ))),
    }
}

async fn run_mysql_source(
    pipeline: PipelineConfig,
    settings: MysqlSourceSettings,
    metrics: Metrics,
    shutdown: Shutdown,
    topics_created: watch::Sender<bool>,
) -> Result<(), TidelinkError> {
    let name = pipeline.name.clone();
    let producer = EventProducer::new(&pipeline.kafka)?;
    let run = SourceRun {
        pipeline: &pipeline,
        producer: &producer,
        metrics: &metrics,
        shutdown: &shutdown,
        topics_created: &topics_created,
        keyless: &[],
    };
    metrics.set_ready(&name, "source", false);
    let mut attempt = 0;
    while !shutdown.is_triggered() {
        let result = async {
            let resume: Option<BinlogPosition> = load_position(&pipeline.kafka, &name).await?;
            let (mut source, report) = MysqlSource::start(settings.clone(), resume).await?;
            // A first start stores its starting point at once, so a crash before the
            // first change does not move the start to a later position.
            if report.fresh {
                store_position(&producer, &pipeline.kafka, &name, &report.position).await?;
            }
            let stop_store = Shutdown::new();
            let store = tokio::spawn(store_positions(
                source.confirmed(),
                producer.clone(),
                pipeline.kafka.clone(),
                name.clone(),
                stop_store.clone(),
            ));
            // Tables without a key are copied whole before the stream is read (see
            // whole_table), and the stream leaves out what their snapshots saw.
            let keyless: Vec<TableId> = report
                .tables
                .iter()
                .filter(|t| t.key.is_empty())
                .map(|t| t.table.clone())
                .collect();
            let restart = match pipeline.snapshot {
                SnapshotMode::Never => None,
                SnapshotMode::Initial => Some(false),
                SnapshotMode::WhenNeeded => Some(report.fresh),
            };
            if let Some(restart) = restart {
                let seen = crate::whole_table::snapshot_whole_mysql_tables(
                    &pipeline,
                    &settings.dsn,
                    source.binlog_server_id(),
                    &keyless,
                    restart,
                    &producer,
                    &metrics,
                    &shutdown,
                )
                .await?;
                for (table, place) in seen {
                    source.skip_seen_by(table, place.server_id, &place.file, place.pos);
                }
            }
            let tables = report.tables.iter().map(|t| &t.table);
            let run = SourceRun {
                keyless: &keyless,
                ..run
            };
            let result = run
                .publish_from(&mut source, tables, report.fresh, &mut attempt)
                .await;
            stop_store.trigger();
            let stored = store.await.unwrap_or_else(|e| {
                Err(TidelinkError::permanent(format!(
                    "position store task failed: {e}"
                )))
            });
            source.shutdown().await;
            result.and(stored)
        }
        .await;
        match after_run(result, &metrics, &name, "source", &mut attempt, &shutdown).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(e.context(format!("pipeline {name}"))),
        }
    }
    producer.flush(Duration::from_secs(10))?;
    tracing::info!(pipeline = %name, "source stopped");
    Ok(())
}

async fn run_postgres_source(
    pipeline: PipelineConfig,
    settings: PgSourceSettings,
    metrics: Metrics,
    shutdown: Shutdown,
    topics_created: watch::Sender<bool>,
) -> Result<(), TidelinkError> {
    let name = pipeline.name.clone();
    let producer = EventProducer::new(&pipeline.kafka)?;
    let run = SourceRun {
        pipeline: &pipeline,
        producer: &producer,
        metrics: &metrics,
        shutdown: &shutdown,
        topics_created: &topics_created,
        keyless: &[],
    };
    metrics.set_ready(&name, "source", false);
    // The slot's retained WAL is watched even while the source cannot stream: that is when
    // it grows.
    let watcher = tokio::spawn(watch_retained_wal(
        settings.dsn.clone(),
        settings.slot.clone(),
        name.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let mut attempt = 0;
    let mut has_run = false;
    while !shutdown.is_triggered() {
        let result = async {
            // Once the pipeline ran, a new table it cannot capture is reported, not fatal.
            let report = PgSource::prepare_with(&settings, has_run).await?;
            has_run = true;
            // Tables without a key are copied whole before the stream starts (see
            // whole_table), and the stream leaves out what their snapshots saw.
            let keyless: Vec<TableId> = report
                .tables
                .iter()
                .filter(|t| !t.has_primary_key && t.replica_identity == 'f')
                .map(|t| t.table.clone())
                .collect();
            let restart = match pipeline.snapshot {
                SnapshotMode::Never => None,
                SnapshotMode::Initial => Some(false),
                SnapshotMode::WhenNeeded => Some(report.slot_created),
            };
            let seen = match restart {
                None => Vec::new(),
                Some(restart) => {
                    crate::whole_table::snapshot_whole_tables(
                        &pipeline,
                        &settings.dsn,
                        &keyless,
                        restart,
                        &producer,
                        &metrics,
                        &shutdown,
                    )
                    .await?
                }
            };
            let mut source = PgSource::open(settings.clone(), &report).await?;
            for (table, visibility) in seen {
                source.skip_seen_by(table, visibility);
            }
            let tables = report.tables.iter().map(|t| &t.table);
            // A table created meanwhile that matches `tables` ends this run: the next one
            // adds it to the publication, copies it and streams it.
            let run_stop = Shutdown::new();
            let captured: Vec<TableId> = report.tables.iter().map(|t| t.table.clone()).collect();
            let watch = tokio::spawn(watch_new_tables(
                settings.clone(),
                captured,
                shutdown.clone(),
                run_stop.clone(),
            ));
            let run = SourceRun {
                keyless: &keyless,
                shutdown: &run_stop,
                ..run
            };
            let result = run
                .publish_from(&mut source, tables, report.slot_created, &mut attempt)
                .await;
            watch.abort();
            source.shutdown().await;
            result
        }
        .await;
        match after_run(result, &metrics, &name, "source", &mut attempt, &shutdown).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(e.context(format!("pipeline {name}"))),
        }
    }
    watcher.abort();
    producer.flush(Duration::from_secs(10))?;
    tracing::info!(pipeline = %name, "source stopped");
    Ok(())
}

/// What each run of a pipeline's source shares.
#[derive(Clone, Copy)]
struct SourceRun<'a> {
    pipeline: &'a PipelineConfig,
    producer: &'a EventProducer,
    metrics: &'a Metrics,
    shutdown: &'a Shutdown,
    topics_created: &'a watch::Sender<bool>,
    /// Tables the key-range snapshot leaves out (copied whole before streaming).
    keyless: &'a [TableId],
}

impl SourceRun<'_> {
    /// Once a source has started: creates its tables' topics, starts the snapshot if one is
    /// due (`new_start`: the source starts from nothing, see [`start_snapshot`]), and
    /// publishes until shutdown or an error, the source reported ready meanwhile.
    async fn publish_from<'t, S: Source>(
        &self,
        source: &mut S,
        tables: impl Iterator<Item = &'t TableId>,
        new_start: bool,
        attempt: &mut u32,
    ) -> Result<(), TidelinkError> {
        let (pipeline, name) = (self.pipeline, &self.pipeline.name);
        let topics: Vec<String> = tables
            .map(|t| topic_of(&pipeline.kafka, &t.schema, &t.name))
            .collect();
        admin::ensure_topics(&pipeline.kafka, &topics).await?;
        self.topics_created.send_replace(true);
        let snapshot = start_snapshot(
            pipeline,
            new_start,
            self.keyless,
            self.metrics,
            self.shutdown,
        );
        self.metrics.set_ready(name, "source", true);
        *attempt = 0;
        let result = publish(
            source,
            self.producer,
            &topics,
            &pipeline.kafka,
            name,
            self.metrics,
            self.shutdown,
        )
        .await;
        self.metrics.set_ready(name, "source", false);
        if let Some(snapshot) = snapshot {
            snapshot.abort();
        }
        result
    }
}

/// Starts the pipeline's snapshot (see [`SnapshotMode`]) next to the stream: a backfill of
/// every captured table, resumable and safe to run while changes stream. Retried with
/// backoff until it finishes.
fn start_snapshot(
    pipeline: &PipelineConfig,
    slot_created: bool,
    keyless: &[TableId],
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Option<tokio::task::JoinHandle<()>> {
    let restart = match pipeline.snapshot {
        SnapshotMode::Never => return None,
        SnapshotMode::Initial => false,
        SnapshotMode::WhenNeeded => slot_created,
    };
    let pipeline = pipeline.clone();
    let shutdown = shutdown.clone();
    let metrics = metrics.clone();
    let exclude = keyless.to_vec();
    Some(tokio::spawn(async move {
        let mut options = BackfillOptions {
            tables: Vec::new(),
            chunk_size: 5000,
            restart,
            progress_bar: false,
            parallel: 4,
            direct: None,
            key_columns: Vec::new(),
            max_rows_per_second: None,
            exclude,
        };
        let mut attempt = 0;
        loop {
            match backfill(&pipeline, &options, Some(&metrics), &shutdown).await {
                Ok(report) => {
                    let rows: u64 = report.iter().map(|(_, n)| n).sum();
                    if !shutdown.is_triggered() {
                        tracing::info!(pipeline = %pipeline.name, tables = report.len(), rows, "snapshot complete");
                    }
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(pipeline = %pipeline.name, error = %e, attempt, "snapshot failed; retrying");
                    // A retry continues where this attempt stopped.
                    options.restart = false;
                    if !backoff(attempt, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }))
}

/// Counts and logs the outcome of one run of a component. A transient failure is retried
/// after backoff (`Ok(true)`: run again; `Ok(false)`: stop was asked for meanwhile); a
/// permanent one ends the component.
async fn after_run(
    result: Result<(), TidelinkError>,
    metrics: &Metrics,
    pipeline: &str,
    component: &str,
    attempt: &mut u32,
    shutdown: &Shutdown,
) -> Result<bool, TidelinkError> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.is_transient() => {
            metrics
                .errors
                .with_label_values(&[pipeline, component, "transient"])
                .inc();
            *attempt += 1;
            tracing::warn!(%pipeline, %component, error = %e, attempt = *attempt, "failed; retrying");
            Ok(backoff(*attempt, shutdown).await)
        }
        Err(e) => {
            metrics
                .errors
                .with_label_values(&[pipeline, component, "permanent"])
                .inc();
            Err(e)
        }
    }
}

/// How often a PostgreSQL source looks for new tables matching its patterns.
const NEW_TABLE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Ends a run of a PostgreSQL source (`run_stop`) when the global stop comes, or when a
/// table matching the source's patterns exists that the run does not capture: the next
/// run adds it to the publication and, per the snapshot mode, copies it. A table that
/// cannot be captured (no key, no usable replica identity) is reported once instead.
async fn watch_new_tables(
    settings: PgSourceSettings,
    captured: Vec<TableId>,
    shutdown: Shutdown,
    run_stop: Shutdown,
) {
    let mut reported: Vec<String> = Vec::new();
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait() => {
                run_stop.trigger();
                return;
            }
            _ = tokio::time::sleep(NEW_TABLE_CHECK_INTERVAL) => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tidelink_postgres::connection::connect(&settings.dsn, "table watch")
                .await
                .ok();
        }
        let Some(c) = &client else { continue };
        match tidelink_postgres::source::new_tables(c, &settings.tables, &captured).await {
            Ok((new, refused)) => {
                for problem in refused {
                    if !reported.contains(&problem) {
                        tracing::warn!(pipeline = %settings.pipeline, "{problem}: it matches the source's tables but is not captured");
                        reported.push(problem);
                    }
                }
                if !new.is_empty() {
                    let names: Vec<String> = new.iter().map(ToString::to_string).collect();
                    tracing::info!(pipeline = %settings.pipeline, tables = ?names,
                        "new tables match the source's tables; restarting the stream to capture them");
                    run_stop.trigger();
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(pipeline = %settings.pipeline, error = %e, "cannot look for new tables");
                client = None;
            }
        }
    }
}

/// Samples the slot's retained WAL every 10 s into `tidelink_source_retained_wal_bytes`.
async fn watch_retained_wal(
    dsn: String,
    slot: String,
    pipeline: String,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let gauge = metrics.source_retained_wal.with_label_values(&[&pipeline]);
    // One connection, opened again only after it failed.
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tidelink_postgres::connection::connect(&dsn, "slot watch")
                .await
                .ok();
        }
        if let Some(c) = &client {
            match tidelink_postgres::source::slot_status_on(c, &slot).await {
                Ok(status) => {
                    if let Some(bytes) = status.retained_wal_bytes {
                        gauge.set(bytes as f64);
                    }
                }
                Err(e) => {
                    tracing::debug!(pipeline = %pipeline, error = %e, "cannot read the slot's retained WAL");
                    client = None;
                }
            }
        }
        if !shutdown.sleep(Duration::from_secs(10)).await {
            return;
        }
    }
}

async fn run_sink(
    pipeline: PipelineConfig,
    sink: SinkConfig,
    metrics: Metrics,
    shutdown: Shutdown,
    mut source_topics: watch::Receiver<bool>,
) -> Result<(), TidelinkError> {
    let name = pipeline.name.clone();
    let component = format!("sink/{}", sink.name);
    metrics.set_ready(&name, &component, false);
    // Waiting longer than one metadata refresh gains nothing: by then the consumer would
    // have found the topics itself. A source that cannot start (its database is down)
    // must not keep the sink from applying what Kafka already holds.
    tokio::select! {
        _ = source_topics.wait_for(|created| *created) => {}
        _ = tokio::time::sleep(client_config::METADATA_REFRESH) => {}
        _ = shutdown.wait() => {}
    }
    let ctx = WorkerContext {
        pipeline: name.clone(),
        sink: sink.clone(),
        kafka: pipeline.kafka.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let mut attempt = 0;
    while !shutdown.is_triggered() {
        let result = match sink.target() {
            Some(SinkTarget::Postgres(pg)) => {
                let settings = PgSinkSettings {
                    dsn: pg.dsn.clone(),
                    group: sink.group_id(&name),
                    state_schema: pg.state_schema.clone(),
                    record_history: pg.record_history,
                    create_tables: pg.create_tables,
                };
                async {
                    let apply = PgSink::connect(settings.clone()).await?;
                    let offsets = PgSink::connect(settings.clone()).await?;
                    attempt = 0;
                    run_worker(ctx.clone(), apply, offsets).await
                }
                .await
            }
            Some(SinkTarget::Mysql(my)) => {
                let settings = MysqlSinkSettings {
                    dsn: my.dsn.clone(),
                    group: sink.group_id(&name),
                    state_database: my.state_database.clone(),
                    record_history: my.record_history,
                    create_tables: my.create_tables,
                };
                async {
                    let apply = MysqlSink::connect(settings.clone()).await?;
                    let offsets = MysqlSink::connect(settings.clone()).await?;
                    attempt = 0;
                    run_worker(ctx.clone(), apply, offsets).await
                }
                .await
            }
            None => Err(TidelinkError::permanent(format!(
                "pipeline {name}, sink {}: no target configured",
                sink.name
            ))),
        };
        match after_run(result, &metrics, &name, &component, &mut attempt, &shutdown).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(e.context(format!("pipeline {name}, sink {}", sink.name))),
        }
    }
    tracing::info!(pipeline = %name, sink = %sink.name, "sink worker stopped");
    Ok(())
}
