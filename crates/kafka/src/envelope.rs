//! The Debezium-compatible envelope. Value:
//! `{"before": {…}|null, "after": {…}|null, "source": {…}, "op": "c|u|d|r|t", "ts_ms": …,
//! "transaction": null}`; key: the primary-key columns as a JSON object (`{"id": 42}`).
//! Decoding also accepts Debezium's `{"schema": …, "payload": …}` wrapping, so topics written
//! by Debezium with schemas enabled can be replayed too.

use serde::{Deserialize, Serialize};
use tidelink_core::{ChangeEvent, Op, Row, SourceInfo, SourceOrder, TableId};

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    before: &'a Option<Row>,
    after: &'a Option<Row>,
    source: &'a SourceInfo,
    op: &'static str,
    ts_ms: i64,
    transaction: Option<()>,
}

/// Encodes an event as (key, value). A truncate has no key.
pub fn encode_change(event: &ChangeEvent, now_ms: i64) -> (Option<Vec<u8>>, Vec<u8>) {
    let mut encoder = EnvelopeEncoder::default();
    let (key, value) = encoder.encode(event, now_ms);
    (key.map(<[u8]>::to_vec), value.to_vec())
}

/// Encodes events into two buffers it keeps, so a stream of changes costs no allocation
/// for its messages once the buffers have grown to the largest envelope.
#[derive(Default)]
pub struct EnvelopeEncoder {
    key: Vec<u8>,
    value: Vec<u8>,
}

impl EnvelopeEncoder {
    /// Encodes an event as (key, value), valid until the next call. A truncate has no key.
    pub fn encode(&mut self, event: &ChangeEvent, now_ms: i64) -> (Option<&[u8]>, &[u8]) {
        self.key.clear();
        self.value.clear();
        if !event.key.is_empty() {
            serde_json::to_writer(&mut self.key, &event.key).expect("a JSON map always serializes");
        }
        serde_json::to_writer(
            &mut self.value,
            &EnvelopeOut {
                before: &event.before,
                after: &event.after,
                source: &event.source,
                op: event.op.code(),
                ts_ms: now_ms,
                transaction: None,
            },
        )
        .expect("an envelope always serializes");
        let key = (!event.key.is_empty()).then_some(self.key.as_slice());
        (key, &self.value)
    }
}

#[derive(Deserialize)]
struct SourceIn {
    schema: String,
    table: String,
    #[serde(default)]
    ts_ms: Option<i64>,
    // What places a streamed change in the source's log (see `SourceOrder`). Read
    // leniently: a foreign envelope with other types here is still a change.
    #[serde(default)]
    connector: Option<serde_json::Value>,
    #[serde(default)]
    snapshot: Option<serde_json::Value>,
    #[serde(default)]
    lsn: Option<serde_json::Value>,
    #[serde(default)]
    file: Option<serde_json::Value>,
    #[serde(default)]
    pos: Option<serde_json::Value>,
    #[serde(default)]
    seq: Option<serde_json::Value>,
    #[serde(default)]
    binlog_server_id: Option<serde_json::Value>,
}

impl SourceIn {
    fn order(&self) -> Option<SourceOrder> {
        fn number(v: &Option<serde_json::Value>) -> Option<u64> {
            v.as_ref().and_then(|v| v.as_u64())
        }
        fn text(v: &Option<serde_json::Value>) -> Option<&str> {
            v.as_ref().and_then(|v| v.as_str())
        }
        SourceOrder::of(
            text(&self.connector)?,
            text(&self.snapshot) == Some("false")
                || self.snapshot.as_ref().and_then(|v| v.as_bool()) == Some(false),
            number(&self.lsn),
            text(&self.file),
            number(&self.pos),
            number(&self.seq),
            number(&self.binlog_server_id).and_then(|n| u32::try_from(n).ok()),
        )
    }
}

#[derive(Deserialize)]
struct EnvelopeIn {
    // Sinks apply the key and the new image; the old image is skipped, not built.
    #[serde(default, rename = "before")]
    _before: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    after: Option<Row>,
    source: SourceIn,
    op: Op,
}

#[derive(Deserialize)]
struct Wrapped<T> {
    payload: T,
}

/// A change as a sink reads it back.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedChange {
    /// Source table.
    pub table: TableId,
    /// Operation.
    pub op: Op,
    /// Key columns (from the message key, or for a keyless message from `before`).
    pub key: Row,
    /// New row image.
    pub after: Option<Row>,
    /// Source commit time, when given.
    pub source_ts_ms: Option<i64>,
    /// Where the change sits in the source's log (streamed changes from tidelink sources).
    pub source_order: Option<SourceOrder>,
}

/// Decodes a message; the error says what is wrong with it.
pub fn decode_change(key: Option<&[u8]>, value: &[u8]) -> Result<DecodedChange, String> {
    let envelope: EnvelopeIn = match serde_json::from_slice(value) {
        Ok(e) => e,
        Err(direct) => match serde_json::from_slice::<Wrapped<EnvelopeIn>>(value) {
            Ok(w) => w.payload,
            Err(_) => return Err(format!("value is not a change envelope: {direct}")),
        },
    };
    let key = match key {
        Some(bytes) if !bytes.is_empty() => match serde_json::from_slice::<Row>(bytes) {
            // Debezium with schemas enabled: {"schema": …, "payload": {key columns}}.
            Ok(mut row)
                if row.len() == 2 && row.contains_key("schema") && row.contains_key("payload") =>
            {
                match row.remove("payload") {
                    Some(serde_json::Value::Object(payload)) => payload,
                    _ => return Err("key's `payload` is not an object of key columns".into()),
                }
            }
            Ok(row) => row,
            Err(e) => return Err(format!("key is not a JSON object of key columns: {e}")),
        },
        _ => Row::new(),
    };
    if key.is_empty() && envelope.op != Op::Truncate {
        return Err(format!(
            "{} change of {}.{} has no key",
            envelope.op.name(),
            envelope.source.schema,
            envelope.source.table
        ));
    }
    if envelope.after.is_none() && matches!(envelope.op, Op::Create | Op::Update | Op::Read) {
        return Err(format!("{} change without `after`", envelope.op.name()));
    }
    let source_order = envelope.source.order();
    Ok(DecodedChange {
        source_order,
        table: TableId::new(envelope.source.schema, envelope.source.table),
        op: envelope.op,
        key,
        after: envelope.after,
        source_ts_ms: envelope.source.ts_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> ChangeEvent {
        let mut key = Row::new();
        key.insert("id".into(), json!(7));
        let mut after = key.clone();
        after.insert("name".into(), json!("ada"));
        ChangeEvent {
            table: TableId::new("public", "users"),
            op: Op::Update,
            key,
            before: None,
            after: Some(after),
            source: SourceInfo {
                version: "0.1.0".into(),
                connector: "postgresql".into(),
                name: "shop".into(),
                ts_ms: 1_700_000_000_000,
                snapshot: "false".into(),
                db: "shop".into(),
                schema: "public".into(),
                table: "users".into(),
                tx_id: Some(42),
                lsn: Some(1234),
                seq: Some(3),
                ..Default::default()
            },
            columns: None,
        }
    }

    #[test]
    fn a_reused_encoder_writes_each_event_afresh() {
        let long = event();
        let mut short = event();
        short.op = Op::Truncate;
        short.key = Row::new();
        short.after = None;
        let mut encoder = EnvelopeEncoder::default();
        for e in [&long, &short, &long] {
            let (key, value) = encoder.encode(e, 5);
            let (expected_key, expected_value) = encode_change(e, 5);
            assert_eq!(key.map(<[u8]>::to_vec), expected_key);
            assert_eq!(value, expected_value.as_slice());
        }
        assert_eq!(encoder.encode(&short, 5).0, None, "a truncate has no key");
    }

    #[test]
    fn envelope_has_debezium_shape_and_round_trips() {
        let (key, value) = encode_change(&event(), 5);
        let json: serde_json::Value = serde_json::from_slice(&value).expect("json");
        assert_eq!(json["op"], "u");
        assert_eq!(json["before"], serde_json::Value::Null);
        assert_eq!(json["after"]["name"], "ada");
        assert_eq!(json["source"]["txId"], 42);
        assert_eq!(json["source"]["lsn"], 1234);
        assert_eq!(json["ts_ms"], 5);
        assert_eq!(key.as_deref(), Some(&b"{\"id\":7}"[..]));
        let decoded = decode_change(key.as_deref(), &value).expect("decodes");
        assert_eq!(decoded.table, TableId::new("public", "users"));
        assert_eq!(decoded.op, Op::Update);
        assert_eq!(decoded.after.expect("after")["name"], "ada");
        assert_eq!(
            decoded.source_order,
            Some(SourceOrder {
                log: 0,
                at: [1234, 0, 3]
            })
        );
        // Snapshot rows and envelopes without `seq` have no order.
        let mut snapshot = event();
        snapshot.source.snapshot = "true".into();
        let (_, value) = encode_change(&snapshot, 5);
        assert_eq!(
            decode_change(key.as_deref(), &value)
                .expect("decodes")
                .source_order,
            None
        );
    }

    #[test]
    fn debezium_schema_wrapping_is_accepted() {
        let value = json!({"schema": {}, "payload": {"before": null, "after": {"id": 1},
            "source": {"schema": "s", "table": "t"}, "op": "c"}});
        let key = json!({"schema": {}, "payload": {"id": 1}});
        let decoded = decode_change(
            Some(&serde_json::to_vec(&key).expect("json")),
            &serde_json::to_vec(&value).expect("json"),
        )
        .expect("decodes");
        assert_eq!(decoded.key["id"], 1);
    }

    #[test]
    fn mutated_and_foreign_messages_never_panic() {
        let (key, value) = encode_change(&event(), 5);
        let key = key.expect("key");
        let wrapped = br#"{"schema":{},"payload":{"before":null,"after":{"id":1},"source":{"schema":"s","table":"t"},"op":"r"}}"#;
        let seeds: [&[u8]; 3] = [&value, &key, wrapped];
        let mut mutator = tidelink_core::fuzz::Mutator::new(0xe1e1);
        for _ in 0..30_000 {
            let k = mutator.input(&seeds);
            let v = mutator.input(&seeds);
            let _ = decode_change(Some(&k), &v);
            let _ = decode_change(None, &v);
        }
    }

    #[test]
    fn foreign_messages_are_errors() {
        assert!(decode_change(Some(b"{}"), b"not json").is_err());
        assert!(decode_change(
            None,
            br#"{"op":"c","after":{},"source":{"schema":"s","table":"t"}}"#
        )
        .is_err());
        assert!(decode_change(
            Some(br#"{"id":1}"#),
            br#"{"op":"x","source":{"schema":"s","table":"t"}}"#
        )
        .is_err());
    }
}
