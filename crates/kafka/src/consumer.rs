//! The consumer-group side of a sink worker.
//!
//! A dedicated thread drives an rdkafka consumer (cooperative-sticky assignment, no
//! automatic offset commits) and forwards what happens, in order, over a bounded channel:
//! partition assignments with the offsets the sink stored, messages (in runs of up to
//! [`MAX_MESSAGES_PER_EVENT`], so a busy stream costs one channel hand-over per run rather
//! than per message), revocations. The
//! rebalance callback asks the sink for its stored offsets *before* assigning, so fetching
//! starts exactly where the target's last committed batch ended; Kafka's own committed
//! offsets are written only for monitoring (consumer lag) and never read back.

use crate::client_config;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tidelink_config::KafkaConfig;
use tidelink_core::{TidelinkError, TopicPartition};
use tokio::sync::mpsc;

/// Reads the offsets a sink stored; called from the consumer thread, so it may block.
pub trait OffsetLoader: Send + Sync + 'static {
    /// Stored next offsets, `None` for partitions never consumed.
    fn load(&self, partitions: &[TopicPartition]) -> Result<Vec<Option<i64>>, TidelinkError>;
}

/// What the consumer thread reports, in the order it happened.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// These partitions now belong to this worker; fetching starts at the stored offsets.
    Assigned(Vec<(TopicPartition, Option<i64>)>),
    /// These partitions were taken away; drop anything buffered for them.
    Revoked(Vec<TopicPartition>),
    /// Messages of assigned partitions, in the order polled (at least one).
    Messages(Vec<OwnedMessage>),
    /// Fetching of this partition restarted where [`SinkConsumer::rewind`] asked: every
    /// message of it reported after this event comes from there.
    Rewound(TopicPartition),
    /// A consumer error worth reporting (the consumer keeps running).
    Error(String),
}

struct RebalanceContext {
    loader: Arc<dyn OffsetLoader>,
    events: mpsc::Sender<ConsumerEvent>,
    stop: Arc<AtomicBool>,
    /// Messages polled and not yet handed to the worker (see `poll_loop`).
    held: Arc<Mutex<VecDeque<OwnedMessage>>>,
}

impl RebalanceContext {
    /// Drops held messages of partitions that change hands.
    fn forget_held(&self, partitions: &[TopicPartition]) {
        if let Ok(mut held) = self.held.lock() {
            held.retain(|m| {
                !partitions
                    .iter()
                    .any(|p| p.partition == m.partition() && p.topic == m.topic())
            });
        }
    }
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::client_config::forward_log(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::client_config::forward_error(error, reason);
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition {
            topic: e.topic().to_string(),
            partition: e.partition(),
        })
        .collect()
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions = partitions_of(tpl);
                let stored = loop {
                    match self.loader.load(&partitions) {
                        Ok(stored) => break stored,
                        Err(e) if !self.stop.load(Ordering::Relaxed) => {
                            tracing::warn!(error = %e, "cannot read stored offsets; retrying");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        Err(_) => return,
                    }
                };
                for (p, offset) in partitions.iter().zip(&stored) {
                    let start = offset.map(Offset::Offset).unwrap_or(Offset::Beginning);
                    if let Err(e) = tpl.set_partition_offset(&p.topic, p.partition, start) {
                        tracing::warn!(error = %e, topic = %p.topic, partition = p.partition, "cannot set start offset");
                    }
                }
                tracing::info!(
                    partitions = ?partitions.iter().zip(&stored).map(|(p, o)| format!("{}[{}]@{}", p.topic, p.partition, o.map(|o| o.to_string()).unwrap_or_else(|| "beginning".into()))).collect::<Vec<_>>(),
                    "partitions assigned"
                );
                self.forget_held(&partitions);
                let _ = self.events.blocking_send(ConsumerEvent::Assigned(
                    partitions.into_iter().zip(stored).collect(),
                ));
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = partitions_of(tpl);
                tracing::info!(count = partitions.len(), "partitions revoked");
                self.forget_held(&partitions);
                let _ = self
                    .events
                    .blocking_send(ConsumerEvent::Revoked(partitions));
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                let _ = self
                    .events
                    .blocking_send(ConsumerEvent::Revoked(partitions_of(tpl)));
                let _ = consumer.unassign();
            }
        }
    }
}

/// Rewinds the worker asked for and the consumer thread has not made yet: a partition
/// and where to fetch it from again (`None`: the beginning).
type PendingRewinds = Mutex<Vec<(TopicPartition, Option<i64>)>>;

/// A running consumer thread.
pub struct SinkConsumer {
    consumer: Arc<BaseConsumer<RebalanceContext>>,
    /// Rewinds asked for and not yet made by the consumer thread.
    rewinds: Arc<PendingRewinds>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SinkConsumer {
    /// Joins `group`, subscribes to the topics matching `pattern` (a `^`-regex or a topic
    /// name), and forwards events to `events`.
    pub fn spawn(
        kafka: &KafkaConfig,
        group: &str,
        pattern: &str,
        loader: Arc<dyn OffsetLoader>,
        events: mpsc::Sender<ConsumerEvent>,
    ) -> Result<Self, TidelinkError> {
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(VecDeque::new()));
        let context = RebalanceContext {
            loader,
            events: events.clone(),
            stop: stop.clone(),
            held: held.clone(),
        };
        let consumer: BaseConsumer<RebalanceContext> = client_config::consumer(kafka, group)?
            .create_with_context(context)
            .map_err(|e| TidelinkError::permanent(format!("kafka consumer: {e}")))?;
        consumer
            .subscribe(&[pattern])
            .map_err(|e| TidelinkError::permanent(format!("subscribing to {pattern}: {e}")))?;
        let consumer = Arc::new(consumer);
        let rewinds = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let consumer = consumer.clone();
            let stop = stop.clone();
            let rewinds = rewinds.clone();
            std::thread::Builder::new()
                .name(format!("consumer {group}"))
                .spawn(move || poll_loop(&consumer, &stop, &events, &held, &rewinds))
                .map_err(|e| TidelinkError::permanent(format!("starting consumer thread: {e}")))?
        };
        Ok(Self {
            consumer,
            rewinds,
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the consumer thread to fetch a partition again from `offset` (`None`: from
    /// the beginning). Messages of the partition already on their way to the worker are
    /// from before; the [`ConsumerEvent::Rewound`] that follows them marks where the
    /// refetched ones begin.
    pub fn rewind(&self, partition: &TopicPartition, offset: Option<i64>) {
        if let Ok(mut rewinds) = self.rewinds.lock() {
            rewinds.retain(|(p, _)| p != partition);
            rewinds.push((partition.clone(), offset));
        }
    }

    /// Records applied offsets in Kafka too, for lag monitoring (asynchronous, best effort).
    pub fn commit_for_monitoring(&self, offsets: &[(TopicPartition, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in offsets {
            let _ = tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(*next));
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "monitoring offset commit failed");
        }
    }

    /// For every partition of the table topics of `prefix`: the group's committed offset
    /// and the high watermark. Blocking (metadata and offset requests).
    pub fn group_progress(
        &self,
        prefix: &str,
    ) -> Result<Vec<(TopicPartition, Option<i64>, i64)>, TidelinkError> {
        let timeout = Duration::from_secs(5);
        let metadata = self
            .consumer
            .fetch_metadata(None, timeout)
            .map_err(|e| TidelinkError::transient(format!("reading topic metadata: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        for topic in metadata.topics() {
            if crate::topics::is_table_topic(prefix, topic.name()) {
                for partition in topic.partitions() {
                    tpl.add_partition(topic.name(), partition.id());
                }
            }
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, timeout)
            .map_err(|e| TidelinkError::transient(format!("reading committed offsets: {e}")))?;
        let mut progress = Vec::new();
        for element in committed.elements() {
            let (_, high) = self
                .consumer
                .fetch_watermarks(element.topic(), element.partition(), timeout)
                .map_err(|e| TidelinkError::transient(format!("reading watermarks: {e}")))?;
            let offset = match element.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            progress.push((
                TopicPartition {
                    topic: element.topic().to_string(),
                    partition: element.partition(),
                },
                offset,
                high,
            ));
        }
        Ok(progress)
    }

    /// Leaves the group (revoking partitions) and stops the thread.
    pub fn close(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SinkConsumer {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// How long the worker may leave its channel full before fetching pauses.
const PAUSE_AFTER: Duration = Duration::from_secs(10);

/// The most messages handed to the worker in one event: what one poll round takes from
/// librdkafka's prefetched queue without waiting.
pub const MAX_MESSAGES_PER_EVENT: usize = 256;

/// Polls the consumer and hands events to the worker, waiting while its channel is full.
///
/// Polled messages queue in `held` and are handed over in runs, oldest first. The
/// rebalance callback (which runs inside `poll`) drops held messages of the partitions
/// that change hands before it reports the change, so a message of an older assignment
/// never reaches the worker after the event that ended it; messages of other partitions
/// keep their order.
///
/// When the worker stays behind for [`PAUSE_AFTER`] (its target is down), fetching pauses
/// instead of the poll blocking: the group keeps seeing a live member however long the
/// target is away (no `max.poll.interval.ms` expiry), the few messages already polled are
/// held here, and memory stays bounded by the channel and `queued.max.messages.kbytes`.
/// (Pausing drops librdkafka's prefetched messages, so it is not done for short waits.)
fn poll_loop(
    consumer: &BaseConsumer<RebalanceContext>,
    stop: &AtomicBool,
    events: &mpsc::Sender<ConsumerEvent>,
    held: &Mutex<VecDeque<OwnedMessage>>,
    rewinds: &PendingRewinds,
) {
    let mut paused = false;
    // Since when the worker's channel has been full.
    let mut blocked_since: Option<std::time::Instant> = None;
    let mut pause = Duration::from_micros(50);
    while !stop.load(Ordering::Relaxed) {
        rewind_asked(consumer, held, events, rewinds);
        let holding = held.lock().map(|h| h.len()).unwrap_or(0);
        if paused {
            // Nothing is fetched while paused: this poll keeps the group's session alive,
            // serves rebalances and paces the hand-over retries.
            poll_into(consumer, held, events, Duration::from_millis(100), 1);
        } else if holding < MAX_MESSAGES_PER_EVENT {
            // Wait for the first message only when nothing is waiting to be handed over;
            // then take what librdkafka already has, without waiting.
            let wait = if holding == 0 {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            poll_into(
                consumer,
                held,
                events,
                wait,
                MAX_MESSAGES_PER_EVENT - holding,
            );
        }
        // Hand over what is held, oldest first, in runs.
        loop {
            let run: Vec<OwnedMessage> = match held.lock() {
                Ok(mut held) => {
                    let n = held.len().min(MAX_MESSAGES_PER_EVENT);
                    held.drain(..n).collect()
                }
                Err(_) => Vec::new(),
            };
            if run.is_empty() {
                blocked_since = None;
                pause = Duration::from_micros(50);
                if paused {
                    if let Ok(assignment) = consumer.assignment() {
                        let _ = consumer.resume(&assignment);
                    }
                    paused = false;
                    tracing::info!("the sink worker caught up: fetching resumed");
                }
                break;
            }
            match events.try_send(ConsumerEvent::Messages(run)) {
                Ok(()) => {
                    blocked_since = None;
                    pause = Duration::from_micros(50);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if let (ConsumerEvent::Messages(run), Ok(mut held)) = (back, held.lock()) {
                        for message in run.into_iter().rev() {
                            held.push_front(message);
                        }
                    }
                    if paused || stop.load(Ordering::Relaxed) {
                        // Polling again (nothing is fetched while paused) keeps the
                        // group's session alive and serves rebalances.
                        break;
                    }
                    let since = *blocked_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() < PAUSE_AFTER {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(5));
                        continue;
                    }
                    if let Ok(assignment) = consumer.assignment() {
                        let _ = consumer.pause(&assignment);
                    }
                    paused = true;
                    tracing::info!(
                        "the sink worker is behind (its target is slow or down): fetching paused"
                    );
                    break;
                }
            }
        }
    }
    // Leave the group cleanly so the partitions move to the other workers at once.
    consumer.unsubscribe();
    for _ in 0..20 {
        let _ = consumer.poll(Duration::from_millis(50));
    }
}

/// Makes the rewinds the worker asked for: seeks, drops the partition's held messages (from
/// before the seek) and reports [`ConsumerEvent::Rewound`] behind everything handed over
/// already. A rewind of a partition no longer assigned is dropped; one the consumer cannot
/// make yet (the partition's fetch is still starting) is tried again next round.
fn rewind_asked(
    consumer: &BaseConsumer<RebalanceContext>,
    held: &Mutex<VecDeque<OwnedMessage>>,
    events: &mpsc::Sender<ConsumerEvent>,
    rewinds: &PendingRewinds,
) {
    let asked: Vec<(TopicPartition, Option<i64>)> = match rewinds.lock() {
        Ok(mut rewinds) if !rewinds.is_empty() => std::mem::take(&mut *rewinds),
        _ => return,
    };
    let assignment = consumer.assignment().ok();
    for (p, offset) in asked {
        let assigned = assignment
            .as_ref()
            .is_none_or(|a| a.find_partition(&p.topic, p.partition).is_some());
        if !assigned {
            continue;
        }
        let start = offset.map(Offset::Offset).unwrap_or(Offset::Beginning);
        if let Err(e) = consumer.seek(&p.topic, p.partition, start, Duration::from_secs(5)) {
            tracing::debug!(error = %e, topic = %p.topic, partition = p.partition, "seek not possible yet; trying again");
            if let Ok(mut rewinds) = rewinds.lock() {
                if !rewinds.iter().any(|(q, _)| *q == p) {
                    rewinds.push((p, offset));
                }
            }
            continue;
        }
        if let Ok(mut held) = held.lock() {
            held.retain(|m| !(p.partition == m.partition() && p.topic == m.topic()));
        }
        if events.blocking_send(ConsumerEvent::Rewound(p)).is_err() {
            return;
        }
    }
}

/// Polls up to `max` messages into `held`: the first within `wait`, the rest only if
/// librdkafka has them already. A consumer error ends the round and is reported.
fn poll_into(
    consumer: &BaseConsumer<RebalanceContext>,
    held: &Mutex<VecDeque<OwnedMessage>>,
    events: &mpsc::Sender<ConsumerEvent>,
    wait: Duration,
    max: usize,
) {
    let mut timeout = wait;
    for _ in 0..max {
        match consumer.poll(timeout) {
            None => return,
            Some(Ok(message)) => {
                // Locked per message: the rebalance callback, run inside `poll`, edits it.
                if let Ok(mut held) = held.lock() {
                    held.push_back(message.detach());
                }
            }
            Some(Err(e)) => {
                let error = e.to_string();
                if events
                    .try_send(ConsumerEvent::Error(error.clone()))
                    .is_err()
                {
                    tracing::warn!(error, "consumer error");
                }
                return;
            }
        }
        timeout = Duration::ZERO;
    }
}
