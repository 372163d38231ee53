//! Value conversion between MySQL/MariaDB and the envelope's JSON form (the README's type
//! table): from binlog row values and text-protocol values (snapshots) into JSON, and from
//! JSON into SQL literals for a MySQL-family target column.
//!
//! The JSON forms match the PostgreSQL source wherever the types correspond (exact
//! decimals as strings, bytes as base64, dates and times as ISO text, TIMESTAMP in UTC with
//! a `+00` suffix like PostgreSQL's `timestamptz`), so events cross engines unchanged.

use crate::connection::{push_bytes_literal, push_hex, push_string_literal};
use crate::schema::ColumnInfo;
use base64::Engine;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::Value as MyValue;
use serde_json::Value;
use tidelink_core::with_number_text;

/// Converts one binlog value of a column.
pub fn binlog_to_json(
    value: Option<&BinlogValue<'_>>,
    column: &ColumnInfo,
) -> Result<Value, String> {
    match value {
        None => Ok(Value::Null),
        Some(BinlogValue::Jsonb(json)) => {
            let json = serde_json::Value::try_from(json.clone())
                .map_err(|e| format!("column `{}`: JSON value: {e}", column.name))?;
            Ok(Value::String(json.to_string()))
        }
        Some(BinlogValue::JsonDiff(_)) => Err(format!(
            "column `{}`: partial JSON update (set binlog_row_value_options='' on the source)",
            column.name
        )),
        Some(BinlogValue::Value(v)) => value_to_json(v, column, false),
    }
}

/// Converts one text-protocol value (a snapshot `SELECT` on a session with time_zone UTC).
pub fn text_to_json(value: &MyValue, column: &ColumnInfo) -> Result<Value, String> {
    value_to_json(value, column, true)
}

fn value_to_json(value: &MyValue, column: &ColumnInfo, text: bool) -> Result<Value, String> {
    let name = &column.name;
    let data_type = column.data_type.as_str();
    match value {
        MyValue::NULL => Ok(Value::Null),
        MyValue::Int(i) => {
            if data_type == "enum" {
                return enum_label(*i as u64, column);
            }
            if data_type == "timestamp" {
                return Ok(Value::String(format_epoch(*i, 0)));
            }
            match column.integer_bits() {
                Some(bits) if column.unsigned && *i < 0 => {
                    let unsigned = if bits == 64 {
                        *i as u64
                    } else {
                        (*i as u64) & ((1u64 << bits) - 1)
                    };
                    Ok(Value::from(unsigned))
                }
                // A signed MEDIUMINT comes out of the binlog decoder without its sign.
                Some(24) if !column.unsigned && *i >= 1 << 23 && !text => {
                    Ok(Value::from(*i - (1 << 24)))
                }
                _ => Ok(Value::from(*i)),
            }
        }
        MyValue::UInt(u) => Ok(Value::from(*u)),
        MyValue::Float(f) => {
            // The shortest text of the f32 keeps 0.1 as 0.1 rather than 0.100000001.
            let d: f64 = f.to_string().parse().unwrap_or(f64::from(*f));
            Ok(serde_json::Number::from_f64(d).map_or(Value::Null, Value::Number))
        }
        MyValue::Double(d) => {
            Ok(serde_json::Number::from_f64(*d).map_or(Value::Null, Value::Number))
        }
        MyValue::Date(y, m, d, h, mi, s, us) => {
            if data_type == "date" {
                Ok(Value::String(format!("{y:04}-{m:02}-{d:02}")))
            } else {
                let mut out = format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}");
                push_fraction(&mut out, *us);
                if data_type == "timestamp" {
                    out.push_str("+00");
                }
                Ok(Value::String(out))
            }
        }
        MyValue::Time(negative, days, h, m, s, us) => {
            let hours = u64::from(*days) * 24 + u64::from(*h);
            let mut out = format!(
                "{}{hours:02}:{m:02}:{s:02}",
                if *negative { "-" } else { "" }
            );
            push_fraction(&mut out, *us);
            Ok(Value::String(out))
        }
        MyValue::Bytes(bytes) => bytes_to_json(bytes, column, text)
            .map_err(|e| format!("column `{name}` ({}): {e}", column.column_type)),
    }
}

fn bytes_to_json(bytes: &[u8], column: &ColumnInfo, text: bool) -> Result<Value, String> {
    let as_str = || std::str::from_utf8(bytes).map_err(|_| "value is not UTF-8".to_string());
    match column.data_type.as_str() {
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" => {
            let s = as_str()?;
            if let Ok(i) = s.parse::<i64>() {
                // The binlog's YEAR decoding turns the zero year into 1900.
                if column.data_type == "year" && i == 1900 && !text {
                    return Ok(Value::from(0));
                }
                return Ok(Value::from(i));
            }
            s.parse::<u64>()
                .map(Value::from)
                .map_err(|_| format!("`{s}` is not an integer"))
        }
        "float" | "double" | "real" => {
            let s = as_str()?;
            let d: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
            Ok(serde_json::Number::from_f64(d).map_or(Value::Null, Value::Number))
        }
        "decimal" | "numeric" => Ok(Value::String(as_str()?.to_string())),
        "bit" => Ok(Value::String(bits_text(bytes, column.bits))),
        "enum" => {
            if text {
                Ok(Value::String(as_str()?.to_string()))
            } else {
                let index = bytes
                    .iter()
                    .rev()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                enum_label(index, column)
            }
        }
        "set" => {
            if text {
                return Ok(Value::String(as_str()?.to_string()));
            }
            let mask = bytes
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            let labels: Vec<&str> = column
                .labels
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1u64 << i) != 0)
                .map(|(_, l)| l.as_str())
                .collect();
            Ok(Value::String(labels.join(",")))
        }
        "timestamp" => {
            let s = as_str()?;
            if text {
                return Ok(Value::String(timestamp_text(s)));
            }
            // TIMESTAMP2 arrives as `seconds[.micros]` since the epoch.
            let (secs, micros) = match s.split_once('.') {
                Some((secs, frac)) => (secs, frac.parse::<u32>().unwrap_or(0)),
                None => (s, 0),
            };
            let secs: i64 = secs
                .parse()
                .map_err(|_| format!("`{s}` is not a timestamp"))?;
            Ok(Value::String(format_epoch(secs, micros)))
        }
        "date" | "datetime" | "time" => Ok(Value::String(trim_fraction(as_str()?).to_string())),
        "binary" if !text => {
            // The binlog drops BINARY(n)'s trailing zero bytes; the column holds n bytes.
            let width = declared_length(&column.column_type).unwrap_or(bytes.len());
            let mut padded = bytes.to_vec();
            if padded.len() < width {
                padded.resize(width, 0);
            }
            Ok(Value::String(
                base64::engine::general_purpose::STANDARD.encode(padded),
            ))
        }
        _ if column.is_binary() => Ok(Value::String(
            base64::engine::general_purpose::STANDARD.encode(bytes),
        )),
        _ if column.is_text() || matches!(column.data_type.as_str(), "json") => {
            if text {
                // The session's character set is utf8mb4: the server converted already.
                return Ok(Value::String(as_str()?.to_string()));
            }
            decode_text(bytes, column.charset.as_deref()).map(Value::String)
        }
        other => Err(format!("type `{other}` is not supported")),
    }
}

/// The `n` of `binary(n)`.
fn declared_length(column_type: &str) -> Option<usize> {
    let open = column_type.find('(')?;
    let close = column_type[open..].find(')')? + open;
    column_type[open + 1..close].trim().parse().ok()
}

fn enum_label(index: u64, column: &ColumnInfo) -> Result<Value, String> {
    if index == 0 {
        // The "invalid value" MySQL stores for a rejected label in non-strict mode.
        return Ok(Value::String(String::new()));
    }
    column
        .labels
        .get(index as usize - 1)
        .map(|l| Value::String(l.clone()))
        .ok_or_else(|| format!("column `{}`: enum index {index} has no label", column.name))
}

/// Decodes text in a column's character set.
fn decode_text(bytes: &[u8], charset: Option<&str>) -> Result<String, String> {
    match charset.unwrap_or("utf8mb4") {
        "latin1" => Ok(bytes.iter().map(|&b| cp1252(b)).collect()),
        "ascii" | "utf8" | "utf8mb3" | "utf8mb4" => String::from_utf8(bytes.to_vec())
            .map_err(|_| "value is not valid UTF-8".to_string()),
        other => String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("character set `{other}` is not supported (only utf8mb4, utf8mb3, ascii and latin1)")),
    }
}

/// MySQL's `latin1` is Windows-1252.
fn cp1252(b: u8) -> char {
    const HIGH: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8D}', 'Ž',
        '\u{8F}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9D}',
        'ž', 'Ÿ',
    ];
    if (0x80..0xA0).contains(&b) {
        HIGH[(b - 0x80) as usize]
    } else {
        char::from(b)
    }
}

/// BIT(n) bytes (big-endian) as n binary digits, the form PostgreSQL's `bit(n)` uses.
fn bits_text(bytes: &[u8], width: u32) -> String {
    let value = bytes
        .iter()
        .fold(0u128, |acc, b| (acc << 8) | u128::from(*b));
    let width = width.clamp(1, 64) as usize;
    format!("{value:0width$b}")
}

fn push_fraction(out: &mut String, micros: u32) {
    if micros > 0 {
        let frac = format!("{micros:06}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
}

/// `2024-01-02 03:04:05.120000` → `2024-01-02 03:04:05.12` (PostgreSQL's text form).
fn trim_fraction(s: &str) -> &str {
    match s.find('.') {
        Some(dot) => {
            let trimmed = s.trim_end_matches('0');
            if trimmed.len() == dot + 1 {
                &s[..dot]
            } else {
                trimmed
            }
        }
        None => s,
    }
}

fn timestamp_text(s: &str) -> String {
    if s.starts_with("0000-00-00") {
        return format!("{}+00", trim_fraction(s));
    }
    format!("{}+00", trim_fraction(s))
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS[.ffffff]+00` (zero: MySQL's zero
/// timestamp).
fn format_epoch(secs: i64, micros: u32) -> String {
    if secs == 0 && micros == 0 {
        return "0000-00-00 00:00:00+00".into();
    }
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    push_fraction(&mut out, micros);
    out.push_str("+00");
    out
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The SQL literal for a JSON value written into a MySQL-family column. Values the column
/// cannot represent are errors naming the column, never silently changed.
pub fn json_to_literal(value: &Value, column: &ColumnInfo) -> Result<String, String> {
    let mut out = String::new();
    push_literal(&mut out, value, column)?;
    Ok(out)
}

/// Appends the SQL literal for a JSON value written into a MySQL-family column to `out`,
/// as [`json_to_literal`] gives it; on an error `out` is left as it was. A sink builds its
/// statements this way, with no string per value.
pub fn push_literal(out: &mut String, value: &Value, column: &ColumnInfo) -> Result<(), String> {
    let start = out.len();
    let written = write_literal(out, value, column);
    if written.is_err() {
        out.truncate(start);
    }
    written
}

/// A JSON value checked against its target column, in the form either writer needs: an SQL
/// literal ([`push_literal`]) or a `LOAD DATA` field ([`push_load_field`]).
enum Cell<'v> {
    Null,
    /// Integer or float text, valid as is.
    Bare(Digits<'v>),
    /// Exact decimal text (quoted in SQL, so that `1e5` stays exact).
    Decimal(Digits<'v>),
    /// A BIT value: `0`/`1` characters, or an unsigned number.
    Bits(Digits<'v>),
    Text(std::borrow::Cow<'v, str>),
    Bytes(Vec<u8>),
}

/// Number text, borrowed from the JSON value.
enum Digits<'v> {
    Str(&'v str),
    Number(&'v serde_json::Number),
}

impl Digits<'_> {
    fn push_to(&self, out: &mut String) {
        match self {
            Digits::Str(s) => out.push_str(s),
            Digits::Number(n) => with_number_text(n, |text| out.push_str(text)),
        }
    }
}

fn checked<'v>(value: &'v Value, column: &ColumnInfo) -> Result<Cell<'v>, String> {
    let fail = |why: String| format!("column `{}` ({}): {why}", column.name, column.column_type);
    if value.is_null() {
        return Ok(Cell::Null);
    }
    let data_type = column.data_type.as_str();
    if column.integer_bits().is_some() || data_type == "year" {
        return match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(Cell::Bare(Digits::Number(n))),
            Value::Bool(b) => Ok(Cell::Bare(Digits::Str(if *b { "1" } else { "0" }))),
            Value::String(s) if s.parse::<i64>().is_ok() || s.parse::<u64>().is_ok() => {
                Ok(Cell::Bare(Digits::Str(s)))
            }
            other => Err(fail(format!("{other} is not an integer"))),
        };
    }
    Ok(match data_type {
        "float" | "double" | "real" => match value {
            Value::Number(n) => Cell::Bare(Digits::Number(n)),
            Value::String(s) if s.parse::<f64>().is_ok_and(f64::is_finite) => {
                Cell::Bare(Digits::Str(s))
            }
            other => {
                return Err(fail(format!(
                    "{other} cannot be stored (no NaN or infinity in MySQL)"
                )))
            }
        },
        "decimal" | "numeric" => match value {
            Value::Number(n) => Cell::Decimal(Digits::Number(n)),
            Value::String(s)
                if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c))
                    && s.chars().any(|c| c.is_ascii_digit()) =>
            {
                Cell::Decimal(Digits::Str(s))
            }
            Value::String(s) => {
                return Err(fail(format!(
                    "`{s}` cannot be stored (no NaN or infinity in MySQL)"
                )))
            }
            other => return Err(fail(format!("{other} is not a number"))),
        },
        "bit" => match value {
            Value::String(s)
                if !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c == '0' || c == '1') =>
            {
                Cell::Bits(Digits::Str(s))
            }
            Value::Number(n) if n.is_u64() => Cell::Bare(Digits::Number(n)),
            Value::Bool(b) => Cell::Bits(Digits::Str(if *b { "1" } else { "0" })),
            other => return Err(fail(format!("{other} is not a bit string"))),
        },
        "date" | "datetime" | "timestamp" | "time" => match value {
            Value::String(s) => Cell::Text(datetime_for_mysql(s).map_err(fail)?.into()),
            other => return Err(fail(format!("{other} is not a date/time string"))),
        },
        _ if column.is_binary() => match value {
            Value::String(s) => Cell::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| {
                        fail("value is not base64 (binary values travel base64-encoded)".into())
                    })?,
            ),
            other => return Err(fail(format!("{other} is not base64 bytes"))),
        },
        _ => match value {
            Value::String(s) => Cell::Text(s.as_str().into()),
            Value::Bool(b) if data_type == "enum" || data_type == "set" => {
                return Err(fail(format!("{b} is not a label")))
            }
            // Objects and arrays (a JSON column fed by another producer) and scalars go
            // in as their JSON text.
            other => Cell::Text(other.to_string().into()),
        },
    })
}

fn write_literal(out: &mut String, value: &Value, column: &ColumnInfo) -> Result<(), String> {
    match checked(value, column)? {
        Cell::Null => out.push_str("NULL"),
        Cell::Bare(digits) => digits.push_to(out),
        Cell::Decimal(digits) => {
            out.push('\'');
            digits.push_to(out);
            out.push('\'');
        }
        Cell::Bits(digits) => {
            out.push_str("b'");
            digits.push_to(out);
            out.push('\'');
        }
        Cell::Text(text) => push_string_literal(out, &text),
        Cell::Bytes(bytes) => push_bytes_literal(out, &bytes),
    }
    Ok(())
}

/// How a column's field is read by `LOAD DATA`: straight into the column, or into a user
/// variable that an expression turns into the column's value.
pub fn load_field_expression(column: &ColumnInfo) -> Option<&'static str> {
    if column.data_type == "bit" {
        // The field holds the value as an unsigned decimal number.
        Some("CAST({} AS UNSIGNED)")
    } else if column.is_binary() {
        // The field holds the bytes in hex, so that no character set touches them.
        Some("UNHEX({})")
    } else {
        None
    }
}

/// Whether `LOAD DATA` can fill a column of this type from [`push_load_field`]'s fields.
pub fn loads_as_field(column: &ColumnInfo) -> bool {
    column.integer_bits().is_some()
        || column.is_text()
        || column.is_binary()
        || matches!(
            column.data_type.as_str(),
            "year"
                | "float"
                | "double"
                | "real"
                | "decimal"
                | "numeric"
                | "bit"
                | "date"
                | "datetime"
                | "timestamp"
                | "time"
                | "enum"
                | "set"
                | "json"
        )
}

/// Appends one `LOAD DATA` field (tab-separated, `\\`-escaped, `\N` for NULL, in utf8mb4)
/// for a JSON value written into a column, checked as [`push_literal`] checks it; on an
/// error `out` is left as it was. BIT and binary columns read the field through
/// [`load_field_expression`].
pub fn push_load_field(out: &mut String, value: &Value, column: &ColumnInfo) -> Result<(), String> {
    match checked(value, column)? {
        Cell::Null => out.push_str("\\N"),
        Cell::Bare(digits) | Cell::Decimal(digits) => digits.push_to(out),
        Cell::Bits(Digits::Str(bits)) => {
            let number = u64::from_str_radix(bits, 2).expect("checked: at most 64 bits");
            out.push_str(&number.to_string());
        }
        Cell::Bits(digits) => digits.push_to(out),
        Cell::Text(text) => push_escaped_field(out, &text),
        Cell::Bytes(bytes) => {
            out.reserve(bytes.len() * 2);
            push_hex(out, &bytes);
        }
    }
    Ok(())
}

/// Text escaped for a `LOAD DATA` field: the escape character itself, the field and line
/// terminators, and the characters the server would otherwise take for something else.
fn push_escaped_field(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(at) = rest.find(['\\', '\t', '\n', '\r', '\0']) {
        out.push_str(&rest[..at]);
        out.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => "\\0",
        });
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

/// Date/time text from any source in the form MySQL accepts: PostgreSQL's UTC offset
/// suffix is dropped (the session is UTC); other offsets, eras and infinities are refused.
fn datetime_for_mysql(s: &str) -> Result<String, String> {
    if s.ends_with(" BC") || s.contains("infinity") {
        return Err(format!("`{s}` is outside MySQL's date range"));
    }
    let trimmed = s.trim_end_matches('Z');
    if let Some(pos) = trimmed.rfind(['+', '-']) {
        // An offset follows the time part (after the `HH:MM:SS`), not a date's dashes.
        if pos > 10 || (pos > 0 && trimmed[..pos].contains(':')) {
            let offset = &trimmed[pos..];
            if offset
                .trim_start_matches(['+', '-'])
                .chars()
                .all(|c| c == '0' || c == ':')
            {
                return Ok(trimmed[..pos].replace('T', " "));
            }
            if trimmed[..pos].contains(':') {
                return Err(format!("`{s}` has a UTC offset other than +00"));
            }
        }
    }
    Ok(trimmed.replace('T', " "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::string_literal;

    fn column(data_type: &str, unsigned: bool) -> ColumnInfo {
        ColumnInfo {
            name: "c".into(),
            data_type: data_type.into(),
            column_type: data_type.into(),
            unsigned,
            charset: Some("utf8mb4".into()),
            labels: vec!["a".into(), "b".into(), "c".into()],
            bits: 4,
            key: false,
            not_null: false,
        }
    }

    #[test]
    fn unsigned_integers_are_widened_by_their_width() {
        let c = column("bigint", true);
        assert_eq!(
            value_to_json(&MyValue::Int(-1), &c, false).unwrap(),
            Value::from(u64::MAX)
        );
        let c = column("tinyint", true);
        assert_eq!(
            value_to_json(&MyValue::Int(-1), &c, false).unwrap(),
            Value::from(255)
        );
        let c = column("mediumint", true);
        assert_eq!(
            value_to_json(&MyValue::Int(-1), &c, false).unwrap(),
            Value::from(16_777_215)
        );
    }

    #[test]
    fn labels_bits_and_times() {
        assert_eq!(
            value_to_json(&MyValue::Int(2), &column("enum", false), false).unwrap(),
            "b"
        );
        assert_eq!(
            bytes_to_json(&[5], &column("set", false), false).unwrap(),
            "a,c"
        );
        assert_eq!(
            bytes_to_json(&[5], &column("bit", false), false).unwrap(),
            "0101"
        );
        assert_eq!(
            format_epoch(1_700_000_000, 120_000),
            "2023-11-14 22:13:20.12+00"
        );
        assert_eq!(
            value_to_json(
                &MyValue::Time(true, 34, 22, 59, 59, 0),
                &column("time", false),
                false
            )
            .unwrap(),
            "-838:59:59"
        );
        assert_eq!(
            trim_fraction("2024-01-02 03:04:05.000000"),
            "2024-01-02 03:04:05"
        );
        assert_eq!(decode_text(&[0x80, b'a'], Some("latin1")).unwrap(), "€a");
    }

    #[test]
    fn literals_for_targets() {
        assert_eq!(
            json_to_literal(
                &Value::from("2024-01-02 03:04:05.5+00"),
                &column("datetime", false)
            )
            .unwrap(),
            string_literal("2024-01-02 03:04:05.5")
        );
        assert_eq!(datetime_for_mysql("2024-01-02").unwrap(), "2024-01-02");
        assert!(datetime_for_mysql("2024-01-02 03:04:05+02").is_err());
        assert!(json_to_literal(&Value::from("NaN"), &column("decimal", false)).is_err());
        assert_eq!(
            json_to_literal(&Value::from("0101"), &column("bit", false)).unwrap(),
            "b'0101'"
        );
        assert_eq!(
            json_to_literal(&Value::from(true), &column("tinyint", false)).unwrap(),
            "1"
        );
        assert_eq!(
            json_to_literal(&Value::from(12.5), &column("decimal", false)).unwrap(),
            "'12.5'"
        );
        assert_eq!(
            json_to_literal(&Value::from("é"), &column("varchar", false)).unwrap(),
            "_utf8mb4 X'C3A9'"
        );
    }

    #[test]
    fn load_data_fields_for_targets() {
        let field = |value: Value, data_type: &str| {
            let mut out = String::new();
            push_load_field(&mut out, &value, &column(data_type, false)).map(|()| out)
        };
        assert_eq!(field(Value::Null, "varchar").unwrap(), "\\N");
        assert_eq!(
            field(Value::from("a\tb\nc\\d\r\0é"), "varchar").unwrap(),
            "a\\tb\\nc\\\\d\\r\\0é"
        );
        assert_eq!(field(Value::from("\\N"), "text").unwrap(), "\\\\N");
        assert_eq!(field(Value::from(""), "text").unwrap(), "");
        assert_eq!(field(Value::from("1e5"), "decimal").unwrap(), "1e5");
        assert!(field(Value::from("NaN"), "decimal").is_err());
        assert_eq!(field(Value::from("0101"), "bit").unwrap(), "5");
        assert_eq!(field(Value::from(true), "bit").unwrap(), "1");
        assert_eq!(field(Value::from(true), "tinyint").unwrap(), "1");
        assert_eq!(field(Value::from("AP8="), "blob").unwrap(), "00FF");
        assert!(field(Value::from("not base64!"), "blob").is_err());
        assert_eq!(
            field(Value::from("2024-01-02T03:04:05+00"), "datetime").unwrap(),
            "2024-01-02 03:04:05"
        );
        assert_eq!(
            field(serde_json::json!({"a": "x\ty"}), "json").unwrap(),
            "{\"a\":\"x\\\\ty\"}"
        );
        assert_eq!(
            load_field_expression(&column("bit", false)),
            Some("CAST({} AS UNSIGNED)")
        );
        assert_eq!(load_field_expression(&column("int", false)), None);
        assert!(!loads_as_field(&column("geometry", false)));
    }

    #[test]
    fn a_literal_that_fails_leaves_the_statement_as_it_was() {
        let mut statement = String::from("(1, ");
        for (value, data_type) in [("1e400x", "decimal"), ("x", "int"), ("NaN", "double")] {
            let refused = push_literal(
                &mut statement,
                &Value::from(value),
                &column(data_type, false),
            );
            assert!(refused.is_err(), "{value} into {data_type}");
            assert_eq!(statement, "(1, ");
        }
        push_literal(&mut statement, &Value::from(7), &column("int", false)).unwrap();
        assert_eq!(statement, "(1, 7");
    }
}

#[cfg(test)]
mod never_panic {
    use super::*;
    use tidelink_core::fuzz::Mutator;

    /// Arbitrary bytes for every column type through both decoders, and arbitrary JSON
    /// text through the literal encoder: errors are fine, panics are not.
    #[test]
    fn mutated_values_never_panic() {
        let types = [
            "tinyint",
            "smallint",
            "mediumint",
            "int",
            "bigint",
            "year",
            "float",
            "double",
            "decimal",
            "bit",
            "enum",
            "set",
            "timestamp",
            "date",
            "datetime",
            "time",
            "binary",
            "varbinary",
            "blob",
            "char",
            "varchar",
            "text",
            "json",
            "geometry",
        ];
        let seeds: [&[u8]; 6] = [
            b"1700000000.123456",
            b"2024-02-29 23:59:59.5",
            b"\x80\xff\x00",
            b"-838:59:59",
            b"{\"a\":1}",
            b"18446744073709551615",
        ];
        let mut mutator = Mutator::new(0xb1b1);
        for i in 0..30_000 {
            let data_type = types[i % types.len()];
            let mut column = ColumnInfo {
                name: "c".into(),
                data_type: data_type.into(),
                column_type: format!("{data_type}({})", mutator.below(70)),
                unsigned: mutator.below(2) == 0,
                charset: Some(["utf8mb4", "latin1", "binary", "ucs2"][mutator.below(4)].into()),
                labels: vec!["a".into(), "b".into()],
                bits: mutator.below(70) as u32,
                key: false,
                not_null: false,
            };
            let bytes = mutator.input(&seeds);
            let _ = bytes_to_json(&bytes, &column, false);
            let _ = bytes_to_json(&bytes, &column, true);
            let _ = value_to_json(&MyValue::Int(mutator.next_u64() as i64), &column, false);
            let text = String::from_utf8_lossy(&bytes).to_string();
            let _ = json_to_literal(&Value::String(text.clone()), &column);
            if let Ok(json) = serde_json::from_str::<Value>(&text) {
                let _ = json_to_literal(&json, &column);
            }
            column.labels.clear();
            let _ = value_to_json(&MyValue::Int(mutator.below(5) as i64), &column, false);
            let _ = crate::schema::parse_labels(&text);
            let _ = crate::source::GtidState::parse(&text);
        }
    }
}
