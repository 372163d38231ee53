//! Reads envelopes and keys in the shape tidelink's encoder writes them, in place, without
//! going through serde's visitors: objects whose member names are text without escapes,
//! text without escapes, whole numbers, `null`, `true` and `false`. Any other value (text
//! with escapes, fractions, nested objects and arrays) is handed to serde_json for that one
//! value, so it is decoded exactly as serde_json decodes it. Anything this reader does not
//! expect — a member name with escapes, a field twice, a value of the wrong type, bad
//! syntax — makes it give the message up (`None`), and the caller decodes the message with
//! serde, which also words the error. On every message this reader does accept, the two
//! agree (the tests compare them on many mutated messages).

use super::plain_text::plain_text_length;
use super::{EnvelopeIn, Lenient, SourceIn};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{Number, Value};
use std::borrow::Cow;
use tidelink_core::row::RecentNames;
use tidelink_core::{Op, Row};

/// The envelope of a change, or `None` to leave the message to serde. Its rows' names
/// are shared with those in `names`.
pub(super) fn envelope<'a>(text: &'a str, names: &mut RecentNames) -> Option<EnvelopeIn<'a>> {
    let mut reader = Reader { text, at: 0, names };
    let mut before = false;
    let mut after: Option<Option<Row>> = None;
    let mut source = None;
    let mut op = None;
    reader.object(ENVELOPE_FIELDS, |reader, field| match field {
        Some(EnvelopeField::Before) if !before => {
            before = true;
            reader.skip()
        }
        Some(EnvelopeField::After) if after.is_none() => {
            after = Some(reader.optional_row()?);
            Some(())
        }
        Some(EnvelopeField::Source) if source.is_none() => {
            source = Some(reader.source()?);
            Some(())
        }
        Some(EnvelopeField::Op) if op.is_none() => {
            op = Some(reader.op()?);
            Some(())
        }
        // A field twice: serde's error.
        Some(EnvelopeField::Before | EnvelopeField::After | EnvelopeField::Source)
        | Some(EnvelopeField::Op) => None,
        Some(EnvelopeField::Other) | None => reader.skip(),
    })?;
    reader.end()?;
    Some(EnvelopeIn {
        _before: None,
        after: after.flatten(),
        source: source?,
        op: op?,
    })
}

/// A message key's object of columns, or `None` to leave the key to serde. Its names are
/// shared with those in `names`.
pub(super) fn row(text: &str, names: &mut RecentNames) -> Option<Row> {
    let mut reader = Reader { text, at: 0, names };
    let row = reader.row()?;
    reader.end()?;
    Some(row)
}

/// The fields of an envelope the reader looks for.
#[derive(Clone, Copy)]
enum EnvelopeField {
    Before,
    After,
    Source,
    Op,
    Other,
}

/// The envelope's members, in the order `EnvelopeEncoder` writes them.
const ENVELOPE_FIELDS: &[(&str, EnvelopeField)] = &[
    ("before", EnvelopeField::Before),
    ("after", EnvelopeField::After),
    ("source", EnvelopeField::Source),
    ("op", EnvelopeField::Op),
    ("ts_ms", EnvelopeField::Other),
    ("transaction", EnvelopeField::Other),
];

/// The fields of a `source` block the reader looks for.
#[derive(Clone, Copy)]
enum SourceField {
    Schema,
    Table,
    TsMs,
    Connector,
    Snapshot,
    Db,
    Lsn,
    File,
    Pos,
    Seq,
    BinlogServerId,
    Other,
}

/// The `source` block's members, in the order `EnvelopeEncoder` writes them (those after
/// `ts_ms` only where the source has them).
const SOURCE_FIELDS: &[(&str, SourceField)] = &[
    ("version", SourceField::Other),
    ("connector", SourceField::Connector),
    ("name", SourceField::Other),
    ("snapshot", SourceField::Snapshot),
    ("db", SourceField::Db),
    ("schema", SourceField::Schema),
    ("table", SourceField::Table),
    ("ts_ms", SourceField::TsMs),
    ("txId", SourceField::Other),
    ("lsn", SourceField::Lsn),
    ("file", SourceField::File),
    ("pos", SourceField::Pos),
    ("gtid", SourceField::Other),
    ("server_id", SourceField::Other),
    ("row", SourceField::Other),
    ("seq", SourceField::Seq),
    ("binlog_server_id", SourceField::BinlogServerId),
];

/// A cursor over the message's text, and the column names its rows share.
struct Reader<'a, 'n> {
    text: &'a str,
    at: usize,
    names: &'n mut RecentNames,
}

impl<'a> Reader<'a, '_> {
    /// The next byte after whitespace (left in place), or `None` at the end.
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        while let Some(&byte) = bytes.get(self.at) {
            if !matches!(byte, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(byte);
            }
            self.at += 1;
        }
        None
    }

    /// Takes `byte` after whitespace, or fails.
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Only whitespace is left.
    fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// Text without escapes, its quotes taken off; `None`, the cursor unmoved past the
    /// whitespace, for anything else.
    fn plain_text(&mut self) -> Option<&'a str> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.at + 1;
        let end = start + plain_text_length(&self.text.as_bytes()[start..])?;
        if self.text.as_bytes()[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        // Both ends are quotes, so both are character boundaries.
        self.text.get(start..end)
    }

    /// `literal` (`null`, `true`, `false`) at the cursor.
    fn literal(&mut self, literal: &str) -> Option<()> {
        self.text[self.at..].starts_with(literal).then(|| {
            self.at += literal.len();
        })
    }

    /// A whole number as serde_json reads it: non-negative ones as `u64`, negative ones as
    /// `i64`. `None`, the cursor unmoved, for anything serde_json reads otherwise (a
    /// fraction or exponent, `-0`, a number too large) or not at all.
    fn whole_number(&mut self) -> Option<Number> {
        let bytes = self.text.as_bytes();
        let negative = bytes.get(self.at) == Some(&b'-');
        let first = self.at + usize::from(negative);
        let mut at = first;
        let mut magnitude: u64 = 0;
        while let Some(&digit @ b'0'..=b'9') = bytes.get(at) {
            magnitude = magnitude
                .checked_mul(10)?
                .checked_add(u64::from(digit - b'0'))?;
            at += 1;
        }
        let digits = at - first;
        if digits == 0
            || (digits > 1 && bytes[first] == b'0')
            || matches!(bytes.get(at), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        let number = if negative {
            // serde_json reads `-0` as a float.
            if magnitude == 0 {
                return None;
            }
            Number::from(0i64.checked_sub_unsigned(magnitude)?)
        } else {
            Number::from(magnitude)
        };
        self.at = at;
        Some(number)
    }

    /// One value at the cursor decoded by serde_json.
    fn by_serde<T: Deserialize<'a>>(&mut self) -> Option<T> {
        let mut values = serde_json::Deserializer::from_str(&self.text[self.at..]).into_iter::<T>();
        let value = values.next()?.ok()?;
        self.at += values.byte_offset();
        Some(value)
    }

    /// The member name `expected` at the cursor (as `"expected"`, no whitespace before
    /// it), taken; `None`, the cursor unmoved, for any other name.
    fn expected_name<'e>(&mut self, expected: &'e str) -> Option<&'e str> {
        Self::name_at(self.text, &mut self.at, expected).then_some(expected)
    }

    /// Whether the member name `expected` is at `at` in `text` (as `"expected"`); if it
    /// is, `at` moves past it. (A function of the fields it needs, so that a row can look
    /// its names up while it holds the names it compares.)
    fn name_at(text: &str, at: &mut usize, expected: &str) -> bool {
        let Some(rest) = text.as_bytes().get(*at..) else {
            return false;
        };
        let length = expected.len();
        let matches = rest.len() > length + 1
            && rest[0] == b'"'
            && rest[1..=length] == *expected.as_bytes()
            && rest[length + 1] == b'"';
        if matches {
            *at += length + 2;
        }
        matches
    }

    /// An object, each member's value read by `member`, given the member's field when its
    /// name is one of `fields` (`None` for any other name). `fields` are in the order
    /// tidelink's encoder writes them: each name is first compared with the one expected
    /// after the previous, and only read and looked up if it is another.
    fn object<F: Copy>(
        &mut self,
        fields: &[(&str, F)],
        mut member: impl FnMut(&mut Self, Option<F>) -> Option<()>,
    ) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        let mut next = 0;
        loop {
            let guessed = fields
                .get(next)
                .filter(|(name, _)| self.expected_name(name).is_some());
            let field = match guessed {
                Some(&(_, field)) => {
                    next += 1;
                    Some(field)
                }
                None => {
                    let name = self.plain_text()?;
                    let found = fields.iter().position(|&(known, _)| known == name);
                    if let Some(i) = found {
                        next = i + 1;
                    }
                    found.map(|i| fields[i].1)
                }
            };
            self.eat(b':')?;
            member(self, field)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Any value, passed over.
    fn skip(&mut self) -> Option<()> {
        let done = match self.peek()? {
            b'"' => self.plain_text().map(drop),
            b'n' => self.literal("null"),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'-' | b'0'..=b'9' => self.whole_number().map(drop),
            _ => None,
        };
        done.or_else(|| self.by_serde::<IgnoredAny>().map(drop))
    }

    /// Any value, as a `serde_json::Value`.
    fn value(&mut self) -> Option<Value> {
        let read = match self.peek()? {
            b'"' => self.plain_text().map(|text| Value::String(text.to_owned())),
            b'n' => self.literal("null").map(|()| Value::Null),
            b't' => self.literal("true").map(|()| Value::Bool(true)),
            b'f' => self.literal("false").map(|()| Value::Bool(false)),
            b'-' | b'0'..=b'9' => self.whole_number().map(Value::Number),
            _ => None,
        };
        read.or_else(|| self.by_serde())
    }

    /// An object of columns. Each name is first compared with the names decoded at its
    /// place in recent rows, which the changes of a table repeat.
    fn row(&mut self) -> Option<Row> {
        let mut row = Row::with_capacity(8);
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(row);
        }
        loop {
            let place = row.len();
            let name = match self
                .names
                .find(place, |name| Self::name_at(self.text, &mut self.at, name))
            {
                Some(name) => name,
                None => {
                    let text = self.plain_text()?;
                    self.names.name(place, text)
                }
            };
            self.eat(b':')?;
            let value = self.value()?;
            row.insert(name, value);
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(row);
                }
                _ => return None,
            }
        }
    }

    /// An object of columns, or `null`.
    fn optional_row(&mut self) -> Option<Option<Row>> {
        if self.peek()? == b'n' {
            self.literal("null")?;
            return Some(None);
        }
        self.row().map(Some)
    }

    /// The operation's code.
    fn op(&mut self) -> Option<Op> {
        match self.plain_text()? {
            "c" => Some(Op::Create),
            "u" => Some(Op::Update),
            "d" => Some(Op::Delete),
            "r" => Some(Op::Read),
            "t" => Some(Op::Truncate),
            _ => None,
        }
    }

    /// Text, with or without escapes.
    fn text(&mut self) -> Option<Cow<'a, str>> {
        match self.plain_text() {
            Some(text) => Some(Cow::Borrowed(text)),
            None => self.by_serde::<String>().map(Cow::Owned),
        }
    }

    /// A `source` field read leniently (see `Lenient`).
    fn lenient(&mut self) -> Option<Lenient<'a>> {
        let read = match self.peek()? {
            b'"' => self
                .plain_text()
                .map(|text| Lenient::Text(Cow::Borrowed(text))),
            b'n' => self.literal("null").map(|()| Lenient::Other),
            b't' => self.literal("true").map(|()| Lenient::Bool(true)),
            b'f' => self.literal("false").map(|()| Lenient::Bool(false)),
            b'-' | b'0'..=b'9' => self
                .whole_number()
                .map(|n| n.as_u64().map_or(Lenient::Other, Lenient::Number)),
            _ => None,
        };
        read.or_else(|| self.by_serde())
    }

    /// The `source` block.
    fn source(&mut self) -> Option<SourceIn<'a>> {
        let (mut schema, mut table, mut ts_ms) = (None, None, None);
        let mut db = None;
        let mut connector = None;
        let mut snapshot = None;
        let mut lsn = None;
        let mut file = None;
        let mut pos = None;
        let mut seq = None;
        let mut binlog_server_id = None;
        self.object(SOURCE_FIELDS, |reader, field| {
            /// Reads a field not seen before (serde fails on a field given twice).
            fn once<T>(field: &mut Option<T>, read: Option<T>) -> Option<()> {
                match field {
                    Some(_) => None,
                    None => {
                        *field = Some(read?);
                        Some(())
                    }
                }
            }
            match field {
                Some(SourceField::Schema) => once(&mut schema, reader.text()),
                Some(SourceField::Db) => once(&mut db, reader.text()),
                Some(SourceField::Table) => once(&mut table, reader.text()),
                Some(SourceField::TsMs) => {
                    let read = match reader.peek()? {
                        b'n' => reader.literal("null").map(|()| None),
                        _ => reader.whole_number()?.as_i64().map(Some),
                    };
                    once(&mut ts_ms, read)
                }
                Some(SourceField::Connector) => once(&mut connector, reader.lenient()),
                Some(SourceField::Snapshot) => once(&mut snapshot, reader.lenient()),
                Some(SourceField::Lsn) => once(&mut lsn, reader.lenient()),
                Some(SourceField::File) => once(&mut file, reader.lenient()),
                Some(SourceField::Pos) => once(&mut pos, reader.lenient()),
                Some(SourceField::Seq) => once(&mut seq, reader.lenient()),
                Some(SourceField::BinlogServerId) => once(&mut binlog_server_id, reader.lenient()),
                Some(SourceField::Other) | None => reader.skip(),
            }
        })?;
        Some(SourceIn {
            schema: Some(schema?),
            db,
            table: table?,
            ts_ms: ts_ms.flatten(),
            connector: connector.unwrap_or_default(),
            snapshot: snapshot.unwrap_or_default(),
            lsn: lsn.unwrap_or_default(),
            file: file.unwrap_or_default(),
            pos: pos.unwrap_or_default(),
            seq: seq.unwrap_or_default(),
            binlog_server_id: binlog_server_id.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::encode_change;
    use serde_json::json;
    use tidelink_core::{ChangeEvent, SourceInfo, TableId};

    /// Whatever the in-place reader reads, serde reads the same; says whether it read it.
    /// `names` carries the names of the messages read before, as a decoder's do.
    fn agrees(text: &str, names: &mut RecentNames) -> bool {
        let mut read = false;
        if let Some(in_place) = envelope(text, names) {
            let by_serde: EnvelopeIn = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("read in place, refused by serde ({e}): {text}"));
            assert_eq!(in_place.after, by_serde.after, "{text}");
            assert_eq!(in_place.source, by_serde.source, "{text}");
            assert_eq!(in_place.op, by_serde.op, "{text}");
            read = true;
        }
        if let Some(in_place) = row(text, names) {
            let by_serde: Row = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("row read in place, refused by serde ({e}): {text}"));
            assert_eq!(in_place, by_serde, "{text}");
            read = true;
        }
        read
    }

    fn event(values: serde_json::Value, connector: &str) -> ChangeEvent {
        let after = Row::from_json(values).expect("an object");
        let mut key = Row::new();
        key.insert("id", after["id"].clone());
        ChangeEvent {
            table: TableId::new("public", "t"),
            op: Op::Update,
            before: (connector == "mysql").then(|| after.clone()),
            key,
            after: Some(after),
            source: SourceInfo {
                version: "0.1.0".into(),
                connector: connector.into(),
                name: "shop \"east\"".into(),
                ts_ms: 1_700_000_000_000,
                snapshot: "false".into(),
                db: "shop".into(),
                schema: "public".into(),
                table: "odd\\name\u{e9}".into(),
                tx_id: Some(42),
                lsn: Some(1234),
                file: (connector == "mysql").then(|| "binlog.000002".into()),
                pos: Some(4711),
                seq: Some(3),
                binlog_server_id: Some(1),
                ..Default::default()
            },
            columns: None,
        }
    }

    /// Envelopes as tidelink writes them, with values of every kind, and foreign ones.
    fn seeds() -> Vec<Vec<u8>> {
        let values = [
            json!({"id": 1, "name": "ada", "note": null, "ok": true, "off": false}),
            json!({"id": -7, "big": u64::MAX, "small": i64::MIN, "zero": 0, "price": 1.5,
                "neg_zero": -0.0, "huge": 1e300, "tiny": -2.5e-300}),
            json!({"id": "k\"1", "text": "line\nbreak\ttab \\ slash / \u{1} é ☃ 😀",
                "json": {"a": [1, 2, {"b": null}], "c": "d"}, "list": [], "empty": ""}),
        ];
        let mut seeds = Vec::new();
        for (i, value) in values.iter().enumerate() {
            for connector in ["postgresql", "mysql"] {
                let mut e = event(value.clone(), connector);
                if i == 1 {
                    e.op = Op::Create;
                    e.source.snapshot = "true".into();
                }
                let (key, value) = encode_change(&e, 5);
                seeds.push(key.expect("a key"));
                seeds.push(value);
            }
        }
        let mut truncate = event(values[0].clone(), "postgresql");
        truncate.op = Op::Truncate;
        truncate.key = Row::new();
        truncate.after = None;
        seeds.push(encode_change(&truncate, 5).1);
        for foreign in [
            // Whitespace, other field orders, unknown fields of every kind, other types.
            " { \"op\" : \"d\" , \"source\" : { \"table\" : \"t\" , \"schema\" : \"s\" , \"ts_ms\" : null , \"snapshot\" : true , \"seq\" : -1 , \"lsn\" : 1.0 , \"x\" : [ { } ] } , \"after\" : null , \"before\" : { \"id\" : 1 } } \n",
            r#"{"after":{"id":1},"op":"r","source":{"schema":"s","table":"t","ts_ms":9223372036854775807,"pos":"4","file":{"a":1},"connector":null}}"#,
            r#"{"after":{"id":01},"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":{"id":1.},"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":{"id":-},"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":{"id":-0,"n":18446744073709551616,"m":-9223372036854775809,"e":1E5},"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":{"id":1,"id":2},"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":{"id":1},"after":null,"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":{"\u0069d":1},"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":{"id":1},"op":"\u0063","source":{"schema":"s\u0041","table":"t","ts_ms":"1"}}"#,
            r#"{"after":{"id":1},"op":"c","source":{"schema":"s","table":"t","ts_ms":1,"ts_ms":2}}"#,
            r#"{"after":{"id":nul},"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":{"id":truefalse},"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"after":[1],"op":"c","source":{"schema":"s","table":"t"}}"#,
            r#"{"schema":{},"payload":{"before":null,"after":{"id":1},"source":{"schema":"s","table":"t"},"op":"r"}}"#,
            r#"[null,{"id":1},{"schema":"s","table":"t"},"c"]"#,
            r#"{"id":1} x"#,
            r#"{"id":1,}"#,
            r#"{}"#,
        ] {
            seeds.push(foreign.as_bytes().to_vec());
        }
        seeds
    }

    #[test]
    fn tidelinks_own_envelopes_and_keys_are_read_in_place() {
        let seeds = seeds();
        let mut names = RecentNames::new();
        for seed in &seeds[..13] {
            let text = std::str::from_utf8(seed).expect("UTF-8");
            assert!(agrees(text, &mut names), "not read in place: {text}");
        }
        let read =
            envelope(std::str::from_utf8(&seeds[1]).expect("UTF-8"), &mut names).expect("read");
        assert_eq!(read.after.expect("after")["name"], "ada");
        assert_eq!(read.source.table, "odd\\name\u{e9}");
    }

    #[test]
    fn what_is_read_in_place_is_what_serde_reads() {
        let seeds = seeds();
        let mut names = RecentNames::new();
        for seed in &seeds {
            agrees(std::str::from_utf8(seed).expect("UTF-8"), &mut names);
        }
        let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
        let mut mutator = tidelink_core::fuzz::Mutator::new(0x1a_91ace);
        let mut read = 0;
        for _ in 0..60_000 {
            if let Ok(text) = std::str::from_utf8(&mutator.input(&seeds)) {
                read += usize::from(agrees(text, &mut names));
            }
        }
        assert!(
            read > 1_000,
            "only {read} mutated messages were read in place"
        );
    }
}
