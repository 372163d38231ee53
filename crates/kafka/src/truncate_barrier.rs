//! The Kafka headers that make a truncate a barrier across partitions: the publisher
//! sends a keyed table's truncate to every partition of its topic with these headers, and
//! the sink worker reads them back into a [`TruncateBarrier`].

use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::Message;
use tidelink_core::TruncateBarrier;

/// Names the truncate (the same in every partition's copy).
pub const BARRIER_ID_HEADER: &str = "tidelink.truncate.barrier";
/// How many partitions carry a copy.
pub const BARRIER_PARTITIONS_HEADER: &str = "tidelink.truncate.partitions";

/// The headers of one copy of a barrier truncate.
pub fn barrier_headers(barrier: &TruncateBarrier) -> OwnedHeaders {
    let partitions = barrier.partitions.to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: BARRIER_ID_HEADER,
            value: Some(barrier.id.as_bytes()),
        })
        .insert(Header {
            key: BARRIER_PARTITIONS_HEADER,
            value: Some(partitions.as_bytes()),
        })
}

/// The barrier a message is a copy of, if it carries both headers and more than one
/// partition takes part (a truncate in a single partition is ordered already).
pub fn barrier_of(message: &impl Message) -> Option<TruncateBarrier> {
    let headers = message.headers()?;
    let mut id = None;
    let mut partitions = None;
    for header in headers.iter() {
        match header.key {
            BARRIER_ID_HEADER => id = header.value.and_then(|v| std::str::from_utf8(v).ok()),
            BARRIER_PARTITIONS_HEADER => {
                partitions = header
                    .value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse::<i32>().ok())
            }
            _ => {}
        }
    }
    match (id, partitions) {
        (Some(id), Some(partitions)) if partitions > 1 => Some(TruncateBarrier {
            id: id.into(),
            partitions,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn message(headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            headers,
        )
    }

    #[test]
    fn a_barrier_survives_its_headers() {
        let barrier = TruncateBarrier {
            id: "public.t@0/16B3748:3".into(),
            partitions: 4,
        };
        assert_eq!(
            barrier_of(&message(Some(barrier_headers(&barrier)))),
            Some(barrier)
        );
    }

    #[test]
    fn one_partition_or_no_headers_is_no_barrier() {
        let single = TruncateBarrier {
            id: "x".into(),
            partitions: 1,
        };
        assert_eq!(barrier_of(&message(Some(barrier_headers(&single)))), None);
        assert_eq!(barrier_of(&message(None)), None);
        let only_id = OwnedHeaders::new().insert(Header {
            key: BARRIER_ID_HEADER,
            value: Some("x"),
        });
        assert_eq!(barrier_of(&message(Some(only_id))), None);
    }
}
