//! The Debezium-compatible envelope. Value:
//! `{"before": {…}|null, "after": {…}|null, "source": {…}, "op": "c|u|d|r|t", "ts_ms": …,
//! "transaction": null}`; key: the primary-key columns as a JSON object (`{"id": 42}`).
//! Decoding also accepts Debezium's `{"schema": …, "payload": …}` wrapping, so topics written
//! by Debezium with schemas enabled can be replayed too: the logical types the schema names
//! are converted to tidelink's forms (`connect_schema`). Envelopes in the shape tidelink
//! writes are read in place (`in_place`); every other message goes through serde.

mod connect_schema;
mod in_place;
mod json_out;
mod plain_text;

use serde::{Deserialize, Serialize};
use serde_json::Number;
use std::borrow::Cow;
use std::sync::Arc;
use tidelink_core::row::RecentNames;
use tidelink_core::{with_number_text, ChangeEvent, Op, Row, SourceInfo, SourceOrder, TableId};

/// Encodes an event as (key, value). A truncate has no key.
pub fn encode_change(event: &ChangeEvent, now_ms: i64) -> (Option<Vec<u8>>, Vec<u8>) {
    let mut encoder = EnvelopeEncoder::default();
    let (key, value) = encoder.encode(event, now_ms);
    (key.map(<[u8]>::to_vec), value.to_vec())
}

/// Encodes events into two buffers it keeps, so a stream of changes costs no allocation
/// for its messages once the buffers have grown to the largest envelope. The text of the
/// `source` block that stays the same from change to change (version, connector, pipeline,
/// database, table) is encoded once per table and copied after that.
#[derive(Default)]
pub struct EnvelopeEncoder {
    key: Vec<u8>,
    value: Vec<u8>,
    source_text: SourceText,
}

impl EnvelopeEncoder {
    /// Encodes an event as (key, value), valid until the next call. A truncate has no key.
    pub fn encode(&mut self, event: &ChangeEvent, now_ms: i64) -> (Option<&[u8]>, &[u8]) {
        self.key.clear();
        self.value.clear();
        if !event.key.is_empty() {
            json_out::write_row(&mut self.key, &event.key);
        }
        let out = &mut self.value;
        out.extend_from_slice(b"{\"before\":");
        json_out::write_optional_row(out, event.before.as_ref());
        out.extend_from_slice(b",\"after\":");
        json_out::write_optional_row(out, event.after.as_ref());
        out.extend_from_slice(b",\"source\":");
        self.source_text.write(out, &event.source);
        out.extend_from_slice(b",\"op\":\"");
        out.extend_from_slice(event.op.code().as_bytes());
        number_member(out, "\",\"ts_ms\":", now_ms);
        out.extend_from_slice(b",\"transaction\":null}");
        let key = (!event.key.is_empty()).then_some(self.key.as_slice());
        (key, &self.value)
    }
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("rows, text and numbers always serialize");
}

/// A whole number after `member`, the text up to the value (`,"name":`).
fn number_member(out: &mut Vec<u8>, member: &str, value: impl Into<Number>) {
    out.extend_from_slice(member.as_bytes());
    with_number_text(&value.into(), |text| out.extend_from_slice(text.as_bytes()));
}

/// `,"name":number`, or nothing for a field the event does not have.
fn optional_number(out: &mut Vec<u8>, member: &str, value: Option<impl Into<Number>>) {
    if let Some(value) = value {
        number_member(out, member, value);
    }
}

/// `,"name":"text"`, or nothing for a field the event does not have.
fn optional_text(out: &mut Vec<u8>, member: &str, value: Option<&str>) {
    if let Some(value) = value {
        out.extend_from_slice(member.as_bytes());
        json_out::write_text(out, value);
    }
}

/// The opening of a `source` block up to its changing fields, kept for the text it was
/// made of (compared by pointer: a source shares one text per table among its changes).
#[derive(Default)]
struct SourceText {
    made_of: Option<[Arc<str>; 7]>,
    opening: Vec<u8>,
}

impl SourceText {
    /// Writes `source` as a JSON object with the same fields as its `Serialize` form.
    fn write(&mut self, out: &mut Vec<u8>, source: &SourceInfo) {
        let opening = [
            ("version", &source.version),
            ("connector", &source.connector),
            ("name", &source.name),
            ("snapshot", &source.snapshot),
            ("db", &source.db),
            ("schema", &source.schema),
            ("table", &source.table),
        ];
        let same = self.made_of.as_ref().is_some_and(|made_of| {
            made_of
                .iter()
                .zip(opening)
                .all(|(kept, (_, text))| Arc::ptr_eq(kept, text))
        });
        if !same {
            self.opening.clear();
            for (i, (name, text)) in opening.into_iter().enumerate() {
                self.opening.push(if i == 0 { b'{' } else { b',' });
                write_json(&mut self.opening, name);
                self.opening.push(b':');
                write_json(&mut self.opening, &**text);
            }
            self.made_of = Some(opening.map(|(_, text)| text.clone()));
        }
        out.extend_from_slice(&self.opening);
        number_member(out, ",\"ts_ms\":", source.ts_ms);
        optional_number(out, ",\"txId\":", source.tx_id);
        optional_number(out, ",\"lsn\":", source.lsn);
        optional_text(out, ",\"file\":", source.file.as_deref());
        optional_number(out, ",\"pos\":", source.pos);
        optional_text(out, ",\"gtid\":", source.gtid.as_deref());
        optional_number(out, ",\"server_id\":", source.server_id);
        optional_number(out, ",\"row\":", source.row);
        optional_number(out, ",\"seq\":", source.seq);
        optional_number(out, ",\"binlog_server_id\":", source.binlog_server_id);
        out.push(b'}');
    }
}

#[derive(Debug, PartialEq, Deserialize)]
struct SourceIn<'a> {
    // PostgreSQL's schema; Debezium's MySQL connector names only the database (`db`),
    // which is the schema of a MySQL table.
    #[serde(default, borrow)]
    schema: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    db: Option<Cow<'a, str>>,
    #[serde(borrow)]
    table: Cow<'a, str>,
    #[serde(default)]
    ts_ms: Option<i64>,
    // What places a streamed change in the source's log (see `SourceOrder`). Read
    // leniently: a foreign envelope with other types here is still a change.
    #[serde(default, borrow)]
    connector: Lenient<'a>,
    #[serde(default, borrow)]
    snapshot: Lenient<'a>,
    #[serde(default, borrow)]
    lsn: Lenient<'a>,
    #[serde(default, borrow)]
    file: Lenient<'a>,
    #[serde(default, borrow)]
    pos: Lenient<'a>,
    #[serde(default, borrow)]
    seq: Lenient<'a>,
    #[serde(default, borrow)]
    binlog_server_id: Lenient<'a>,
}

impl SourceIn<'_> {
    fn schema(&self) -> Option<&str> {
        self.schema.as_deref().or(self.db.as_deref())
    }

    fn order(&self) -> Option<SourceOrder> {
        SourceOrder::of(
            self.connector.text()?,
            matches!(self.snapshot.text(), Some("false"))
                || matches!(self.snapshot, Lenient::Bool(false)),
            self.lsn.number(),
            self.file.text(),
            self.pos.number(),
            self.seq.number(),
            self.binlog_server_id
                .number()
                .and_then(|n| u32::try_from(n).ok()),
        )
    }
}

/// A `source` field that may hold anything: text (borrowed from the message when it has
/// no escapes), a whole number, a boolean, or something else that is skipped.
#[derive(Debug, PartialEq, Default)]
enum Lenient<'a> {
    #[default]
    Other,
    Text(Cow<'a, str>),
    Number(u64),
    Bool(bool),
}

impl Lenient<'_> {
    fn text(&self) -> Option<&str> {
        match self {
            Lenient::Text(t) => Some(t),
            _ => None,
        }
    }

    fn number(&self) -> Option<u64> {
        match self {
            Lenient::Number(n) => Some(*n),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Lenient<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Lenient<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Lenient::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Lenient::Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(u64::try_from(v).map_or(Lenient::Other, Lenient::Number))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient::Other)
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Lenient::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Lenient::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient::Other)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Lenient::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Lenient::Other)
            }
        }
        deserializer.deserialize_any(Visit(std::marker::PhantomData))
    }
}

#[derive(Debug, Deserialize)]
struct EnvelopeIn<'a> {
    // Sinks apply the key and the new image; the old image is skipped, not built.
    #[serde(default, rename = "before")]
    _before: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    after: Option<Row>,
    #[serde(borrow)]
    source: SourceIn<'a>,
    op: Op,
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
    ChangeDecoder::default().decode(key, value)
}

/// How many tables a decoder remembers, so that the changes of a table share its name.
const REMEMBERED_TABLES: usize = 32;

/// Decodes messages one after another; the changes of one table share one [`TableId`]
/// and their rows share column names, instead of each allocating its names.
#[derive(Default)]
pub struct ChangeDecoder {
    tables: Vec<TableId>,
    names: RecentNames,
}

impl ChangeDecoder {
    /// Decodes a message; the error says what is wrong with it.
    pub fn decode(&mut self, key: Option<&[u8]>, value: &[u8]) -> Result<DecodedChange, String> {
        // Checked as UTF-8 once, in bulk, so the parser need not check each string again.
        let value =
            std::str::from_utf8(value).map_err(|e| format!("value is not UTF-8 text: {e}"))?;
        let envelope = match in_place::envelope(value, &mut self.names) {
            Some(envelope) => envelope,
            None => envelope_by_serde(value)?,
        };
        let key = match key {
            Some(bytes) if !bytes.is_empty() => decode_key(bytes, &mut self.names)?,
            _ => Row::new(),
        };
        let schema = envelope
            .source
            .schema()
            .ok_or("`source` names neither a `schema` nor a `db`")?;
        if key.is_empty() && envelope.op != Op::Truncate {
            return Err(format!(
                "{} change of {schema}.{} has no key",
                envelope.op.name(),
                envelope.source.table
            ));
        }
        if envelope.after.is_none() && matches!(envelope.op, Op::Create | Op::Update | Op::Read) {
            return Err(format!("{} change without `after`", envelope.op.name()));
        }
        Ok(DecodedChange {
            source_order: envelope.source.order(),
            table: self.table(schema, &envelope.source.table),
            op: envelope.op,
            key,
            after: envelope.after,
            source_ts_ms: envelope.source.ts_ms,
        })
    }

    fn table(&mut self, schema: &str, name: &str) -> TableId {
        if let Some(known) = self
            .tables
            .iter()
            .find(|t| &*t.name == name && &*t.schema == schema)
        {
            return known.clone();
        }
        let table = TableId::new(schema, name);
        if self.tables.len() < REMEMBERED_TABLES {
            self.tables.push(table.clone());
        }
        table
    }
}

/// An envelope, plain or wrapped in Debezium's `{"schema": …, "payload": …}`, read through
/// serde: every message the in-place reader leaves, and the words of every error.
fn envelope_by_serde(value: &str) -> Result<EnvelopeIn<'_>, String> {
    match serde_json::from_str(value) {
        Ok(envelope) => Ok(envelope),
        Err(direct) => match unwrap_schema(value) {
            Some(Ok(payload)) => EnvelopeIn::<'static>::deserialize(payload)
                .map_err(|e| format!("value's `payload` is not a change envelope: {e}")),
            Some(Err(e)) => Err(format!("value's `payload` does not match its schema: {e}")),
            None => Err(format!("value is not a change envelope: {direct}")),
        },
    }
}

/// The payload of a `{"schema": …, "payload": …}` message with its logical types converted
/// by the schema; `None` when the text is not such a message.
fn unwrap_schema(text: &str) -> Option<Result<serde_json::Value, String>> {
    let serde_json::Value::Object(mut message) = serde_json::from_str(text).ok()? else {
        return None;
    };
    let mut payload = message.remove("payload")?;
    let schema = message.remove("schema")?;
    Some(connect_schema::convert_envelope(&schema, &mut payload).map(|()| payload))
}

fn decode_key(bytes: &[u8], names: &mut RecentNames) -> Result<Row, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("key is not UTF-8 text: {e}"))?;
    let row = match in_place::row(text, names) {
        Some(row) => Ok(row),
        None => serde_json::from_str::<Row>(text),
    };
    match row {
        // Debezium with schemas enabled: {"schema": …, "payload": {key columns}}.
        Ok(mut row)
            if row.len() == 2 && row.contains_key("schema") && row.contains_key("payload") =>
        {
            let schema = row.remove("schema").unwrap_or_default();
            let Some(serde_json::Value::Object(mut columns)) = row.remove("payload") else {
                return Err("key's `payload` is not an object of key columns".into());
            };
            connect_schema::convert_row(&schema, &mut columns)
                .map_err(|e| format!("key's `payload` does not match its schema: {e}"))?;
            Row::from_json(serde_json::Value::Object(columns))
                .ok_or_else(|| "key's `payload` is not an object of key columns".into())
        }
        Ok(row) => Ok(row),
        Err(e) => Err(format!("key is not a JSON object of key columns: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> ChangeEvent {
        let mut key = Row::new();
        key.insert("id", json!(7));
        let mut after = key.clone();
        after.insert("name", json!("ada"));
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

    /// The envelope as serde's derived `Serialize` writes it: what the encoder must equal.
    #[derive(Serialize)]
    struct ReferenceEnvelope<'a> {
        before: &'a Option<Row>,
        after: &'a Option<Row>,
        source: &'a SourceInfo,
        op: &'static str,
        ts_ms: i64,
        transaction: Option<()>,
    }

    #[test]
    fn the_encoder_writes_every_source_field_as_serde_would() {
        let postgres = event();
        let mut mysql = event();
        mysql.before = mysql.after.clone();
        // Every field spelled out (no `..Default::default()`): a field added to `SourceInfo`
        // stops this test from compiling until `SourceText::write` writes it too.
        mysql.source = SourceInfo {
            version: "0.1.0".into(),
            connector: "mysql".into(),
            name: "shop \"east\"".into(),
            ts_ms: 1_700_000_000_001,
            snapshot: "false".into(),
            db: "shop".into(),
            schema: "shop".into(),
            table: "odd\\name\u{e9}".into(),
            file: Some("binlog.000002".into()),
            pos: Some(4711),
            gtid: Some("0-1-77".into()),
            server_id: Some(1),
            row: Some(2),
            seq: Some(5),
            binlog_server_id: Some(1),
            tx_id: Some(88),
            lsn: Some(99),
        };
        let mut snapshot = event();
        snapshot.source.snapshot = "true".into();
        snapshot.source.tx_id = None;
        snapshot.source.lsn = None;
        snapshot.source.seq = None;
        let mut encoder = EnvelopeEncoder::default();
        // Alternating tables: the kept opening of the block must follow each change.
        for e in [&postgres, &mysql, &postgres, &snapshot, &postgres] {
            let (_, value) = encoder.encode(e, 9);
            let written: serde_json::Value = serde_json::from_slice(value).expect("json");
            let expected = serde_json::to_value(ReferenceEnvelope {
                before: &e.before,
                after: &e.after,
                source: &e.source,
                op: e.op.code(),
                ts_ms: 9,
                transaction: None,
            })
            .expect("serializes");
            assert_eq!(written, expected);
        }
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

    /// A message as Debezium's PostgreSQL connector writes it with schemas enabled (trimmed
    /// to a few columns): the logical types arrive in tidelink's forms.
    #[test]
    fn debezium_logical_types_are_converted_by_the_schema() {
        let decimal = json!({"type": "bytes", "optional": true, "field": "amount",
            "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}});
        let day = json!({"type": "int32", "optional": true, "field": "day",
            "name": "io.debezium.time.Date"});
        let row = json!({"type": "struct", "fields": [
            {"type": "int32", "optional": false, "field": "id"}, decimal, day]});
        let mut before = row.clone();
        before["field"] = json!("before");
        let mut after = row;
        after["field"] = json!("after");
        let value = json!({
            "schema": {"type": "struct", "fields": [before, after,
                {"type": "struct", "field": "source", "fields": []},
                {"type": "string", "field": "op"}]},
            "payload": {"before": null, "after": {"id": 1, "amount": "AeJA", "day": 19782},
                "source": {"version": "3.6.1.Final", "connector": "postgresql", "name": "dbz",
                    "ts_ms": 1, "snapshot": "false", "db": "app", "schema": "public",
                    "table": "items", "lsn": 123},
                "op": "c", "ts_ms": 2}});
        let key = json!({"schema": {"type": "struct", "fields": [
            {"type": "bytes", "field": "code", "name": "org.apache.kafka.connect.data.Decimal",
             "parameters": {"scale": "1"}}]}, "payload": {"code": "/w=="}});
        let decoded = decode_change(
            Some(&serde_json::to_vec(&key).expect("json")),
            &serde_json::to_vec(&value).expect("json"),
        )
        .expect("decodes");
        assert_eq!(decoded.key["code"], "-0.1");
        let after = decoded.after.expect("after");
        assert_eq!(after["amount"], "1234.56");
        assert_eq!(after["day"], "2024-02-29");
        assert_eq!(after["id"], 1);
        assert_eq!(decoded.table, TableId::new("public", "items"));

        let mut broken = value.clone();
        broken["payload"]["after"]["amount"] = json!(12);
        let error = decode_change(
            Some(&serde_json::to_vec(&key).expect("json")),
            &serde_json::to_vec(&broken).expect("json"),
        )
        .expect_err("a number is no Decimal");
        assert!(error.contains("`after` column `amount`"), "{error}");
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
