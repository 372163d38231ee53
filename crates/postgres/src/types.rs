//! PostgreSQL types as tidelink sees them, and the conversions between a value's PostgreSQL
//! text form and its JSON form in the envelope.
//!
//! | PostgreSQL                         | JSON in the envelope                          |
//! |------------------------------------|-----------------------------------------------|
//! | int2, int4, int8, oid              | number                                        |
//! | float4, float8                     | number; `"NaN"`, `"Infinity"`, `"-Infinity"`  |
//! | numeric, money                     | string, exact (`"12345.6700"`)                |
//! | bool                               | `true` / `false`                              |
//! | bytea                              | base64 string (Debezium's default)            |
//! | json, jsonb                        | string holding the JSON text (Debezium `Json`)|
//! | arrays                             | JSON array of the element's form, nested      |
//! | everything else (text, date, time, timestamp(tz), interval, uuid, enums, …) | string in PostgreSQL's ISO text form |
//!
//! Sinks convert back by the *target* column's type, so a string lands in a bytea column
//! base64-decoded and in a date column as the ISO date it is.

use base64::Engine as _;
use serde_json::Value;
use std::borrow::Cow;

/// How a column's values are represented in the envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    /// Boolean.
    Bool,
    /// Integer that fits an i64.
    Integer,
    /// Binary floating point.
    Float,
    /// Exact decimal kept as a string.
    Decimal,
    /// Binary data, base64 in JSON.
    Bytes,
    /// Anything represented by its text form.
    Text,
    /// Array of the element kind; `delimiter` separates elements in the text form.
    Array {
        /// The element's kind.
        element: Box<ValueKind>,
        /// Element delimiter (`,` for every type but box).
        delimiter: char,
    },
}

/// A row of `pg_type`, enough to classify a type.
#[derive(Debug, Clone)]
pub struct TypeRow {
    /// Type OID.
    pub oid: u32,
    /// `typname`.
    pub name: String,
    /// `typcategory`.
    pub category: char,
    /// `typelem` (element type of an array, 0 otherwise).
    pub element: u32,
    /// `typdelim`.
    pub delimiter: char,
    /// `typtype`: b base, d domain, e enum, …
    pub kind: char,
    /// `typbasetype` for domains.
    pub base: u32,
    /// Schema-qualified SQL name as `format_type` prints it.
    pub sql_name: String,
}

/// Classifies a type OID using catalog rows (which must include element and base types).
pub fn classify(oid: u32, lookup: &dyn Fn(u32) -> Option<TypeRow>) -> ValueKind {
    classify_depth(oid, lookup, 0)
}

fn classify_depth(oid: u32, lookup: &dyn Fn(u32) -> Option<TypeRow>, depth: usize) -> ValueKind {
    match oid {
        16 => return ValueKind::Bool,
        17 => return ValueKind::Bytes,
        20 | 21 | 23 | 26 => return ValueKind::Integer,
        700 | 701 => return ValueKind::Float,
        790 | 1700 => return ValueKind::Decimal,
        _ => {}
    }
    if depth > 8 {
        return ValueKind::Text;
    }
    let Some(row) = lookup(oid) else {
        return ValueKind::Text;
    };
    if row.kind == 'd' && row.base != 0 {
        return classify_depth(row.base, lookup, depth + 1);
    }
    if row.category == 'A' && row.element != 0 {
        return ValueKind::Array {
            element: Box::new(classify_depth(row.element, lookup, depth + 1)),
            delimiter: row.delimiter,
        };
    }
    ValueKind::Text
}

/// Converts a value's PostgreSQL text form into its envelope JSON form; given a `String`,
/// a value that stays text keeps it instead of copying it.
pub fn text_to_json(text: impl AsRef<str> + Into<String>, kind: &ValueKind) -> Value {
    match kind {
        ValueKind::Decimal | ValueKind::Text => Value::String(text.into()),
        _ => parse_text(text.as_ref(), kind),
    }
}

fn parse_text(text: &str, kind: &ValueKind) -> Value {
    match kind {
        ValueKind::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            other => Value::String(other.to_string()),
        },
        ValueKind::Integer => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_string())),
        ValueKind::Float => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(text.to_string())),
            _ => Value::String(text.to_string()),
        },
        ValueKind::Decimal | ValueKind::Text => Value::String(text.to_string()),
        ValueKind::Bytes => match decode_bytea_hex(text) {
            Some(bytes) => Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            None => Value::String(text.to_string()),
        },
        ValueKind::Array { element, delimiter } => match parse_array(text, *delimiter) {
            Some(parsed) => array_to_json(&parsed, element),
            None => Value::String(text.to_string()),
        },
    }
}

fn array_to_json(item: &ArrayItem, element: &ValueKind) -> Value {
    match item {
        ArrayItem::Null => Value::Null,
        ArrayItem::Value(text) => text_to_json(text, element),
        ArrayItem::Nested(items) => {
            Value::Array(items.iter().map(|i| array_to_json(i, element)).collect())
        }
    }
}

/// Decodes bytea's hex output (`\x0a0b`).
pub fn decode_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Encodes bytes in bytea's hex input form.
pub fn encode_bytea_hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(2 + bytes.len() * 2);
    push_bytea_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Appends bytea's hex input form of `bytes` (`\x0aff…`) to `out`.
pub fn push_bytea_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(2 + bytes.len() * 2);
    out.extend_from_slice(b"\\x");
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0x0f)]);
    }
}

/// One element of a parsed array literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrayItem {
    /// NULL element.
    Null,
    /// Element text, unquoted and unescaped.
    Value(String),
    /// A sub-array (multi-dimensional arrays) or the top level.
    Nested(Vec<ArrayItem>),
}

/// Parses an array's text form (`{1,NULL,"a b",{2,3}}`). Returns `None` for forms it does
/// not handle (explicit bounds such as `[0:1]={…}`), which are then kept as text.
pub fn parse_array(text: &str, delimiter: char) -> Option<ArrayItem> {
    let chars: Vec<char> = text.chars().collect();
    let mut pos = 0;
    let item = parse_level(&chars, &mut pos, delimiter)?;
    if pos == chars.len() {
        Some(item)
    } else {
        None
    }
}

fn parse_level(chars: &[char], pos: &mut usize, delimiter: char) -> Option<ArrayItem> {
    if chars.get(*pos) != Some(&'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if chars.get(*pos) == Some(&'}') {
        *pos += 1;
        return Some(ArrayItem::Nested(items));
    }
    loop {
        match chars.get(*pos)? {
            '{' => items.push(parse_level(chars, pos, delimiter)?),
            '"' => {
                *pos += 1;
                let mut s = String::new();
                loop {
                    match chars.get(*pos)? {
                        '\\' => {
                            s.push(*chars.get(*pos + 1)?);
                            *pos += 2;
                        }
                        '"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            s.push(*c);
                            *pos += 1;
                        }
                    }
                }
                items.push(ArrayItem::Value(s));
            }
            _ => {
                let start = *pos;
                while let Some(&c) = chars.get(*pos) {
                    if c == delimiter || c == '}' {
                        break;
                    }
                    *pos += 1;
                }
                let raw: String = chars[start..*pos].iter().collect();
                let raw = raw.trim();
                if raw.eq_ignore_ascii_case("NULL") {
                    items.push(ArrayItem::Null);
                } else {
                    items.push(ArrayItem::Value(raw.to_string()));
                }
            }
        }
        match chars.get(*pos)? {
            '}' => {
                *pos += 1;
                return Some(ArrayItem::Nested(items));
            }
            c if *c == delimiter => *pos += 1,
            _ => return None,
        }
    }
}

/// How a target column's values must be written, derived from its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// bytea: JSON strings are base64.
    Bytes,
    /// json/jsonb: objects and arrays are written as JSON text.
    Json,
    /// An array of the element kind.
    Array(Box<TargetKind>),
    /// point: also takes an object with numbers `x` and `y` (Debezium's `Point` without
    /// its schema).
    Point,
    /// Anything else: the value's text form.
    Other,
}

/// Classifies a target column type from catalog rows.
pub fn target_kind(oid: u32, lookup: &dyn Fn(u32) -> Option<TypeRow>) -> TargetKind {
    target_kind_depth(oid, lookup, 0)
}

fn target_kind_depth(
    oid: u32,
    lookup: &dyn Fn(u32) -> Option<TypeRow>,
    depth: usize,
) -> TargetKind {
    match oid {
        17 => return TargetKind::Bytes,
        114 | 3802 => return TargetKind::Json,
        600 => return TargetKind::Point,
        _ => {}
    }
    if depth > 8 {
        return TargetKind::Other;
    }
    match lookup(oid) {
        Some(row) if row.kind == 'd' && row.base != 0 => {
            target_kind_depth(row.base, lookup, depth + 1)
        }
        Some(row) if row.category == 'A' && row.element != 0 => {
            TargetKind::Array(Box::new(target_kind_depth(row.element, lookup, depth + 1)))
        }
        _ => TargetKind::Other,
    }
}

/// Converts an envelope JSON value into the text form the target column accepts, borrowing
/// the value's own text where it is that form already.
/// Returns `Ok(None)` for NULL and an error for a value the column cannot take.
pub fn json_to_text<'v>(
    value: &'v Value,
    kind: &TargetKind,
) -> Result<Option<Cow<'v, str>>, String> {
    Ok(match value {
        Value::Null => None,
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::String(s) => Some(match kind {
            TargetKind::Bytes => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| format!("bytea value is not base64: {e}"))?;
                Cow::Owned(encode_bytea_hex(&bytes))
            }
            _ => Cow::Borrowed(s),
        }),
        Value::Array(items) => Some(Cow::Owned(match kind {
            TargetKind::Json => value.to_string(),
            TargetKind::Array(element) => {
                let mut out = String::from("{");
                write_array(items, element, &mut out)?;
                out.push('}');
                out
            }
            _ => value.to_string(),
        })),
        Value::Object(fields) if *kind == TargetKind::Point => {
            let coordinate = |axis: &str| match fields.get(axis) {
                Some(Value::Number(n)) => Ok(n.to_string()),
                _ => Err(format!("point value {value} has no number `{axis}`")),
            };
            Some(Cow::Owned(format!(
                "({},{})",
                coordinate("x")?,
                coordinate("y")?
            )))
        }
        Value::Object(_) => Some(Cow::Owned(value.to_string())),
    })
}

fn write_array(items: &[Value], element: &TargetKind, out: &mut String) -> Result<(), String> {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) if !matches!(element, TargetKind::Json) => {
                out.push('{');
                write_array(inner, element, out)?;
                out.push('}');
            }
            other => {
                let text = json_to_text(other, element)?.unwrap_or_default();
                out.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_catalog(_: u32) -> Option<TypeRow> {
        None
    }

    #[test]
    fn scalars_convert_by_kind() {
        assert_eq!(text_to_json("t", &ValueKind::Bool), json!(true));
        assert_eq!(
            text_to_json("-9223372036854775808", &ValueKind::Integer),
            json!(i64::MIN)
        );
        assert_eq!(text_to_json("1.5", &ValueKind::Float), json!(1.5));
        assert_eq!(text_to_json("NaN", &ValueKind::Float), json!("NaN"));
        assert_eq!(
            text_to_json("-Infinity", &ValueKind::Float),
            json!("-Infinity")
        );
        assert_eq!(
            text_to_json("12.3400", &ValueKind::Decimal),
            json!("12.3400")
        );
        assert_eq!(text_to_json("\\x00ff", &ValueKind::Bytes), json!("AP8="));
        assert_eq!(classify(1700, &no_catalog), ValueKind::Decimal);
    }

    #[test]
    fn arrays_parse_with_quotes_nulls_and_nesting() {
        let kind = ValueKind::Array {
            element: Box::new(ValueKind::Text),
            delimiter: ',',
        };
        assert_eq!(
            text_to_json(r#"{a,"b c",NULL,"NULL","q\"uote\\"}"#, &kind),
            json!(["a", "b c", null, "NULL", "q\"uote\\"])
        );
        let ints = ValueKind::Array {
            element: Box::new(ValueKind::Integer),
            delimiter: ',',
        };
        assert_eq!(
            text_to_json("{{1,2},{3,4}}", &ints),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(text_to_json("{}", &ints), json!([]));
        assert_eq!(text_to_json("[0:1]={1,2}", &ints), json!("[0:1]={1,2}"));
    }

    #[test]
    fn array_and_value_parsing_never_panics() {
        let kind = ValueKind::Array {
            element: Box::new(ValueKind::Array {
                element: Box::new(ValueKind::Bytes),
                delimiter: ',',
            }),
            delimiter: ',',
        };
        let seeds: [&[u8]; 4] = [
            br#"{{"a\"b",NULL},{"\\x00ff",c}}"#,
            b"{1,2,{3}}",
            b"[0:1]={1,2}",
            "{\"\u{e9}t\u{e9}\"}".as_bytes(),
        ];
        let mut mutator = tidelink_core::fuzz::Mutator::new(0xa77a);
        for _ in 0..50_000 {
            let input = mutator.input(&seeds);
            let text = String::from_utf8_lossy(&input);
            let json = text_to_json(text.as_ref(), &kind);
            let _ = json_to_text(&json, &TargetKind::Array(Box::new(TargetKind::Bytes)));
            let _ = text_to_json(text.as_ref(), &ValueKind::Bytes);
            let _ = text_to_json(text.as_ref(), &ValueKind::Float);
        }
    }

    #[test]
    fn json_converts_back_to_text_by_target_kind() {
        assert_eq!(
            json_to_text(&json!("AP8="), &TargetKind::Bytes).expect("ok"),
            Some("\\x00ff".into())
        );
        let arr = TargetKind::Array(Box::new(TargetKind::Other));
        assert_eq!(
            json_to_text(&json!([["a\"b", null], ["c", "d"]]), &arr).expect("ok"),
            Some(r#"{{"a\"b",NULL},{"c","d"}}"#.into())
        );
        let bytea_arr = TargetKind::Array(Box::new(TargetKind::Bytes));
        assert_eq!(
            json_to_text(&json!(["AP8="]), &bytea_arr).expect("ok"),
            Some(r#"{"\\x00ff"}"#.into())
        );
        assert!(json_to_text(&json!("not base64!"), &TargetKind::Bytes).is_err());
        assert_eq!(
            json_to_text(&json!(null), &TargetKind::Other).expect("ok"),
            None
        );
        // Debezium's Point without its schema; tidelink's own text form passes as it is.
        let point = json!({"x": 1.5, "y": -2.0, "wkb": "AQ==", "srid": null});
        assert_eq!(
            json_to_text(&point, &TargetKind::Point).expect("ok"),
            Some("(1.5,-2.0)".into())
        );
        assert_eq!(
            json_to_text(&json!("(1.5,-2)"), &TargetKind::Point).expect("ok"),
            Some("(1.5,-2)".into())
        );
        assert!(json_to_text(&json!({"x": 1}), &TargetKind::Point).is_err());
    }
}
