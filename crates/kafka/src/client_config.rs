//! librdkafka client settings: tidelink's safe defaults, then the operator's pass-through
//! properties (TLS, SASL, tuning) on top, except the few that would break the guarantees.

use rdkafka::ClientConfig;
use std::collections::VecDeque;
use tidelink_config::KafkaConfig;
use tidelink_core::TidelinkError;

/// Producer settings: idempotent, `acks=all`, a 25 ms linger, no compression unless the
/// operator's `properties` ask for it (`compression.type`). Compression is Kafka's
/// trade-off to make, not tidelink's: it costs the producer and consumer CPU and saves
/// network and disk bytes (JSON envelopes shrink several times with lz4). Brokers that
/// re-encode records (tansu stores each record and rebuilds batches on fetch) pay for it
/// too: there lz4 cut end-to-end throughput by a sixth (docs/tuning.md).
pub fn producer(kafka: &KafkaConfig) -> Result<ClientConfig, TidelinkError> {
    let mut config = base(kafka);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "none")
        // How long librdkafka gathers a partition's messages before sending a batch. At 5 ms
        // (librdkafka's default) a stream of 50k changes/s went out in ~1,000 small produce
        // requests a second, each waking the broker thread, the delivery-report thread and
        // the publisher once: 25 ms cut the CPU per change by about a sixth and added ~11 ms
        // to the median commit-to-apply latency (docs/tuning.md). `properties` may set less.
        .set("linger.ms", "25")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "0");
    apply_overrides(
        &mut config,
        kafka,
        Role::Producer,
        &["enable.idempotence", "acks"],
    )?;
    Ok(config)
}

/// How often a sink's consumer refreshes the cluster's metadata, and with it which topics
/// its pattern subscription matches: a new table's topic is consumed at most this long
/// after it was created.
pub const METADATA_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Consumer settings for a sink worker: manual offsets, cooperative-sticky assignment.
pub fn consumer(kafka: &KafkaConfig, group: &str) -> Result<ClientConfig, TidelinkError> {
    let mut config = base(kafka);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        // A worker that dies (kill -9, a lost machine) hands its partitions over once the
        // coordinator has heard nothing from it for the session timeout: 6 s, the least
        // Kafka accepts by default (`group.min.session.timeout.ms`), puts the survivors to
        // work 6-8 s after the crash. Heartbeats come from librdkafka's own thread, so a
        // long batch does not miss them; a clean shutdown leaves the group at once.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set(
            "topic.metadata.refresh.interval.ms",
            METADATA_REFRESH.as_millis().to_string(),
        )
        // How long the broker may hold a fetch that has nothing (or less than
        // `fetch.min.bytes`) to return. librdkafka's default, 500 ms, was most of the
        // commit-to-apply latency on a quiet stream. Kafka answers as soon as data is there,
        // so this only paces an idle consumer's fetches; tansu holds every fetch for the
        // whole wait, so there it adds 20-40 ms to each change (50 ms gave 50-100).
        .set("fetch.wait.max.ms", "20")
        // Prefetched messages wait here while the target is slow or down; 16 MiB keeps a
        // worker busy and its memory small (librdkafka's default is 64 MiB).
        .set("queued.max.messages.kbytes", "16384")
        // When that queue is full, librdkafka postpones the partition's next fetch by this
        // much (default 1 s). A fast sink drains 16 MiB in well under a second, then sat
        // idle for the rest of it: draining a backlog ran at half speed (docs/tuning.md).
        .set("fetch.queue.backoff.ms", "10");
    apply_overrides(
        &mut config,
        kafka,
        Role::Consumer,
        &["group.id", "enable.auto.commit", "enable.auto.offset.store"],
    )?;
    Ok(config)
}

/// Admin client settings.
pub fn admin(kafka: &KafkaConfig) -> Result<ClientConfig, TidelinkError> {
    let mut config = base(kafka);
    apply_overrides(&mut config, kafka, Role::Admin, &[])?;
    Ok(config)
}

fn base(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", "tidelink");
    config
}

/// Which client a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Producer,
    Consumer,
    Admin,
}

/// Properties only a producer understands.
const PRODUCER_ONLY: &[&str] = &[
    "compression.type",
    "compression.codec",
    "compression.level",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "batch.num.messages",
    "batch.size",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "request.required.acks",
    "acks",
    "enable.idempotence",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "retries",
    "message.send.max.retries",
    "retry.backoff.ms",
    "sticky.partitioning.linger.ms",
    "partitioner",
];

fn apply_overrides(
    config: &mut ClientConfig,
    kafka: &KafkaConfig,
    role: Role,
    protected: &[&str],
) -> Result<(), TidelinkError> {
    for (key, value) in &kafka.properties {
        if role != Role::Producer && PRODUCER_ONLY.contains(&key.as_str()) {
            // One `properties` block serves every client; producer tuning means nothing
            // to consumers and admin clients (librdkafka would warn about it).
            continue;
        }
        if protected.contains(&key.as_str()) {
            return Err(TidelinkError::permanent(format!(
                "kafka.properties.{key}: tidelink sets this itself to keep its delivery guarantees; remove it"
            )));
        }
        config.set(key, value);
    }
    Ok(())
}

/// Sends a librdkafka log line to `tracing` (target `librdkafka`).
pub fn forward_log(level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            RECENT_FAILURES.remember(facility, message);
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        L::Warning => {
            RECENT_FAILURES.remember(facility, message);
            tracing::warn!(target: "librdkafka", facility, "{message}")
        }
        L::Notice | L::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        L::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// Reports a librdkafka client error to `tracing` (target `librdkafka`); the client keeps
/// retrying on its own. A broker failure that librdkafka has just logged (its `FAIL` log
/// line ends with the error's text) is not reported again.
pub fn forward_error(error: rdkafka::error::KafkaError, reason: &str) {
    if RECENT_FAILURES.logged(reason) {
        tracing::debug!(target: "librdkafka", %error, "{reason}");
    } else {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }
}

/// The context of a client that needs nothing else from librdkafka: its log lines and
/// errors go to `tracing` as every other client's do ([`forward_log`], [`forward_error`]).
#[derive(Clone, Copy, Default)]
pub struct Forwarding;

impl rdkafka::ClientContext for Forwarding {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        forward_error(error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for Forwarding {}

/// The last few broker failures librdkafka logged (its `FAIL` facility), by every client of
/// the process: librdkafka also reports each one as an error event, with the same text.
static RECENT_FAILURES: RecentFailures = RecentFailures(std::sync::Mutex::new(VecDeque::new()));

struct RecentFailures(std::sync::Mutex<VecDeque<String>>);

impl RecentFailures {
    const KEPT: usize = 16;

    fn remember(&self, facility: &str, message: &str) {
        if facility != "FAIL" {
            return;
        }
        if let Ok(mut recent) = self.0.lock() {
            if recent.len() == Self::KEPT {
                recent.pop_front();
            }
            recent.push_back(message.to_string());
        }
    }

    /// Whether `reason` was logged (and forgets it: the next such failure is new).
    fn logged(&self, reason: &str) -> bool {
        let Ok(mut recent) = self.0.lock() else {
            return false;
        };
        match recent.iter().position(|m| m.ends_with(reason)) {
            Some(at) => {
                recent.remove(at);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_failure_logged_is_not_reported_again_as_an_error_event() {
        let recent = RecentFailures(std::sync::Mutex::new(VecDeque::new()));
        let reason = "127.0.0.1:9/1: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)";
        recent.remember("FAIL", &format!("[thrd:127.0.0.1:9/1]: {reason}"));
        recent.remember("CONFWARN", "some other warning");
        assert!(recent.logged(reason), "the event repeats the log line");
        assert!(!recent.logged(reason), "once: the next failure is new");
        assert!(
            !recent.logged("some other warning"),
            "only FAIL lines are kept"
        );
        for i in 0..40 {
            recent.remember("FAIL", &format!("failure {i}"));
        }
        assert!(!recent.logged("failure 0"), "only the last few are kept");
        assert!(recent.logged("failure 39"));
    }
}
