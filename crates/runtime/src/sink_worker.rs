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
use tidelink_config::{KafkaConfig, SinkConfig};
use tidelink_core::{
    MessageOrigin, OffsetAdvance, Op, Sink, SinkChange, SinkError, SourceOrder, TableColumns,
    TableId, TableTransform, TidelinkError, TopicPartition, Verdict,
};
use tidelink_kafka::topics::{schemas_topic, table_topics_pattern};
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
}

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
            let first = tokio::select! {
                event = events.recv() => event,
                _ = self.ctx.shutdown.wait() => None,
                _ = tokio::time::sleep(Duration::from_secs(5)) => Some(ConsumerEvent::Error(String::new())),
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
                    self.assigned.insert(p, stored);
                }
                self.count_assigned();
            }
            ConsumerEvent::Revoked(partitions) => {
                for p in partitions {
                    self.buffer.retain(|m| !is_of(m, &p));
                    self.applied_through.remove(&p);
                    self.assigned.remove(&p);
                }
                self.count_assigned();
            }
            ConsumerEvent::Messages(messages) => {
                // Runs of messages mostly come from one partition: look it up once per run.
                let mut last: Option<(&TopicPartition, Option<i64>)> = None;
                for message in messages {
                    let next = match last {
                        Some((p, next)) if is_of(&message, p) => next,
                        _ => {
                            let Some((p, next)) =
                                self.assigned.iter().find(|(p, _)| is_of(&message, p))
                            else {
                                continue; // not (or no longer) this worker's partition
                            };
                            last = Some((p, *next));
                            *next
                        }
                    };
                    // Already applied (a redelivery after a seek): skip.
                    if next.is_none_or(|next| message.offset() >= next) {
                        self.buffer.push(message);
                    }
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
                    prepared.changes.push(SinkChange {
                        table: route.target.clone(),
                        op,
                        key: decoded.key,
                        after,
                        origin,
                        source_columns,
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
        let topic = schemas_topic(&self.ctx.kafka.topic_prefix);
        let latest = admin::read_latest_by_key(&self.ctx.kafka, &topic).await?;
        for (key, value) in latest {
            if let Some((schema, name)) = key.split_once('.') {
                self.definitions
                    .insert(TableId::new(schema, name), Arc::from(value));
            }
        }
        for table in prepared.lacking_definitions {
            if !self.definitions.contains_key(&table) {
                tracing::warn!(pipeline = %self.ctx.pipeline, sink = %self.ctx.sink.name, %table, %topic,
                    "no column definitions for this table; its target table cannot be created and must exist");
                self.definitions_absent.insert(table);
            }
        }
        Ok(self.prepare(messages))
    }

    async fn apply_buffer(&mut self) -> Result<(), TidelinkError> {
        let mut messages = std::mem::take(&mut self.buffer);
        let mut dead_lettered: Vec<(TopicPartition, i64)> = Vec::new();
        let mut attempt = 0;
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
            let prepared = self.prepare_with_definitions(&messages).await?;
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
            let prepared = self.prepare_with_definitions(&messages).await?;
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
            self.buffer.retain(|m| !is_of(m, p));
            self.applied_through.remove(p);
            if let Some(slot) = self.assigned.get_mut(p) {
                *slot = offset;
                let consumer = self.consumer.clone();
                let p = p.clone();
                let _ = tokio::task::spawn_blocking(move || consumer.seek(&p, offset)).await;
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
