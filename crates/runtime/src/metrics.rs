//! Every metric tidelink exports, named `tidelink_<area>_<what>_<unit>` in one place, and
//! the HTTP endpoint serving `/metrics`, `/healthz` (process alive) and `/readyz` (every
//! component connected and streaming).

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Metric names.
pub mod names {
    /// Changes read from the source, by pipeline, table and op.
    pub const SOURCE_EVENTS: &str = "tidelink_source_events_total";
    /// Seconds between a transaction's commit and Kafka acknowledging its last change.
    pub const SOURCE_LAG: &str = "tidelink_source_lag_seconds";
    /// WAL the source's replication slot keeps on the server (current LSN minus restart_lsn).
    pub const SOURCE_RETAINED_WAL: &str = "tidelink_source_retained_wal_bytes";
    /// Changes acknowledged by Kafka.
    pub const KAFKA_PRODUCED_EVENTS: &str = "tidelink_kafka_produced_events_total";
    /// Kafka produce latency (enqueue to acknowledgement).
    pub const KAFKA_PRODUCE_LATENCY: &str = "tidelink_kafka_produce_latency_seconds";
    /// Rows applied to the target, by pipeline, sink, table and op.
    pub const SINK_APPLIED_ROWS: &str = "tidelink_sink_applied_rows_total";
    /// Batches committed.
    pub const SINK_BATCHES: &str = "tidelink_sink_batches_total";
    /// Messages per batch.
    pub const SINK_BATCH_SIZE: &str = "tidelink_sink_batch_size_messages";
    /// Time to apply and commit a batch.
    pub const SINK_APPLY_DURATION: &str = "tidelink_sink_apply_duration_seconds";
    /// Source commit to target commit, per applied change.
    pub const SINK_END_TO_END_LATENCY: &str = "tidelink_sink_end_to_end_latency_seconds";
    /// Source commit time to now, for the newest applied change.
    pub const SINK_LAG: &str = "tidelink_sink_lag_seconds";
    /// Messages not yet applied, per partition (high watermark minus next offset).
    pub const SINK_CONSUMER_LAG: &str = "tidelink_sink_consumer_lag_messages";
    /// Partitions the consumer group has assigned to this process's worker of a sink (0
    /// while it waits for the group, or when other workers hold every partition).
    pub const SINK_ASSIGNED_PARTITIONS: &str = "tidelink_sink_assigned_partitions";
    /// Rows copied by backfills and snapshots, by pipeline and table.
    pub const BACKFILL_ROWS: &str = "tidelink_backfill_rows_total";
    /// Chunks copied by backfills and snapshots.
    pub const BACKFILL_CHUNKS: &str = "tidelink_backfill_chunks_total";
    /// Rows a running backfill still has to copy (from the planner's estimate).
    pub const BACKFILL_REMAINING: &str = "tidelink_backfill_remaining_rows";
    /// 1 while a table's snapshot (or backfill) has failed and waits for its retry.
    pub const BACKFILL_FAILED: &str = "tidelink_backfill_table_failed";
    /// Messages sent to the dead-letter topic.
    pub const SINK_DEAD_LETTER: &str = "tidelink_sink_dead_letter_messages_total";
    /// Changes skipped because the target had applied them already (a source republished
    /// them after a restart).
    pub const SINK_REPLAYS_SKIPPED: &str = "tidelink_sink_replayed_changes_skipped_total";
    /// Changes a sink's row filter kept out of its target.
    pub const SINK_FILTERED: &str = "tidelink_sink_changes_filtered_total";
    /// Errors by pipeline, component and kind (transient, permanent, rejected, fenced).
    pub const ERRORS: &str = "tidelink_errors_total";
    /// 1 while a component is connected and streaming.
    pub const COMPONENT_UP: &str = "tidelink_component_up";

    /// Bytes the daemon (its own code and the C libraries whose `malloc` jemalloc serves)
    /// has allocated and not freed. Registered by the binary, which owns the allocator.
    pub const ALLOCATOR_ALLOCATED: &str = "tidelink_allocator_allocated_bytes";
    /// Bytes in physically resident pages the allocator holds (allocated, fragmentation
    /// and freed pages not yet returned to the system). Registered by the binary.
    pub const ALLOCATOR_RESIDENT: &str = "tidelink_allocator_resident_bytes";

    /// The allocator's series, which the `tidelink` binary registers beside [`ALL`].
    pub const ALLOCATOR: &[&str] = &[ALLOCATOR_ALLOCATED, ALLOCATOR_RESIDENT];

    /// Every series [`Metrics`](super::Metrics) registers.
    pub const ALL: &[&str] = &[
        SOURCE_EVENTS,
        SOURCE_LAG,
        SOURCE_RETAINED_WAL,
        KAFKA_PRODUCED_EVENTS,
        KAFKA_PRODUCE_LATENCY,
        SINK_APPLIED_ROWS,
        SINK_BATCHES,
        SINK_BATCH_SIZE,
        SINK_APPLY_DURATION,
        SINK_END_TO_END_LATENCY,
        SINK_LAG,
        SINK_CONSUMER_LAG,
        SINK_ASSIGNED_PARTITIONS,
        SINK_DEAD_LETTER,
        SINK_REPLAYS_SKIPPED,
        SINK_FILTERED,
        BACKFILL_ROWS,
        BACKFILL_CHUNKS,
        BACKFILL_REMAINING,
        BACKFILL_FAILED,
        ERRORS,
        COMPONENT_UP,
    ];
}

/// The registry and every series handle.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on `/metrics`.
    pub registry: Registry,
    /// See [`names::SOURCE_EVENTS`].
    pub source_events: IntCounterVec,
    /// See [`names::SOURCE_LAG`].
    pub source_lag: GaugeVec,
    /// See [`names::SOURCE_RETAINED_WAL`].
    pub source_retained_wal: GaugeVec,
    /// See [`names::KAFKA_PRODUCED_EVENTS`].
    pub kafka_produced: IntCounterVec,
    /// See [`names::KAFKA_PRODUCE_LATENCY`].
    pub kafka_produce_latency: HistogramVec,
    /// See [`names::SINK_APPLIED_ROWS`].
    pub sink_applied_rows: IntCounterVec,
    /// See [`names::SINK_BATCHES`].
    pub sink_batches: IntCounterVec,
    /// See [`names::SINK_BATCH_SIZE`].
    pub sink_batch_size: HistogramVec,
    /// See [`names::SINK_APPLY_DURATION`].
    pub sink_apply_duration: HistogramVec,
    /// See [`names::SINK_END_TO_END_LATENCY`].
    pub sink_end_to_end_latency: HistogramVec,
    /// See [`names::SINK_LAG`].
    pub sink_lag: GaugeVec,
    /// See [`names::SINK_CONSUMER_LAG`].
    pub sink_consumer_lag: IntGaugeVec,
    /// See [`names::SINK_ASSIGNED_PARTITIONS`].
    pub sink_assigned_partitions: IntGaugeVec,
    /// See [`names::SINK_DEAD_LETTER`].
    pub sink_dead_letter: IntCounterVec,
    /// See [`names::SINK_REPLAYS_SKIPPED`].
    pub sink_replays_skipped: IntCounterVec,
    /// See [`names::SINK_FILTERED`].
    pub sink_filtered: IntCounterVec,
    /// See [`names::BACKFILL_ROWS`].
    pub backfill_rows: IntCounterVec,
    /// See [`names::BACKFILL_CHUNKS`].
    pub backfill_chunks: IntCounterVec,
    /// See [`names::BACKFILL_REMAINING`].
    pub backfill_remaining: GaugeVec,
    /// See [`names::BACKFILL_FAILED`].
    pub backfill_failed_tables: IntGaugeVec,
    /// See [`names::ERRORS`].
    pub errors: IntCounterVec,
    /// See [`names::COMPONENT_UP`].
    pub component_up: IntGaugeVec,
    readiness: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Metrics {
    /// Registers every series.
    pub fn new() -> Self {
        use names::*;
        let registry = Registry::new();
        let seconds = exponential_buckets(0.001, 2.0, 16).expect("valid buckets");
        let sizes = exponential_buckets(1.0, 2.0, 16).expect("valid buckets");
        let int_gauge = IntGaugeVec::new(
            Opts::new(SINK_CONSUMER_LAG, "Messages not yet applied per partition"),
            &["pipeline", "sink", "topic", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(int_gauge.clone()))
            .expect("unique metric");
        let assigned = IntGaugeVec::new(
            Opts::new(
                SINK_ASSIGNED_PARTITIONS,
                "Partitions assigned to this process's worker of the sink",
            ),
            &["pipeline", "sink"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(assigned.clone()))
            .expect("unique metric");
        let failed_tables = IntGaugeVec::new(
            Opts::new(
                BACKFILL_FAILED,
                "1 while the table's snapshot has failed (the others go on; it is retried)",
            ),
            &["pipeline", "table"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(failed_tables.clone()))
            .expect("unique metric");
        let up = IntGaugeVec::new(
            Opts::new(
                COMPONENT_UP,
                "1 while the component is connected and streaming",
            ),
            &["pipeline", "component"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(up.clone()))
            .expect("unique metric");
        Self {
            source_events: counter(
                &registry,
                SOURCE_EVENTS,
                "Changes read from the source",
                &["pipeline", "table", "op"],
            ),
            source_lag: gauge(
                &registry,
                SOURCE_LAG,
                "Commit to Kafka acknowledgement of the newest confirmed transaction",
                &["pipeline"],
            ),
            source_retained_wal: gauge(
                &registry,
                SOURCE_RETAINED_WAL,
                "WAL the replication slot keeps on the source server",
                &["pipeline"],
            ),
            kafka_produced: counter(
                &registry,
                KAFKA_PRODUCED_EVENTS,
                "Changes acknowledged by Kafka",
                &["pipeline"],
            ),
            kafka_produce_latency: histogram(
                &registry,
                KAFKA_PRODUCE_LATENCY,
                "Enqueue to acknowledgement",
                &["pipeline"],
                seconds.clone(),
            ),
            sink_applied_rows: counter(
                &registry,
                SINK_APPLIED_ROWS,
                "Changes applied to the target",
                &["pipeline", "sink", "table", "op"],
            ),
            sink_batches: counter(
                &registry,
                SINK_BATCHES,
                "Batches committed to the target",
                &["pipeline", "sink"],
            ),
            sink_batch_size: histogram(
                &registry,
                SINK_BATCH_SIZE,
                "Messages per batch",
                &["pipeline", "sink"],
                sizes,
            ),
            sink_apply_duration: histogram(
                &registry,
                SINK_APPLY_DURATION,
                "Apply and commit time per batch",
                &["pipeline", "sink"],
                seconds.clone(),
            ),
            sink_end_to_end_latency: histogram(
                &registry,
                SINK_END_TO_END_LATENCY,
                "Source commit to target commit",
                &["pipeline", "sink"],
                seconds,
            ),
            sink_lag: gauge(
                &registry,
                SINK_LAG,
                "Now minus the source commit time of the newest applied change",
                &["pipeline", "sink"],
            ),
            sink_consumer_lag: int_gauge,
            sink_assigned_partitions: assigned,
            sink_dead_letter: counter(
                &registry,
                SINK_DEAD_LETTER,
                "Messages sent to the dead-letter topic",
                &["pipeline", "sink"],
            ),
            sink_replays_skipped: counter(
                &registry,
                SINK_REPLAYS_SKIPPED,
                "Changes a source published again after a restart that the target had applied already",
                &["pipeline", "sink"],
            ),
            sink_filtered: counter(
                &registry,
                SINK_FILTERED,
                "Changes the sink's row filter kept out of its target (inserts skipped, updates applied as deletes)",
                &["pipeline", "sink"],
            ),
            backfill_rows: counter(
                &registry,
                BACKFILL_ROWS,
                "Rows copied by backfills and snapshots",
                &["pipeline", "table"],
            ),
            backfill_chunks: counter(
                &registry,
                BACKFILL_CHUNKS,
                "Chunks copied by backfills and snapshots",
                &["pipeline", "table"],
            ),
            backfill_remaining: gauge(
                &registry,
                BACKFILL_REMAINING,
                "Rows a running backfill still has to copy (estimate)",
                &["pipeline", "table"],
            ),
            errors: counter(
                &registry,
                ERRORS,
                "Errors by component and kind",
                &["pipeline", "component", "kind"],
            ),
            component_up: up,
            backfill_failed_tables: failed_tables,
            readiness: Arc::new(Mutex::new(BTreeMap::new())),
            registry,
        }
    }

    /// Marks a component (`pipeline/source`, `pipeline/sink/name`) ready or not.
    pub fn set_ready(&self, pipeline: &str, component: &str, ready: bool) {
        self.component_up
            .with_label_values(&[pipeline, component])
            .set(i64::from(ready));
        self.readiness
            .lock()
            .expect("readiness lock")
            .insert(format!("{pipeline}/{component}"), ready);
    }

    /// True when every registered component is ready.
    pub fn all_ready(&self) -> (bool, BTreeMap<String, bool>) {
        let map = self.readiness.lock().expect("readiness lock").clone();
        (!map.is_empty() && map.values().all(|r| *r), map)
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
    pub async fn serve(
        self,
        listen: std::net::SocketAddr,
        shutdown: crate::Shutdown,
    ) -> std::io::Result<()> {
        use axum::http::StatusCode;
        use axum::routing::get;
        let metrics = self.clone();
        let ready = self.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                get(move || {
                    let metrics = metrics.clone();
                    async move {
                        (
                            [("content-type", "text/plain; version=0.0.4")],
                            metrics.render(),
                        )
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = ready.clone();
                    async move {
                        let (all, map) = ready.all_ready();
                        let body: String = map
                            .iter()
                            .map(|(k, v)| {
                                format!("{k} {}\n", if *v { "ready" } else { "not ready" })
                            })
                            .collect();
                        let status = if all {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        };
                        (status, body)
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
    }
}
