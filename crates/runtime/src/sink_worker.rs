//! A sink worker: one member of the sink's consumer group. It turns consumer events into
//! batches, applies each batch with its offsets through the [`Sink`] contract, and handles
//! what can go wrong:
//!
//! - a message that cannot be decoded, or a change the target rejects, goes to the
//!   dead-letter topic (with the error and its origin in headers) and its offset is
//!   recorded, so the pipeline moves on and nothing disappears silently;
//! - a batch the target rejects is re-applied one change per transaction to find the
//!   rejected ones;
//! - a fenced partition (another worker moved its offsets) is reloaded and re-fetched from
//!   the stored offset;
//! - transient failures are retried with backoff, the batch unchanged;
//! - a change a source published again after a restart (its source order is not above the
//!   highest one the target recorded for the partition) is skipped, so each source change
//!   is applied once.

use crate::publisher::{backoff, now_ms};
use crate::{Metrics, Shutdown};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::Message;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidelink_config::{KafkaConfig, SchemaChangePolicy, SinkConfig, TruncatePolicy};
use tidelink_core::schema_change::SchemaChange;
use tidelink_core::{
    ColumnDefinition, MessageOrigin, OffsetAdvance, Op, Row, Sink, SinkChange, SinkError,
    SourceOrder, TableColumns, TableId, TableTransform, TidelinkError, TopicPartition, Verdict,
};
use tidelink_kafka::keyed_topic::KeyedTopicReader;
use tidelink_kafka::topics::{schemas_topic, table_topics_pattern};
use tidelink_kafka::truncate_barrier::barrier_of;
use tidelink_kafka::{
    admin, ChangeDecoder, ConsumerEvent, EventProducer, OffsetLoader, SinkConsumer,
    MAX_MESSAGES_PER_EVENT,
};
use tokio::sync::mpsc;

/// Everything a worker needs besides its sink.
#[derive(Clone)]
pub struct WorkerContext {
    /// Pipeline name.
    pub pipeline: String,
    /// Sink configuration.
    pub sink: SinkConfig,
    /// Kafka configuration of the pipeline.
    pub kafka: KafkaConfig,
    /// Metrics.
    pub metrics: Metrics,
    /// Shutdown signal.
    pub shutdown: Shutdown,
}

/// Adapts a sink's `stored_offsets` for the consumer thread's rebalance callback.
struct BlockingOffsetLoader<S: Sink + 'static> {
    sink: tokio::sync::Mutex<S>,
    runtime: tokio::runtime::Handle,
}

impl<S: Sink + 'static> OffsetLoader for BlockingOffsetLoader<S> {
    fn load(&self, partitions: &[TopicPartition]) -> Result<Vec<Option<i64>>, TidelinkError> {
        self.runtime
            .block_on(async { self.sink.lock().await.stored_offsets(partitions).await })
    }
}

struct Prepared<'m> {
    changes: Vec<SinkChange>,
    /// Changes skipped as already applied.
    replays_skipped: u64,
    /// Changes the sink's filters kept out of the target (inserts not applied, updates
    /// applied as deletes).
    filtered: u64,
    offsets: Vec<OffsetAdvance>,
    source_ts: Vec<Option<i64>>,
    undecodable: Vec<(&'m OwnedMessage, String)>,
    /// Replayed source tables with no column definitions read yet (only tracked when the
    /// sink creates tables).
    lacking_definitions: Vec<TableId>,
    /// Each target table of the batch with its source table, once.
    sources: Vec<(TableId, TableId)>,
}

struct Worker<S: Sink> {
    ctx: WorkerContext,
    sink: S,
    consumer: Arc<SinkConsumer>,
    dead_letters: EventProducer,
    dead_letter_topic: String,
    /// Assigned partitions and the next offset the target records for each.
    assigned: HashMap<TopicPartition, Option<i64>>,
    /// The highest source order the target records as applied, per partition; loaded on
    /// first use after an assignment.
    applied_through: HashMap<TopicPartition, Option<SourceOrder>>,
    /// Source tables' column definitions from `<prefix>.schemas`, read when the target may
    /// need to create a table (`create_tables`).
    definitions: HashMap<TableId, Arc<[u8]>>,
    /// Tables whose definitions a re-read of `<prefix>.schemas` did not find (changes not
    /// published by tidelink): not looked for again.
    definitions_absent: std::collections::HashSet<TableId>,
    /// Per source table: whether this sink replays it, its target table and transform.
    routes: HashMap<TableId, Arc<TableRoute>>,
    /// Decodes the envelopes; keeps the tables' names so changes share them.
    decoder: ChangeDecoder,
    /// Column definitions shaped by a transform, per table, with the definitions they were
    /// made from.
    shaped_definitions: HashMap<TableId, ShapedDefinitions>,
    buffer: Vec<OwnedMessage>,
    /// Since when this worker holds no partition.
    idle_since: Option<Instant>,
    /// The group's progress when this worker, holding no partition, last looked.
    orphan_check: Option<(Instant, GroupProgress)>,
    /// The consumer-lag report running in the background, if any.
    lag_report: Option<tokio::task::JoinHandle<()>>,
    /// Per source table: the columns its rows have carried, so a target column that rows
    /// stop carrying is known to come from the source (and may be dropped).
    seen_columns: HashMap<TableId, std::collections::HashSet<String>>,
    /// Per source table: columns renamed since this worker started (old name, new name).
    renamed: HashMap<TableId, Vec<(String, String)>>,
    /// Per source table: every version of its definitions read from `<prefix>.schemas`.
    definition_history: HashMap<TableId, Vec<Arc<[u8]>>>,
    /// Reads `<prefix>.schemas`, kept from the first read on.
    definitions_reader: Option<KeyedTopicReader>,
    /// Type changes already reported, so each is logged once.
    kept_type_reported: std::collections::HashSet<String>,
    /// Per target table: row shapes (column lists) already looked at, and whether rows of
    /// that shape need rewriting for the target.
    settled_shapes: HashMap<TableId, Vec<(Vec<String>, bool)>>,
    /// Per target table: its columns and their types, as last read.
    target_columns: HashMap<TableId, Vec<(String, String)>>,
    /// Partitions whose messages are not taken now: held at a truncate barrier, or
    /// waiting for the consumer to fetch them again.
    barrier_waits: HashMap<TopicPartition, BarrierWait>,
    /// Partitions assigned (or fenced) whose barrier arrivals were not read yet.
    barriers_unchecked: std::collections::HashSet<TopicPartition>,
    /// When the held partitions' barriers were last looked at.
    barriers_checked_at: Instant,
}

/// Why a partition's messages are left out of batches for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarrierWait {
    /// Its copy of a truncate barrier arrived; the other partitions' copies have not all.
    Held,
    /// Released (or cut short): the consumer fetches it again from the recorded offset;
    /// messages before [`ConsumerEvent::Rewound`] are from before.
    Rewinding,
}

/// How often a worker holding partitions at a truncate barrier looks whether the barrier
/// is complete.
const BARRIER_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// One partition's part of a batch being prepared.
struct BatchProgress {
    partition: TopicPartition,
    /// The topic, shared by the origins of the partition's changes.
    topic: Arc<str>,
    /// The next offset after the batch's last message of the partition.
    next: i64,
    /// The highest source order the target records as applied, before this batch.
    through: Option<SourceOrder>,
    /// The highest source order among the batch's changes so far.
    raised: Option<SourceOrder>,
}

/// Column definitions as received, and as a transform shapes them for the target.
type ShapedDefinitions = (Arc<[u8]>, Arc<[u8]>);

/// Where a sink sends one source table's changes, and what it does to them.
struct TableRoute {
    replayed: bool,
    target: TableId,
    transform: Option<TableTransform>,
}

/// Rows from before a schema change (in this batch, or arriving through other partitions)
/// take renamed columns' new names and lose the columns the target does not have (gone
/// from the source, or left out under `schema_changes: ignore`).
fn rewrite_rows(
    changes: &mut [SinkChange],
    target: &TableId,
    target_columns: &[(String, String)],
    renamed: &[(String, String)],
) -> bool {
    let mut rewritten = false;
    for change in changes.iter_mut().filter(|c| c.table == *target) {
        let Some(image) = change.after.as_mut() else {
            continue;
        };
        for (from, to) in renamed {
            if !image.contains_key(to) {
                if let Some(value) = image.remove(from) {
                    image.insert(to.as_str(), value);
                    rewritten = true;
                }
            }
        }
        let stale: Vec<String> = image
            .keys()
            .filter(|k| !target_columns.iter().any(|(t, _)| t == k))
            .map(str::to_string)
            .collect();
        rewritten |= !stale.is_empty();
        for column in stale {
            image.remove(&column);
        }
    }
    rewritten
}

/// Per partition: the group's committed offset and the high watermark.
type GroupProgress = Vec<(TopicPartition, Option<i64>, i64)>;

/// A worker that holds no partition looks this often whether partitions with messages
/// waiting are left without an owner (a group that did not re-form after a member died),
/// and rejoins the group if so.
const ORPHAN_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Runs one worker until shutdown. `offset_sink` is a second connection used only to read
/// stored offsets during rebalances.
pub async fn run_worker<S: Sink + 'static>(
    ctx: WorkerContext,
    sink: S,
    offset_sink: S,
) -> Result<(), TidelinkError> {
    let dead_letter_topic = ctx.sink.dead_letter_topic(&ctx.pipeline, &ctx.kafka);
    admin::ensure_topics(&ctx.kafka, std::slice::from_ref(&dead_letter_topic)).await?;
    let dead_letters = EventProducer::new(&ctx.kafka)?;
    // One batch waits here while the previous one is applied; librdkafka's fetch queue holds
    // the next (client_config.rs). Deeper queues only add memory (docs/tuning.md).
    let runs = ctx
        .sink
        .batch_size
        .max(1024)
        .div_ceil(MAX_MESSAGES_PER_EVENT);
    let (events_tx, mut events) = mpsc::channel(runs);
    let loader = Arc::new(BlockingOffsetLoader {
        sink: tokio::sync::Mutex::new(offset_sink),
        runtime: tokio::runtime::Handle::current(),
    });
    let group = ctx.sink.group_id(&ctx.pipeline);
    let pattern = table_topics_pattern(&ctx.kafka.topic_prefix);
    let consumer = Arc::new(SinkConsumer::spawn(
        &ctx.kafka, &group, &pattern, loader, events_tx,
    )?);
    tracing::info!(pipeline = %ctx.pipeline, sink = %ctx.sink.name, %group, %pattern, "sink worker joined its consumer group");
    let mut worker = Worker {
        ctx,
        sink,
        consumer,
        dead_letters,
        dead_letter_topic,
        assigned: HashMap::new(),
        applied_through: HashMap::new(),
        definitions: HashMap::new(),
        definitions_absent: Default::default(),
        routes: HashMap::new(),
        decoder: ChangeDecoder::default(),
        shaped_definitions: HashMap::new(),
        buffer: Vec::new(),
        idle_since: Some(Instant::now()),
        orphan_check: None,
        lag_report: None,
        seen_columns: HashMap::new(),
        renamed: HashMap::new(),
        target_columns: HashMap::new(),
        settled_shapes: HashMap::new(),
        definition_history: HashMap::new(),
        definitions_reader: None,
        kept_type_reported: Default::default(),
        barrier_waits: HashMap::new(),
        barriers_unchecked: Default::default(),
        barriers_checked_at: Instant::now(),
    };
    worker.ctx.metrics.set_ready(
        &worker.ctx.pipeline,
        &format!("sink/{}", worker.ctx.sink.name),
        true,
    );
    let result = worker.run(&mut events).await;
    worker.assigned.clear();
    worker.count_assigned();
    worker.ctx.metrics.set_ready(
        &worker.ctx.pipeline,
        &format!("sink/{}", worker.ctx.sink.name),
        false,
    );
    // Leave the group so other workers take the partitions over at once.
    let consumer = worker.consumer.clone();
    drop(worker);
    drop(events);
    if let Ok(consumer) = Arc::try_unwrap(consumer) {
        tokio::task::spawn_blocking(move || consumer.close())
            .await
            .ok();
    }
    result
}

impl<S: Sink> Worker<S> {
    fn labels(&self) -> [&str; 2] {
        [&self.ctx.pipeline, &self.ctx.sink.name]
    }

    async fn run(
        &mut self,
        events: &mut mpsc::Receiver<ConsumerEvent>,
    ) -> Result<(), TidelinkError> {
        let batch_wait = Duration::from_millis(self.ctx.sink.batch_wait_ms);
        let mut last_lag_report = Instant::now();
        loop {
            let idle = if self.holds_at_barriers() {
                BARRIER_CHECK_INTERVAL
            } else {
                Duration::from_secs(5)
            };
            let first = tokio::select! {
                event = events.recv() => event,
                _ = self.ctx.shutdown.wait() => None,
                _ = tokio::time::sleep(idle) => Some(ConsumerEvent::Error(String::new())),
            };
            let Some(first) = first else { break };
            self.handle(first);
            let deadline = Instant::now() + batch_wait;
            while self.buffer.len() < self.ctx.sink.batch_size {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    break;
                }
                match tokio::time::timeout(remaining, events.recv()).await {
                    Ok(Some(event)) => self.handle(event),
                    Ok(None) | Err(_) => break,
                }
            }
            if !self.buffer.is_empty() {
                self.apply_buffer().await?;
            }
            if self.holds_at_barriers()
                && self.barriers_checked_at.elapsed() >= BARRIER_CHECK_INTERVAL
            {
                self.release_completed_barriers().await;
            }
            if last_lag_report.elapsed() > Duration::from_secs(5) {
                self.report_consumer_lag();
                self.check_orphaned_partitions().await?;
                last_lag_report = Instant::now();
            }
        }
        Ok(())
    }

    fn count_assigned(&self) {
        self.ctx
            .metrics
            .sink_assigned_partitions
            .with_label_values(&self.labels())
            .set(self.assigned.len() as i64);
    }

    fn handle(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Assigned(partitions) => {
                for (p, stored) in partitions {
                    self.buffer.retain(|m| !is_of(m, &p));
                    self.applied_through.remove(&p);
                    self.barrier_waits.remove(&p);
                    self.barriers_unchecked.insert(p.clone());
                    self.assigned.insert(p, stored);
                }
                self.count_assigned();
            }
            ConsumerEvent::Revoked(partitions) => {
                for p in partitions {
                    self.buffer.retain(|m| !is_of(m, &p));
                    self.applied_through.remove(&p);
                    self.barrier_waits.remove(&p);
                    self.barriers_unchecked.remove(&p);
                    self.assigned.remove(&p);
                }
                self.count_assigned();
            }
            ConsumerEvent::Messages(messages) => {
                // Runs of messages mostly come from one partition: look it up once per run.
                // (partition, next offset to apply, left out for now)
                let mut last: Option<(&TopicPartition, Option<i64>, bool)> = None;
                for message in messages {
                    let (next, waiting) = match last {
                        Some((p, next, waiting)) if is_of(&message, p) => (next, waiting),
                        _ => {
                            let Some((p, next)) =
                                self.assigned.iter().find(|(p, _)| is_of(&message, p))
                            else {
                                continue; // not (or no longer) this worker's partition
                            };
                            let waiting = self.barrier_waits.contains_key(p);
                            last = Some((p, *next, waiting));
                            (*next, waiting)
                        }
                    };
                    // Already applied (a redelivery after a seek), or of a partition
                    // waiting at a barrier (fetched again once released): skip.
                    if !waiting && next.is_none_or(|next| message.offset() >= next) {
                        self.buffer.push(message);
                    }
                }
            }
            ConsumerEvent::Rewound(p) => {
                if self.barrier_waits.get(&p) == Some(&BarrierWait::Rewinding) {
                    self.barrier_waits.remove(&p);
                }
            }
            ConsumerEvent::Error(e) => {
                if !e.is_empty() {
                    tracing::warn!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, error = %e, "consumer error");
                    self.ctx
                        .metrics
                        .errors
                        .with_label_values(&[&self.ctx.pipeline, "consumer", "transient"])
                        .inc();
                }
            }
        }
    }

    /// Turns messages into changes and offset advances. Messages that cannot be decoded
    /// are returned separately, with the reason, for the dead-letter topic; their offsets
    /// are still advanced.
    fn prepare<'m>(&mut self, messages: &'m [OwnedMessage]) -> Prepared<'m> {
        let mut prepared = Prepared {
            changes: Vec::with_capacity(messages.len()),
            replays_skipped: 0,
            filtered: 0,
            offsets: Vec::new(),
            source_ts: Vec::with_capacity(messages.len()),
            undecodable: Vec::new(),
            lacking_definitions: Vec::new(),
            sources: Vec::new(),
        };
        let creates_tables = self.creates_tables();
        // Per partition of the batch, found again for each message without allocating.
        let mut progress: Vec<BatchProgress> = Vec::new();
        let mut last = usize::MAX;
        for message in messages {
            if progress
                .get(last)
                .is_none_or(|b| !is_of(message, &b.partition))
            {
                last = match progress.iter().position(|b| is_of(message, &b.partition)) {
                    Some(i) => i,
                    None => {
                        let partition = partition_of(message);
                        progress.push(BatchProgress {
                            topic: Arc::from(partition.topic.as_str()),
                            through: self.applied_through.get(&partition).copied().flatten(),
                            partition,
                            next: 0,
                            raised: None,
                        });
                        progress.len() - 1
                    }
                };
            }
            let batch_progress = &mut progress[last];
            batch_progress.next = message.offset() + 1;
            let Some(value) = message.payload() else {
                continue; // tombstone: nothing to apply
            };
            let origin = MessageOrigin {
                topic: batch_progress.topic.clone(),
                partition: message.partition(),
                offset: message.offset(),
            };
            match self.decoder.decode(message.key(), value) {
                Err(reason) => prepared
                    .undecodable
                    .push((message, format!("cannot decode: {reason}"))),
                Ok(decoded) => {
                    if let Some(order) = decoded.source_order {
                        let through = batch_progress.raised.or(batch_progress.through);
                        if through.is_some_and(|t| order.already_applied(&t)) {
                            prepared.replays_skipped += 1;
                            continue;
                        }
                        batch_progress.raised = Some(order);
                    }
                    let route = self.route(&decoded.table);
                    if !route.replayed {
                        continue;
                    }
                    let (mut op, mut after) = (decoded.op, decoded.after);
                    let mut source_columns = self.definitions.get(&decoded.table).cloned();
                    if source_columns.is_none()
                        && creates_tables
                        && !self.definitions_absent.contains(&decoded.table)
                        && !prepared.lacking_definitions.contains(&decoded.table)
                    {
                        prepared.lacking_definitions.push(decoded.table.clone());
                    }
                    if let Some(transform) = &route.transform {
                        if let Err(reason) = transform.check_key(&decoded.key) {
                            prepared.undecodable.push((
                                message,
                                format!("transform of {}: {reason}", decoded.table),
                            ));
                            continue;
                        }
                        if let Some(image) = after.as_mut() {
                            if transform.verdict(image) == Verdict::Reject {
                                prepared.filtered += 1;
                                if op != Op::Update {
                                    continue;
                                }
                                // The row may be in the target from before: remove it.
                                op = Op::Delete;
                                after = None;
                            } else {
                                transform.shape(image);
                            }
                        }
                        source_columns = source_columns.map(|columns| {
                            self.shaped_definitions(&decoded.table, columns, transform)
                        });
                    }
                    if op == Op::Truncate && self.ctx.sink.truncate == TruncatePolicy::Ignore {
                        continue;
                    }
                    if prepared
                        .sources
                        .last()
                        .is_none_or(|(target, _)| *target != route.target)
                        && !prepared.sources.iter().any(|(t, _)| *t == route.target)
                    {
                        prepared
                            .sources
                            .push((route.target.clone(), decoded.table.clone()));
                    }
                    let barrier = (op == Op::Truncate).then(|| barrier_of(message)).flatten();
                    prepared.changes.push(SinkChange {
                        table: route.target.clone(),
                        op,
                        key: decoded.key,
                        after,
                        origin,
                        source_columns,
                        barrier,
                    });
                    prepared.source_ts.push(decoded.source_ts_ms);
                }
            }
        }
        prepared.offsets = progress
            .into_iter()
            .map(|b| OffsetAdvance {
                expected: self.assigned.get(&b.partition).copied().flatten(),
                applied_through: b.raised,
                partition: b.partition,
                next: b.next,
            })
            .collect();
        prepared
    }

    fn creates_tables(&self) -> bool {
        match self.ctx.sink.target() {
            Some(tidelink_config::SinkTarget::Postgres(pg)) => pg.create_tables,
            Some(tidelink_config::SinkTarget::Mysql(my)) => my.create_tables,
            None => false,
        }
    }

    /// Prepares `messages`; when one of their tables has no column definitions yet (a sink
    /// that creates tables needs them), reads `<prefix>.schemas` again and prepares anew.
    /// Decided per table, not per topic: routed tables share a topic.
    async fn prepare_with_definitions<'m>(
        &mut self,
        messages: &'m [OwnedMessage],
    ) -> Result<Prepared<'m>, TidelinkError> {
        let prepared = self.prepare(messages);
        if prepared.lacking_definitions.is_empty() {
            return Ok(prepared);
        }
        self.refresh_definitions().await?;
        let topic = schemas_topic(&self.ctx.kafka.topic_prefix);
        for table in prepared.lacking_definitions {
            if !self.definitions.contains_key(&table) {
                tracing::warn!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, %table, %topic,
                    "no column definitions for this table; its target table cannot be created and must exist");
                self.definitions_absent.insert(table);
            }
        }
        Ok(self.prepare(messages))
    }

    /// Reads the source tables' latest column definitions from `<prefix>.schemas`.
    async fn refresh_definitions(&mut self) -> Result<(), TidelinkError> {
        let started = Instant::now();
        let reader = match &mut self.definitions_reader {
            Some(reader) => reader,
            None => {
                let topic = schemas_topic(&self.ctx.kafka.topic_prefix);
                self.definitions_reader
                    .insert(KeyedTopicReader::new(&self.ctx.kafka, &topic)?)
            }
        };
        reader.read_to_end().await?;
        tracing::debug!(
            tables = reader.values().len(),
            took_ms = started.elapsed().as_millis() as u64,
            "column definitions read"
        );
        for (key, values) in reader.values() {
            let Some((schema, name)) = key.split_once('.') else {
                continue;
            };
            let table = TableId::new(schema, name);
            // A source publishes a table's definitions again after each restart: keep
            // one of each run of equal versions.
            let mut versions: Vec<Arc<[u8]>> = Vec::new();
            for value in values {
                if versions.last().is_none_or(|v| **v != *value) {
                    versions.push(Arc::from(value.as_slice()));
                }
            }
            if let Some(last) = versions.last() {
                if self.definitions.get(&table).is_none_or(|d| **d != **last) {
                    self.definitions.insert(table.clone(), last.clone());
                }
            }
            self.definition_history.insert(table, versions);
        }
        Ok(())
    }

    /// Every version of a source table's definitions still held in `<prefix>.schemas`,
    /// oldest first, shaped for the target.
    fn shaped_history(&mut self, source: &TableId) -> Vec<Vec<ColumnDefinition>> {
        let versions = self
            .definition_history
            .get(source)
            .cloned()
            .unwrap_or_default();
        let transform = self.route(source).transform.clone();
        versions
            .iter()
            .filter_map(|v| TableColumns::decode(v).ok())
            .map(|columns| match &transform {
                Some(t) => t.shape_definitions(columns),
                None => columns,
            })
            .collect()
    }

    /// A source table's latest definitions as this sink's target receives them (its
    /// transform's dropped columns left out); `None` when none were published.
    fn shaped_latest(&mut self, source: &TableId) -> Option<Vec<ColumnDefinition>> {
        let encoded = self.definitions.get(source)?;
        let columns = TableColumns::decode(encoded).ok()?;
        Some(match &self.route(source).transform {
            Some(transform) => transform.shape_definitions(columns),
            None => columns,
        })
    }

    /// Follows the schema changes of the batch's source tables (see
    /// [`SinkConfig::schema_changes`]). A table is looked at when one of its rows does
    /// not have the columns last followed (or, with `force`, always): its latest
    /// definitions are read and compared with those, and the target table is changed to
    /// match. Rows are then shaped for the target: values of columns gone from the source
    /// are left out and renamed columns take their new names (rows from before the change,
    /// still arriving through other partitions), and with `ignore` columns the target
    /// lacks are left out. Returns whether a target table was changed, and the changes
    /// that cannot be applied (index, reason): the policy is `fail`, or the target could
    /// not be changed. "Changed" also counts rows rewritten for their target.
    async fn follow_schema_changes(
        &mut self,
        prepared: &mut Prepared<'_>,
        force: bool,
    ) -> Result<(bool, Vec<(usize, String)>), TidelinkError> {
        let policy = self.ctx.sink.schema_changes;
        let mut altered = false;
        let mut rejected = Vec::new();
        let mut refreshed = false;
        for (target, source) in prepared.sources.clone() {
            if self.definitions_absent.contains(&source) {
                continue; // not published by tidelink: nothing to follow
            }
            let images = || {
                prepared
                    .changes
                    .iter()
                    .filter(|c| c.table == target)
                    .filter_map(|c| c.after.as_ref())
            };
            // Rows carry their columns in table order.
            let fits = |image: &Row, names: &[(String, String)]| {
                image.len() == names.len() && image.keys().zip(names).all(|(k, (n, _))| k == n)
            };
            let Some(cached) = self.cached_target_columns(&target).await? else {
                continue; // created with the batch (create_tables)
            };
            // Row shapes looked at before, and whether they need rewriting.
            let settled = self.settled_shapes.get(&target);
            let mut known = true;
            let mut rewrite = false;
            for image in images() {
                if fits(image, &cached) {
                    continue;
                }
                match settled.and_then(|s| {
                    s.iter()
                        .find(|(shape, _)| image.keys().eq(shape.iter().map(String::as_str)))
                }) {
                    Some((_, needs)) => rewrite |= needs,
                    None => {
                        known = false;
                        break;
                    }
                }
            }
            if !force && known {
                if rewrite {
                    let renamed = self.renamed.get(&source).cloned().unwrap_or_default();
                    altered |= rewrite_rows(&mut prepared.changes, &target, &cached, &renamed);
                }
                continue;
            }
            // Someone may have changed the target meanwhile: read it again.
            self.target_columns.remove(&target);
            let Some(target_columns) = self.cached_target_columns(&target).await? else {
                continue;
            };
            if !force && images().all(|image| fits(image, &target_columns)) {
                continue;
            }
            let names: Vec<String> = target_columns.iter().map(|(n, _)| n.clone()).collect();
            let seen = self.seen_columns.entry(source.clone()).or_default();
            for image in images() {
                for column in image.keys() {
                    if !seen.contains(column) {
                        seen.insert(column.to_string());
                    }
                }
            }
            if !refreshed {
                self.refresh_definitions().await?;
                refreshed = true;
            }
            let Some(latest) = self.shaped_latest(&source) else {
                self.definitions_absent.insert(source.clone());
                continue;
            };
            let seen = self.seen_columns.get(&source).cloned().unwrap_or_default();
            // Rows of a shape one of the definitions' versions has: the versions from that
            // one to the latest say exactly what changed. Others are read by their columns.
            let history = self.shaped_history(&source);
            let mut columns = names.clone();
            let mut changes: Vec<SchemaChange> = Vec::new();
            let mut kept_types: Vec<String> = Vec::new();
            let mut unmatched: Vec<&Row> = Vec::new();
            let mut shapes: Vec<Vec<&str>> = Vec::new();
            for image in images() {
                let shape: Vec<&str> = image.keys().collect();
                if shapes.contains(&shape) {
                    continue;
                }
                let version = history.iter().rposition(|v| {
                    v.len() == shape.len() && v.iter().zip(&shape).all(|(c, n)| c.name == *n)
                });
                shapes.push(shape);
                let Some(version) = version else {
                    unmatched.push(image);
                    continue;
                };
                for pair in history[version..].windows(2) {
                    let (steps, kept) =
                        tidelink_core::schema_change::diff_versions(&pair[0], &pair[1]);
                    kept_types.extend(kept);
                    for step in steps {
                        match step {
                            SchemaChange::Add(column) => {
                                if !columns.contains(&column.name) {
                                    columns.push(column.name.clone());
                                    changes.push(SchemaChange::Add(column));
                                }
                            }
                            SchemaChange::Drop(name) => {
                                if columns.contains(&name) {
                                    columns.retain(|c| *c != name);
                                    changes.push(SchemaChange::Drop(name));
                                }
                            }
                            SchemaChange::Rename { from, to } => {
                                if policy == SchemaChangePolicy::Apply {
                                    let rename = (from.clone(), to.clone());
                                    let aliases = self.renamed.entry(source.clone()).or_default();
                                    if !aliases.contains(&rename) {
                                        aliases.push(rename);
                                    }
                                }
                                if columns.contains(&from) && !columns.contains(&to) {
                                    for c in columns.iter_mut().filter(|c| **c == from) {
                                        *c = to.clone();
                                    }
                                    changes.push(SchemaChange::Rename { from, to });
                                }
                            }
                            SchemaChange::Widen { column, from } => {
                                if columns.contains(&column.name)
                                    && !changes.iter().any(|c| matches!(c, SchemaChange::Widen { column: w, .. } if w.name == column.name))
                                {
                                    changes.push(SchemaChange::Widen { column, from });
                                }
                            }
                        }
                    }
                }
            }
            changes.extend(tidelink_core::schema_change::follow_rows(
                &columns,
                unmatched,
                &latest,
                &|c| seen.contains(c) || latest.iter().any(|d| d.name == c),
            ));
            for reason in kept_types {
                if self
                    .kept_type_reported
                    .insert(format!("{target}: {reason}"))
                {
                    tracing::error!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, table = %source, target_table = %target,
                        "{reason}, which the target cannot follow without losing values: the target column keeps its type, and rows it rejects go to the dead-letter topic until it is changed by hand");
                }
            }
            // A widening is made only where the target's type is narrower than the new one.
            let mut keep = Vec::with_capacity(changes.len());
            for change in changes {
                if let SchemaChange::Widen { column, .. } = &change {
                    // The target's column, under its name before a rename in these changes.
                    let before = keep
                        .iter()
                        .find_map(|c| match c {
                            SchemaChange::Rename { from, to } if *to == column.name => {
                                Some(from.clone())
                            }
                            _ => None,
                        })
                        .unwrap_or_else(|| column.name.clone());
                    let current = target_columns
                        .iter()
                        .find(|(n, _)| *n == before)
                        .map(|(_, t)| t.clone());
                    let wanted = self.sink.target_type_for(column).ok();
                    match (current, wanted) {
                        (Some(current), Some(wanted))
                            if !tidelink_core::schema_change::same_type(&current, &wanted)
                                && tidelink_core::schema_change::widens(&current, &wanted) => {}
                        _ => continue,
                    }
                }
                keep.push(change);
            }
            let mut changes = keep;
            if force {
                // A rejected batch: a target column whose type the source has changed since
                // (an earlier version of the definitions maps to the target's type). A
                // target made different on purpose is left as it is.
                for (name, current) in &target_columns {
                    let Some(column) = latest.iter().find(|c| c.name == *name) else {
                        continue;
                    };
                    let Ok(wanted) = self.sink.target_type_for(column) else {
                        continue;
                    };
                    let matched_before = history.iter().any(|version| {
                        version.iter().any(|c| {
                            c.name == *name
                                && self.sink.target_type_for(c).is_ok_and(|t| {
                                    tidelink_core::schema_change::same_type(&t, current)
                                })
                        })
                    });
                    if !matched_before
                        || tidelink_core::schema_change::same_type(current, &wanted)
                        || changes.iter().any(|c| matches!(c, SchemaChange::Widen { column: w, .. } if w.name == *name))
                    {
                        continue;
                    }
                    if tidelink_core::schema_change::widens(current, &wanted) {
                        changes.push(SchemaChange::Widen {
                            column: column.clone(),
                            from: current.clone(),
                        });
                    } else if !tidelink_core::schema_change::widens(&wanted, current) {
                        // Neither holds the other's values: never changed by itself, so no
                        // value is cut; what the target cannot take is dead-lettered.
                        tracing::error!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name,
                            table = %source, target_table = %target, column = %name,
                            target_type = %current, source_type = %column.sql_type,
                            "column `{name}` is {current} in the target but {} in the source, and the target cannot follow without losing values; \
                             its rows the target rejects go to the dead-letter topic until the target column is changed by hand",
                            column.sql_type);
                    }
                }
            }
            if !changes.is_empty() {
                let outcome = match policy {
                    SchemaChangePolicy::Ignore => Ok(()),
                    SchemaChangePolicy::Fail => Err(format!(
                        "schema change of {source} ({changes:?}) and the sink has schema_changes: fail"
                    )),
                    SchemaChangePolicy::Apply => {
                        self.target_columns.remove(&target);
                        match self.sink.alter_table(&target, &changes).await {
                            Ok(()) => {
                                altered = true;
                                for change in &changes {
                                    if let SchemaChange::Rename { from, to } = change {
                                        let aliases = self.renamed.entry(source.clone()).or_default();
                                        let rename = (from.clone(), to.clone());
                                        if !aliases.contains(&rename) {
                                            aliases.push(rename);
                                        }
                                    }
                                }
                                Ok(())
                            }
                            Err(SinkError::Transient(reason)) => {
                                return Err(TidelinkError::transient(reason))
                            }
                            Err(e) => Err(format!("changing {target} to follow {source}: {e}")),
                        }
                    }
                };
                if let Err(reason) = outcome {
                    tracing::error!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, table = %source, %reason,
                        "the target table cannot follow its source; the table's changes go to the dead-letter topic");
                    for (i, change) in prepared.changes.iter().enumerate() {
                        if change.table == target && change.after.is_some() {
                            rejected.push((i, reason.clone()));
                        }
                    }
                    continue;
                }
            }
            if altered {
                self.settled_shapes.remove(&target);
            }
            let Some(target_columns) = self.cached_target_columns(&target).await? else {
                continue;
            };
            let renamed = self.renamed.get(&source).cloned().unwrap_or_default();
            // Remember the rows' shapes, so the next batches of them are not looked at.
            let shapes = self.settled_shapes.entry(target.clone()).or_default();
            for image in images() {
                if !shapes
                    .iter()
                    .any(|(shape, _)| image.keys().eq(shape.iter().map(String::as_str)))
                {
                    let needs = image.keys().any(|k| {
                        !target_columns.iter().any(|(t, _)| t == k)
                            || renamed.iter().any(|(from, _)| from == k)
                    });
                    shapes.push((image.keys().map(str::to_string).collect(), needs));
                }
            }
            altered |= rewrite_rows(&mut prepared.changes, &target, &target_columns, &renamed);
        }
        Ok((altered, rejected))
    }

    /// The target table's columns, read once and again after this worker changed it.
    async fn cached_target_columns(
        &mut self,
        table: &TableId,
    ) -> Result<Option<Vec<(String, String)>>, TidelinkError> {
        if let Some(columns) = self.target_columns.get(table) {
            return Ok(Some(columns.clone()));
        }
        let columns = self.sink_target_columns(table).await?;
        if let Some(columns) = &columns {
            self.target_columns.insert(table.clone(), columns.clone());
        }
        Ok(columns)
    }

    /// Sends the changes that cannot be applied to the dead-letter topic and takes them
    /// out of the batch (their offsets still advance with it).
    async fn drop_rejected(
        &mut self,
        prepared: &mut Prepared<'_>,
        messages: &[OwnedMessage],
        rejected: Vec<(usize, String)>,
        dead_lettered: &mut Vec<(TopicPartition, i64)>,
    ) -> Result<(), TidelinkError> {
        if rejected.is_empty() {
            return Ok(());
        }
        let mut poison: Vec<(&OwnedMessage, String)> = Vec::new();
        for (i, reason) in &rejected {
            let origin = &prepared.changes[*i].origin;
            if let Some(m) = messages.iter().find(|m| {
                m.partition() == origin.partition
                    && m.offset() == origin.offset
                    && m.topic() == &*origin.topic
            }) {
                if !dead_lettered.contains(&(partition_of(m), m.offset())) {
                    poison.push((m, reason.clone()));
                }
            }
        }
        self.dead_letter_all(&poison).await?;
        dead_lettered.extend(poison.iter().map(|(m, _)| (partition_of(m), m.offset())));
        let drop: std::collections::HashSet<usize> = rejected.iter().map(|(i, _)| *i).collect();
        let mut index = 0;
        prepared.changes.retain(|_| {
            index += 1;
            !drop.contains(&(index - 1))
        });
        let mut index = 0;
        prepared.source_ts.retain(|_| {
            index += 1;
            !drop.contains(&(index - 1))
        });
        Ok(())
    }

    async fn sink_target_columns(
        &mut self,
        table: &TableId,
    ) -> Result<Option<Vec<(String, String)>>, TidelinkError> {
        match self.sink.target_columns(table).await {
            Ok(columns) => Ok(columns),
            Err(SinkError::Transient(reason)) => Err(TidelinkError::transient(reason)),
            Err(e) => Err(TidelinkError::permanent(e.to_string())),
        }
    }

    /// Applies the buffered messages. A partition that reaches a truncate barrier ends its
    /// part of the batch there; after the commit it is held until the barrier is complete
    /// (or fetched again at once when it is).
    async fn apply_buffer(&mut self) -> Result<(), TidelinkError> {
        let mut messages = std::mem::take(&mut self.buffer);
        if !self.leave_out_held_partitions(&mut messages).await {
            return Ok(());
        }
        let cut = self.cut_at_barriers(&mut messages);
        let applied = self.apply_messages(messages).await;
        if !cut.is_empty() {
            self.hold_or_rewind(&cut).await;
        }
        applied
    }

    fn holds_at_barriers(&self) -> bool {
        self.barrier_waits.values().any(|w| *w == BarrierWait::Held)
    }

    /// Reads the barrier arrivals of newly assigned partitions among `messages` (another
    /// worker may have left one held) and drops the messages of held partitions. False
    /// when shutting down while the target is unreachable.
    async fn leave_out_held_partitions(&mut self, messages: &mut Vec<OwnedMessage>) -> bool {
        let mut unchecked: Vec<TopicPartition> = Vec::new();
        if !self.barriers_unchecked.is_empty() {
            for message in messages.iter() {
                let p = partition_of(message);
                if self.barriers_unchecked.contains(&p) && !unchecked.contains(&p) {
                    unchecked.push(p);
                }
            }
        }
        let mut attempt = 0;
        while !unchecked.is_empty() {
            match self.sink.barrier_holds(&unchecked).await {
                Ok(held) => {
                    for p in unchecked.drain(..) {
                        self.barriers_unchecked.remove(&p);
                        if held.contains(&p) {
                            tracing::info!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, topic = %p.topic, partition = p.partition,
                                "partition waits at a truncate barrier until every partition of its topic reaches it");
                            self.barrier_waits.insert(p, BarrierWait::Held);
                        }
                    }
                }
                Err(e) => {
                    self.count_error("transient");
                    tracing::warn!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, error = %e, attempt,
                        "reading the target's truncate barriers failed; retrying");
                    // The backlog grows while the target is away: keep the lag visible.
                    self.report_consumer_lag();
                    attempt += 1;
                    if !backoff(attempt, &self.ctx.shutdown).await {
                        return false;
                    }
                }
            }
        }
        if !self.barrier_waits.is_empty() {
            messages.retain(|m| !self.barrier_waits.contains_key(&partition_of(m)));
        }
        true
    }

    /// Ends each partition's part of `messages` at its first copy of a truncate barrier
    /// (when the sink applies truncates) and returns those partitions, left out of later
    /// messages until [`Worker::hold_or_rewind`] decides.
    fn cut_at_barriers(&mut self, messages: &mut Vec<OwnedMessage>) -> Vec<TopicPartition> {
        if self.ctx.sink.truncate == TruncatePolicy::Ignore {
            return Vec::new();
        }
        let mut cut: Vec<(TopicPartition, i64)> = Vec::new();
        for message in messages.iter() {
            if message.headers().is_some()
                && !cut.iter().any(|(p, _)| is_of(message, p))
                && barrier_of(message).is_some()
            {
                cut.push((partition_of(message), message.offset()));
            }
        }
        if cut.is_empty() {
            return Vec::new();
        }
        messages.retain(|m| {
            !cut.iter()
                .any(|(p, offset)| is_of(m, p) && m.offset() > *offset)
        });
        cut.into_iter()
            .map(|(p, _)| {
                self.barrier_waits.insert(p.clone(), BarrierWait::Held);
                p
            })
            .collect()
    }

    /// After a batch that ended partitions at a barrier: those whose arrival the target
    /// records at a barrier not complete stay held; the others are fetched again after it.
    async fn hold_or_rewind(&mut self, cut: &[TopicPartition]) {
        let cut: Vec<TopicPartition> = cut
            .iter()
            .filter(|p| self.barrier_waits.get(*p) == Some(&BarrierWait::Held))
            .cloned()
            .collect();
        for p in self.release_completed(cut).await {
            tracing::info!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, topic = %p.topic, partition = p.partition,
                "partition reached a truncate barrier; waiting for the other partitions of its topic");
        }
    }

    /// Releases the held partitions whose barrier is complete.
    async fn release_completed_barriers(&mut self) {
        let held: Vec<TopicPartition> = self
            .barrier_waits
            .iter()
            .filter(|(_, w)| **w == BarrierWait::Held)
            .map(|(p, _)| p.clone())
            .collect();
        self.release_completed(held).await;
    }

    /// Fetches again those of `held` whose barrier the target records as complete and
    /// returns the others, still held. When the target cannot be read, all stay held
    /// until the next look and none is returned.
    async fn release_completed(&mut self, held: Vec<TopicPartition>) -> Vec<TopicPartition> {
        self.barriers_checked_at = Instant::now();
        match self.sink.barrier_holds(&held).await {
            Ok(still) => {
                for p in held.iter().filter(|p| !still.contains(p)) {
                    tracing::info!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, topic = %p.topic, partition = p.partition,
                        "truncate barrier complete; the partition goes on");
                    self.rewind(p);
                }
                still
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the truncate barriers");
                Vec::new()
            }
        }
    }

    /// Has the consumer fetch a partition again from the offset the target recorded.
    fn rewind(&mut self, p: &TopicPartition) {
        let Some(next) = self.assigned.get(p).copied() else {
            self.barrier_waits.remove(p);
            return;
        };
        self.buffer.retain(|m| !is_of(m, p));
        self.barrier_waits.insert(p.clone(), BarrierWait::Rewinding);
        self.consumer.rewind(p, next);
    }

    async fn apply_messages(
        &mut self,
        mut messages: Vec<OwnedMessage>,
    ) -> Result<(), TidelinkError> {
        let mut dead_lettered: Vec<(TopicPartition, i64)> = Vec::new();
        let mut attempt = 0;
        // A rejected batch may need a schema change its rows' columns do not show (a
        // widened type): after a rejection every table's definitions are looked at once.
        let mut followed_after_rejection = false;
        loop {
            if let Err(e) = self.load_applied_through(&messages).await {
                if !e.is_transient() {
                    return Err(e);
                }
                self.count_error("transient");
                tracing::warn!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, error = %e, attempt, "reading the target's recorded progress failed; retrying");
                self.report_consumer_lag();
                attempt += 1;
                if !backoff(attempt, &self.ctx.shutdown).await {
                    return Ok(());
                }
                continue;
            }
            let mut prepared = self.prepare_with_definitions(&messages).await?;
            let (_, cannot_follow) = self
                .follow_schema_changes(&mut prepared, followed_after_rejection)
                .await?;
            self.drop_rejected(&mut prepared, &messages, cannot_follow, &mut dead_lettered)
                .await?;
            let undecodable: Vec<(&OwnedMessage, String)> = prepared
                .undecodable
                .iter()
                .filter(|(m, _)| !dead_lettered.contains(&(partition_of(m), m.offset())))
                .map(|(m, reason)| (*m, reason.clone()))
                .collect();
            self.dead_letter_all(&undecodable).await?;
            dead_lettered.extend(
                undecodable
                    .iter()
                    .map(|(m, _)| (partition_of(m), m.offset())),
            );
            let started = Instant::now();
            match self.sink.apply(&prepared.changes, &prepared.offsets).await {
                Ok(()) => {
                    self.committed(
                        &prepared.changes,
                        &prepared.offsets,
                        &prepared.source_ts,
                        started,
                    );
                    self.count_replays_skipped(prepared.replays_skipped);
                    self.count_filtered(prepared.filtered);
                    return Ok(());
                }
                Err(SinkError::Fenced(partitions)) => {
                    self.count_error("fenced");
                    self.refence(&partitions).await?;
                    messages.retain(|m| !partitions.iter().any(|p| is_of(m, p)));
                    if messages.is_empty() {
                        return Ok(());
                    }
                }
                Err(SinkError::Rejected(reason)) => {
                    self.count_error("rejected");
                    if !followed_after_rejection {
                        followed_after_rejection = true;
                        let mut again = self.prepare_with_definitions(&messages).await?;
                        let (altered, _) = self.follow_schema_changes(&mut again, true).await?;
                        if altered {
                            tracing::info!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, %reason,
                                "the target rejected a batch, which now follows its source's schema changes; applying it again");
                            continue;
                        }
                    }
                    tracing::warn!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, %reason,
                        "the target rejected a batch; applying its changes one by one");
                    return self.apply_isolating(messages, dead_lettered).await;
                }
                Err(SinkError::Transient(reason)) => {
                    self.count_error("transient");
                    tracing::warn!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, %reason, attempt, "applying a batch failed; retrying");
                    // The backlog keeps growing while the target is away: keep showing it.
                    self.report_consumer_lag();
                    attempt += 1;
                    if !backoff(attempt, &self.ctx.shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// After the target rejected a batch: applies it again in one transaction, each change
    /// under a savepoint ([`Sink::apply_isolated`]), sends the rejected ones to the
    /// dead-letter topic and, once Kafka holds them, commits the rest with the offsets. A
    /// poison table thus costs one transaction per batch, not one per message, and the
    /// batch's other tables and partitions go on. `dead_lettered`: undecodable messages
    /// already sent.
    async fn apply_isolating(
        &mut self,
        mut messages: Vec<OwnedMessage>,
        dead_lettered: Vec<(TopicPartition, i64)>,
    ) -> Result<(), TidelinkError> {
        let mut attempt = 0;
        loop {
            messages.retain(|m| self.assigned.contains_key(&partition_of(m)));
            if messages.is_empty() {
                return Ok(());
            }
            self.load_applied_through(&messages).await?;
            let mut prepared = self.prepare_with_definitions(&messages).await?;
            let mut dead = dead_lettered.clone();
            let (_, cannot_follow) = self.follow_schema_changes(&mut prepared, false).await?;
            self.drop_rejected(&mut prepared, &messages, cannot_follow, &mut dead)
                .await?;
            let started = Instant::now();
            let result = self
                .sink
                .apply_isolated(&prepared.changes, &prepared.offsets)
                .await;
            let failure = match result {
                Ok(rejected) => {
                    let poison: Vec<(&OwnedMessage, String)> = rejected
                        .into_iter()
                        .filter_map(|(i, reason)| {
                            let origin = &prepared.changes[i].origin;
                            messages
                                .iter()
                                .find(|m| {
                                    m.partition() == origin.partition
                                        && m.offset() == origin.offset
                                        && m.topic() == &*origin.topic
                                })
                                .map(|m| (m, reason))
                        })
                        .filter(|(m, _)| !dead_lettered.contains(&(partition_of(m), m.offset())))
                        .collect();
                    let rejected: Vec<(i32, i64, &str)> = poison
                        .iter()
                        .map(|(m, _)| (m.partition(), m.offset(), m.topic()))
                        .collect();
                    if let Err(e) = self.dead_letter_all(&poison).await {
                        let _ = self.sink.finish_isolated(false).await;
                        return Err(e);
                    }
                    match self.sink.finish_isolated(true).await {
                        Ok(()) => {
                            // What was committed: every change but the rejected ones.
                            let applied: Vec<SinkChange> = prepared
                                .changes
                                .iter()
                                .filter(|c| {
                                    !rejected.iter().any(|&(p, o, t)| {
                                        c.origin.partition == p
                                            && c.origin.offset == o
                                            && &*c.origin.topic == t
                                    })
                                })
                                .cloned()
                                .collect();
                            self.committed(&applied, &prepared.offsets, &[], started);
                            self.count_replays_skipped(prepared.replays_skipped);
                            self.count_filtered(prepared.filtered);
                            return Ok(());
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            match failure {
                SinkError::Fenced(partitions) => {
                    self.count_error("fenced");
                    self.refence(&partitions).await?;
                    messages.retain(|m| !partitions.iter().any(|p| is_of(m, p)));
                }
                SinkError::Rejected(reason) => {
                    // Not a change's fault (the offsets or history could not be written).
                    return Err(TidelinkError::permanent(format!(
                        "recording a batch's progress in the target failed: {reason}"
                    )));
                }
                SinkError::Transient(reason) => {
                    self.count_error("transient");
                    tracing::warn!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, %reason, attempt,
                        "applying a rejected batch change by change failed; retrying");
                    attempt += 1;
                    if !backoff(attempt, &self.ctx.shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// While this worker holds no partition: fails (so the worker rejoins the group) when a
    /// partition had messages waiting at the previous check and its committed offset has
    /// not moved since, i.e. no member applies it.
    async fn check_orphaned_partitions(&mut self) -> Result<(), TidelinkError> {
        if !self.assigned.is_empty() {
            self.idle_since = None;
            self.orphan_check = None;
            return Ok(());
        }
        let idle_since = *self.idle_since.get_or_insert_with(Instant::now);
        if idle_since.elapsed() < ORPHAN_CHECK_INTERVAL
            || self
                .orphan_check
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < ORPHAN_CHECK_INTERVAL)
        {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        let prefix = self.ctx.kafka.topic_prefix.clone();
        let progress =
            match tokio::task::spawn_blocking(move || consumer.group_progress(&prefix)).await {
                Ok(Ok(progress)) => progress,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot read the group's progress");
                    return Ok(());
                }
                Err(_) => return Ok(()),
            };
        let previous = self
            .orphan_check
            .replace((Instant::now(), progress.clone()));
        let Some((_, previous)) = previous else {
            return Ok(());
        };
        let orphaned = progress.iter().find(|(p, committed, _)| {
            previous.iter().any(|(q, before, high)| {
                q == p && before == committed && *high > before.unwrap_or(0)
            })
        });
        match orphaned {
            Some((p, committed, high)) => Err(TidelinkError::transient(format!(
                "this worker holds no partition, yet nobody applied {}[{}] for {}s ({} messages waiting): rejoining the consumer group",
                p.topic,
                p.partition,
                ORPHAN_CHECK_INTERVAL.as_secs(),
                high - committed.unwrap_or(0)
            ))),
            None => Ok(()),
        }
    }

    /// Reads what the target records as applied for partitions of `messages` whose state
    /// is not loaded yet (after an assignment or a fence).
    async fn load_applied_through(
        &mut self,
        messages: &[OwnedMessage],
    ) -> Result<(), TidelinkError> {
        let mut missing: Vec<TopicPartition> = Vec::new();
        for message in messages {
            let p = partition_of(message);
            if !self.applied_through.contains_key(&p) && !missing.contains(&p) {
                missing.push(p);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let recorded = self.sink.applied_through(&missing).await?;
        self.applied_through
            .extend(missing.into_iter().zip(recorded));
        Ok(())
    }

    /// This sink's route for a source table, worked out once per table.
    fn route(&mut self, table: &TableId) -> Arc<TableRoute> {
        if let Some(route) = self.routes.get(table) {
            return route.clone();
        }
        let route = Arc::new(TableRoute {
            replayed: self.ctx.sink.replays(table),
            target: self.ctx.sink.target_table(table),
            transform: self.ctx.sink.transform_for(table),
        });
        self.routes.insert(table.clone(), route.clone());
        route
    }

    /// A table's column definitions as the target receives them: dropped columns left out,
    /// hashed columns text, nulled columns nullable. Worked out once per definitions.
    fn shaped_definitions(
        &mut self,
        table: &TableId,
        columns: Arc<[u8]>,
        transform: &TableTransform,
    ) -> Arc<[u8]> {
        if let Some((from, shaped)) = self.shaped_definitions.get(table) {
            if Arc::ptr_eq(from, &columns) {
                return shaped.clone();
            }
        }
        let Ok(definitions) = TableColumns::decode(&columns) else {
            return columns;
        };
        let shaped: Arc<[u8]> = TableColumns::new(transform.shape_definitions(definitions))
            .encoded
            .into();
        self.shaped_definitions
            .insert(table.clone(), (columns, shaped.clone()));
        shaped
    }

    fn count_filtered(&self, filtered: u64) {
        if filtered > 0 {
            self.ctx
                .metrics
                .sink_filtered
                .with_label_values(&self.labels())
                .inc_by(filtered);
        }
    }

    fn count_replays_skipped(&self, skipped: u64) {
        if skipped > 0 {
            tracing::info!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, skipped,
                "skipped changes the source published again after a restart (the target had applied them)");
            self.ctx
                .metrics
                .sink_replays_skipped
                .with_label_values(&self.labels())
                .inc_by(skipped);
        }
    }

    /// Another worker moved these partitions: reload their offsets and fetch again from there.
    async fn refence(&mut self, partitions: &[TopicPartition]) -> Result<(), TidelinkError> {
        let stored = self.sink.stored_offsets(partitions).await?;
        for (p, offset) in partitions.iter().zip(stored) {
            tracing::warn!(topic = %p.topic, partition = p.partition, ?offset,
                "another worker applied this partition; continuing from its stored offset");
            self.applied_through.remove(p);
            if let Some(slot) = self.assigned.get_mut(p) {
                *slot = offset;
                // The other worker may have left it at a truncate barrier.
                self.barriers_unchecked.insert(p.clone());
                self.rewind(p);
            }
        }
        Ok(())
    }

    fn committed(
        &mut self,
        changes: &[SinkChange],
        offsets: &[OffsetAdvance],
        source_ts: &[Option<i64>],
        started: Instant,
    ) {
        let [pipeline, sink] = self.labels();
        let m = &self.ctx.metrics;
        m.sink_apply_duration
            .with_label_values(&[pipeline, sink])
            .observe(started.elapsed().as_secs_f64());
        m.sink_batches.with_label_values(&[pipeline, sink]).inc();
        m.sink_batch_size
            .with_label_values(&[pipeline, sink])
            .observe(changes.len() as f64);
        let mut counts: HashMap<(&TableId, Op), u64> = HashMap::new();
        for change in changes {
            *counts.entry((&change.table, change.op)).or_default() += 1;
        }
        for ((table, op), n) in counts {
            m.sink_applied_rows
                .with_label_values(&[pipeline, sink, &table.to_string(), op.name()])
                .inc_by(n);
        }
        let now = now_ms();
        let latency = m
            .sink_end_to_end_latency
            .with_label_values(&[pipeline, sink]);
        for ts in source_ts.iter().flatten() {
            latency.observe((now - ts).max(0) as f64 / 1000.0);
        }
        if let Some(newest) = source_ts.iter().flatten().max() {
            m.sink_lag
                .with_label_values(&[pipeline, sink])
                .set((now - newest).max(0) as f64 / 1000.0);
        }
        let mut monitoring = Vec::with_capacity(offsets.len());
        for advance in offsets {
            self.assigned
                .insert(advance.partition.clone(), Some(advance.next));
            if let Some(through) = advance.applied_through {
                self.applied_through
                    .insert(advance.partition.clone(), Some(through));
            }
            monitoring.push((advance.partition.clone(), advance.next));
        }
        self.consumer.commit_for_monitoring(&monitoring);
    }

    /// Sends messages to the dead-letter topic together and waits until Kafka holds all of
    /// them. The first few of a batch are logged one by one, the rest in one line.
    async fn dead_letter_all(
        &mut self,
        messages: &[(&OwnedMessage, String)],
    ) -> Result<(), TidelinkError> {
        const LOGGED: usize = 10;
        let mut deliveries = Vec::with_capacity(messages.len());
        for (i, (message, reason)) in messages.iter().enumerate() {
            deliveries.push(self.send_dead_letter(message, reason, i < LOGGED).await?);
        }
        if messages.len() > LOGGED {
            let (first, reason) = &messages[LOGGED];
            tracing::error!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name,
                more = messages.len() - LOGGED, first_topic = %first.topic(), %reason,
                dead_letter_topic = %self.dead_letter_topic, "more messages of the batch sent to the dead-letter topic");
        }
        for delivery in deliveries {
            delivery.acknowledged().await?;
        }
        self.ctx
            .metrics
            .sink_dead_letter
            .with_label_values(&self.labels())
            .inc_by(messages.len() as u64);
        Ok(())
    }

    async fn send_dead_letter(
        &self,
        message: &OwnedMessage,
        reason: &str,
        log: bool,
    ) -> Result<tidelink_kafka::producer::PendingDelivery, TidelinkError> {
        let origin = format!(
            "{}[{}]@{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        if log {
            tracing::error!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, %origin, %reason,
                dead_letter_topic = %self.dead_letter_topic, "message sent to the dead-letter topic");
        }
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "tidelink.error",
                value: Some(reason),
            })
            .insert(Header {
                key: "tidelink.origin.topic",
                value: Some(message.topic()),
            })
            .insert(Header {
                key: "tidelink.origin.partition",
                value: Some(&message.partition().to_string()),
            })
            .insert(Header {
                key: "tidelink.origin.offset",
                value: Some(&message.offset().to_string()),
            });
        let delivery = self
            .dead_letters
            .send(
                &self.dead_letter_topic,
                message.key(),
                message.payload().unwrap_or_default(),
                None,
                Some(headers),
            )
            .await?;
        Ok(delivery)
    }

    fn count_error(&self, kind: &str) {
        self.ctx
            .metrics
            .errors
            .with_label_values(&[
                &self.ctx.pipeline,
                &format!("sink/{}", self.ctx.sink.name),
                kind,
            ])
            .inc();
    }

    /// Sets the consumer-lag gauges from the high watermarks of the assigned partitions, in
    /// a task of its own: a slow broker answering the two ListOffsets per partition (up to
    /// their timeout) must not hold up applying. A report still running is not doubled.
    fn report_consumer_lag(&mut self) {
        if self.lag_report.as_ref().is_some_and(|r| !r.is_finished()) {
            return;
        }
        let partitions: Vec<(TopicPartition, Option<i64>)> =
            self.assigned.iter().map(|(p, o)| (p.clone(), *o)).collect();
        // Over the dead-letter producer's connection: the consumer's own connection may be
        // waiting on a long fetch, and Kafka answers a connection's requests in order.
        let client = self.dead_letters.clone();
        let metrics = self.ctx.metrics.clone();
        let (pipeline, sink) = (self.ctx.pipeline.clone(), self.ctx.sink.name.clone());
        self.lag_report = Some(tokio::spawn(async move {
            let watermarks = tokio::task::spawn_blocking(move || {
                partitions
                    .into_iter()
                    .filter_map(|(p, next)| {
                        client
                            .high_watermark(&p.topic, p.partition)
                            .ok()
                            .map(|high| (p, next, high))
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let caught_up = !watermarks.is_empty()
                && watermarks
                    .iter()
                    .all(|(_, next, high)| *high <= next.unwrap_or(0));
            if caught_up {
                // Nothing left to apply: the sink is not behind the source, however old the
                // last change it applied is.
                metrics
                    .sink_lag
                    .with_label_values(&[&pipeline, &sink])
                    .set(0.0);
            }
            for (p, next, high) in watermarks {
                let lag = (high - next.unwrap_or(0)).max(0);
                metrics
                    .sink_consumer_lag
                    .with_label_values(&[&pipeline, &sink, &p.topic, &p.partition.to_string()])
                    .set(lag);
            }
        }));
    }
}

fn partition_of(message: &OwnedMessage) -> TopicPartition {
    TopicPartition {
        topic: message.topic().to_string(),
        partition: message.partition(),
    }
}

fn is_of(message: &OwnedMessage, p: &TopicPartition) -> bool {
    message.partition() == p.partition && message.topic() == p.topic
}
