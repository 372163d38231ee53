//! Messages Debezium writes with the JSON converter's schemas enabled
//! (`{"schema": …, "payload": …}`): the Kafka Connect logical types a column's schema names
//! — `Decimal` bytes, epoch-day dates, micro-second times and timestamps, little-endian bit
//! strings, points — turned into the plain forms tidelink's own envelope carries (decimal
//! text, ISO dates and times, `"0101"` bits, `"(x,y)"`), so a sink applies them exactly as it
//! applies tidelink's changes. Types the schema does not name pass through unchanged.

use base64::Engine as _;
use serde_json::{Map, Value};

/// How a column's values are encoded, read from its Connect schema.
#[derive(Debug, Clone, PartialEq)]
enum Form {
    /// Nothing to convert: numbers, text, booleans, base64 bytes, ISO strings.
    Plain,
    /// `org.apache.kafka.connect.data.Decimal`: big-endian two's complement bytes, base64.
    Decimal { scale: i32 },
    /// `io.debezium.data.VariableScaleDecimal`: `{"scale": n, "value": base64}`.
    VariableScaleDecimal,
    /// Days since 1970-01-01 (`io.debezium.time.Date`, Connect's `Date`).
    Date,
    /// Time of day (or MySQL's signed `TIME`) in `1 / per_second` units.
    Time { per_second: i64 },
    /// Timestamp without zone, in `1 / per_second` units since the epoch.
    Timestamp { per_second: i64 },
    /// Debezium's approximate interval in `1 / per_second` units.
    Duration { per_second: i64 },
    /// `io.debezium.data.Bits`: little-endian bytes holding `length` bits.
    Bits { length: usize },
    /// `io.debezium.data.geometry.Point`: `{"x": …, "y": …, …}`.
    Point,
    /// An array whose elements have this form.
    Array(Box<Form>),
}

impl Form {
    fn of(schema: &Value) -> Form {
        let name = schema.get("name").and_then(Value::as_str).unwrap_or("");
        let parameter = |key: &str| {
            schema
                .get("parameters")
                .and_then(|p| p.get(key))
                .and_then(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .or_else(|| Some(v.to_string()))
                })
        };
        match name {
            "org.apache.kafka.connect.data.Decimal" => Form::Decimal {
                scale: parameter("scale").and_then(|s| s.parse().ok()).unwrap_or(0),
            },
            "io.debezium.data.VariableScaleDecimal" => Form::VariableScaleDecimal,
            "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => Form::Date,
            "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => {
                Form::Time { per_second: 1_000 }
            }
            "io.debezium.time.MicroTime" => Form::Time {
                per_second: 1_000_000,
            },
            "io.debezium.time.NanoTime" => Form::Time {
                per_second: 1_000_000_000,
            },
            "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
                Form::Timestamp { per_second: 1_000 }
            }
            "io.debezium.time.MicroTimestamp" => Form::Timestamp {
                per_second: 1_000_000,
            },
            "io.debezium.time.NanoTimestamp" => Form::Timestamp {
                per_second: 1_000_000_000,
            },
            "io.debezium.time.MicroDuration" => Form::Duration {
                per_second: 1_000_000,
            },
            "io.debezium.time.NanoDuration" => Form::Duration {
                per_second: 1_000_000_000,
            },
            "io.debezium.data.Bits" => Form::Bits {
                length: parameter("length")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            },
            "io.debezium.data.geometry.Point" => Form::Point,
            _ if schema.get("type").and_then(Value::as_str) == Some("array") => {
                match schema.get("items").map(Form::of) {
                    Some(Form::Plain) | None => Form::Plain,
                    Some(element) => Form::Array(Box::new(element)),
                }
            }
            _ => Form::Plain,
        }
    }

    fn convert(&self, value: &mut Value) -> Result<(), String> {
        if value.is_null() || *self == Form::Plain {
            return Ok(());
        }
        let converted = match self {
            Form::Plain => return Ok(()),
            Form::Decimal { scale } => decimal_text(&base64_bytes(value)?, *scale),
            Form::VariableScaleDecimal => {
                let scale = value
                    .get("scale")
                    .and_then(Value::as_i64)
                    .and_then(|s| i32::try_from(s).ok())
                    .ok_or("VariableScaleDecimal without a whole-number `scale`")?;
                let bytes = base64_bytes(value.get("value").unwrap_or(&Value::Null))?;
                decimal_text(&bytes, scale)
            }
            Form::Date => date_text(whole(value)?),
            Form::Time { per_second } => time_text(whole(value)?, *per_second),
            Form::Timestamp { per_second } => timestamp_text(whole(value)?, *per_second),
            Form::Duration { per_second } => {
                let micros = i128::from(whole(value)?) * 1_000_000 / i128::from(*per_second);
                format!("{micros} microseconds")
            }
            Form::Bits { length } => bits_text(&base64_bytes(value)?, *length),
            Form::Point => {
                let coordinate = |axis: &str| {
                    value
                        .get(axis)
                        .filter(|v| v.is_number())
                        .map(Value::to_string)
                        .ok_or_else(|| format!("Point without a number `{axis}`"))
                };
                format!("({},{})", coordinate("x")?, coordinate("y")?)
            }
            Form::Array(element) => {
                let Some(items) = value.as_array_mut() else {
                    return Err(format!("expected an array, found {value}"));
                };
                for item in items {
                    element.convert(item)?;
                }
                return Ok(());
            }
        };
        *value = Value::String(converted);
        Ok(())
    }
}

/// Converts the members of `row` (a payload's `after`, `before` or key) by the field schemas
/// of the struct schema describing it; the error names the column.
pub(super) fn convert_row(
    struct_schema: &Value,
    row: &mut Map<String, Value>,
) -> Result<(), String> {
    let Some(fields) = struct_schema.get("fields").and_then(Value::as_array) else {
        return Ok(());
    };
    for field in fields {
        let Some(name) = field.get("field").and_then(Value::as_str) else {
            continue;
        };
        let form = Form::of(field);
        if form == Form::Plain {
            continue;
        }
        if let Some(value) = row.get_mut(name) {
            form.convert(value)
                .map_err(|e| format!("column `{name}` ({}): {e}", schema_name(field)))?;
        }
    }
    Ok(())
}

/// Converts a wrapped envelope's `after` (and `before`) by the envelope schema's fields of
/// those names.
pub(super) fn convert_envelope(schema: &Value, payload: &mut Value) -> Result<(), String> {
    let Some(fields) = schema.get("fields").and_then(Value::as_array) else {
        return Ok(());
    };
    for image in ["after", "before"] {
        let row_schema = fields
            .iter()
            .find(|f| f.get("field").and_then(Value::as_str) == Some(image));
        if let (Some(row_schema), Some(Value::Object(row))) = (row_schema, payload.get_mut(image)) {
            convert_row(row_schema, row).map_err(|e| format!("`{image}` {e}"))?;
        }
    }
    Ok(())
}

fn schema_name(field: &Value) -> &str {
    field
        .get("name")
        .or_else(|| field.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("?")
}

fn whole(value: &Value) -> Result<i64, String> {
    value
        .as_i64()
        .ok_or_else(|| format!("expected a whole number, found {value}"))
}

fn base64_bytes(value: &Value) -> Result<Vec<u8>, String> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("expected base64 text, found {value}"))?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("`{text}` is not base64: {e}"))
}

/// The decimal text of a big-endian two's complement integer divided by 10^scale.
fn decimal_text(bytes: &[u8], scale: i32) -> String {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut magnitude: Vec<u8> = if negative {
        // Two's complement: invert and add one.
        let mut out: Vec<u8> = bytes.iter().map(|b| !b).collect();
        for byte in out.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
        out
    } else {
        bytes.to_vec()
    };
    // Repeated division by 10 of the big-endian magnitude, least significant digit first.
    let mut digits = Vec::new();
    while magnitude.iter().any(|&b| b != 0) {
        let mut remainder = 0u32;
        for byte in magnitude.iter_mut() {
            let current = (remainder << 8) | u32::from(*byte);
            *byte = (current / 10) as u8;
            remainder = current % 10;
        }
        digits.push(b'0' + remainder as u8);
    }
    if digits.is_empty() {
        digits.push(b'0');
    }
    digits.reverse();
    let mut text = String::from_utf8(digits).expect("ASCII digits");
    if scale > 0 {
        let scale = scale as usize;
        if text.len() <= scale {
            text = format!("{}{text}", "0".repeat(scale + 1 - text.len()));
        }
        text.insert(text.len() - scale, '.');
    } else if scale < 0 {
        text.push_str(&"0".repeat(scale.unsigned_abs() as usize));
    }
    if negative {
        text.insert(0, '-');
    }
    text
}

/// (year, month, day) of the proleptic Gregorian calendar, `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// ISO date; years before 1 as PostgreSQL writes them (`0044-03-15 BC`).
fn date_text(days: i64) -> String {
    let (year, month, day) = civil_from_days(days);
    if year >= 1 {
        format!("{year:04}-{month:02}-{day:02}")
    } else {
        format!("{:04}-{month:02}-{day:02} BC", 1 - year)
    }
}

/// `.ffffff` with trailing zeros left off, or nothing for a whole second.
fn fraction_text(units: i64, per_second: i64) -> String {
    if units == 0 {
        return String::new();
    }
    let width = per_second.ilog10() as usize;
    let digits = format!("{units:0width$}");
    format!(".{}", digits.trim_end_matches('0'))
}

/// `[-]HH:MM:SS[.f]`; hours may pass 24 (MySQL's `TIME` spans ±838 hours, PostgreSQL's
/// `24:00:00` is a time of day too).
fn time_text(value: i64, per_second: i64) -> String {
    let sign = if value < 0 { "-" } else { "" };
    let value = value.unsigned_abs();
    let per_second = per_second.unsigned_abs();
    let seconds = value / per_second;
    let fraction = fraction_text((value % per_second) as i64, per_second as i64);
    format!(
        "{sign}{:02}:{:02}:{:02}{fraction}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `YYYY-MM-DD HH:MM:SS[.f]` (no zone: Debezium's timestamps without one are wall-clock
/// readings encoded as if in UTC).
fn timestamp_text(value: i64, per_second: i64) -> String {
    let seconds = value.div_euclid(per_second);
    let fraction = fraction_text(value.rem_euclid(per_second), per_second);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (year, era) = if year >= 1 {
        (year, "")
    } else {
        (1 - year, " BC")
    };
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}{fraction}{era}",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// `length` bits, most significant first, from little-endian bytes.
fn bits_text(bytes: &[u8], length: usize) -> String {
    let length = if length == 0 { bytes.len() * 8 } else { length };
    (0..length)
        .rev()
        .map(|bit| {
            let set = bytes.get(bit / 8).is_some_and(|b| b >> (bit % 8) & 1 == 1);
            if set {
                '1'
            } else {
                '0'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(schema: Value, value: Value) -> Value {
        let mut row = Map::new();
        row.insert("c".into(), value);
        let mut schema = schema;
        schema["field"] = json!("c");
        convert_row(&json!({ "fields": [schema] }), &mut row).expect("converts");
        row.remove("c").expect("kept")
    }

    #[test]
    fn decimals_decode_with_their_scale() {
        let decimal = |scale: &str| {
            json!({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
                   "parameters": {"scale": scale}})
        };
        // Debezium's encoding of the all-types test's values, read off a real topic.
        assert_eq!(
            convert(decimal("10"), json!("/nEW8Ak8jB8R8/sq6w==")),
            json!("-12345678901234567890.0123456789")
        );
        assert_eq!(convert(decimal("2"), json!("AeJA")), json!("1234.56"));
        assert_eq!(convert(decimal("2"), json!("/w==")), json!("-0.01"));
        assert_eq!(convert(decimal("6"), json!("AQ==")), json!("0.000001"));
        assert_eq!(convert(decimal("0"), json!("AA==")), json!("0"));
        assert_eq!(convert(decimal("2"), Value::Null), Value::Null);
        let variable = json!({"type": "struct", "name": "io.debezium.data.VariableScaleDecimal"});
        assert_eq!(
            convert(variable, json!({"scale": 20, "value": "AQ=="})),
            json!("0.00000000000000000001")
        );
        assert_eq!(decimal_text(&[0x80], 0), "-128");
        assert_eq!(decimal_text(&[0x00, 0x80], 1), "12.8");
        assert_eq!(decimal_text(&[0xff, 0x7f], 0), "-129");
    }

    #[test]
    fn dates_times_and_timestamps_become_iso_text() {
        let named = |name: &str| json!({"type": "int64", "name": name});
        assert_eq!(
            convert(named("io.debezium.time.Date"), json!(-719_162)),
            json!("0001-01-01")
        );
        assert_eq!(
            convert(named("io.debezium.time.Date"), json!(2_932_896)),
            json!("9999-12-31")
        );
        assert_eq!(
            convert(named("io.debezium.time.Date"), json!(19_782)),
            json!("2024-02-29")
        );
        assert_eq!(date_text(-719_163), "0001-12-31 BC");
        assert_eq!(
            convert(
                named("io.debezium.time.MicroTime"),
                json!(86_400_000_000_i64)
            ),
            json!("24:00:00")
        );
        assert_eq!(
            convert(
                named("io.debezium.time.MicroTime"),
                json!(-45_296_789_000_i64)
            ),
            json!("-12:34:56.789")
        );
        assert_eq!(
            convert(
                named("io.debezium.time.MicroTime"),
                json!(3_020_399_000_000_i64)
            ),
            json!("838:59:59")
        );
        assert_eq!(
            convert(named("io.debezium.time.Time"), json!(1_001)),
            json!("00:00:01.001")
        );
        assert_eq!(
            convert(named("io.debezium.time.MicroTimestamp"), json!(1)),
            json!("1970-01-01 00:00:00.000001")
        );
        assert_eq!(
            convert(
                named("io.debezium.time.MicroTimestamp"),
                json!(1_709_251_199_123_456_i64)
            ),
            json!("2024-02-29 23:59:59.123456")
        );
        assert_eq!(
            convert(
                named("io.debezium.time.MicroTimestamp"),
                json!(-30_610_224_000_000_000_i64)
            ),
            json!("1000-01-01 00:00:00")
        );
        assert_eq!(
            convert(named("org.apache.kafka.connect.data.Timestamp"), json!(-1)),
            json!("1969-12-31 23:59:59.999")
        );
        assert_eq!(
            convert(named("io.debezium.time.MicroDuration"), json!(-1_500_000)),
            json!("-1500000 microseconds")
        );
        // Named string forms (ZonedTimestamp, IsoDate, …) pass through.
        assert_eq!(
            convert(
                named("io.debezium.time.ZonedTimestamp"),
                json!("2024-02-29T07:04:56Z")
            ),
            json!("2024-02-29T07:04:56Z")
        );
    }

    #[test]
    fn bits_points_and_arrays_take_tidelinks_forms() {
        let bits = |length: &str| json!({"type": "bytes", "name": "io.debezium.data.Bits", "parameters": {"length": length}});
        assert_eq!(convert(bits("4"), json!("Cg==")), json!("1010"));
        assert_eq!(convert(bits("10"), json!("qgI=")), json!("1010101010"));
        assert_eq!(convert(bits("10"), json!("AAA=")), json!("0000000000"));
        let point = json!({"type": "struct", "name": "io.debezium.data.geometry.Point"});
        assert_eq!(
            convert(
                point,
                json!({"x": 1.5, "y": -2.0, "wkb": "AQ==", "srid": null})
            ),
            json!("(1.5,-2.0)")
        );
        let dates =
            json!({"type": "array", "items": {"type": "int32", "name": "io.debezium.time.Date"}});
        assert_eq!(
            convert(dates, json!([0, null, 1])),
            json!(["1970-01-01", null, "1970-01-02"])
        );
        let plain = json!({"type": "array", "items": {"type": "int32"}});
        assert_eq!(convert(plain, json!([1, 2])), json!([1, 2]));
    }

    #[test]
    fn a_value_that_does_not_match_its_schema_is_an_error_naming_the_column() {
        let mut row = Map::new();
        row.insert("amount".into(), json!(12));
        let schema = json!({"fields": [{"field": "amount", "type": "bytes",
            "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}}]});
        let error = convert_row(&schema, &mut row).expect_err("not base64");
        assert!(error.contains("column `amount`"), "{error}");
        assert!(error.contains("Decimal"), "{error}");
    }
}
