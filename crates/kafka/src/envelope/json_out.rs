//! Writes rows and text as JSON byte for byte as serde_json writes them, without going
//! through serde's serializer: text is copied in runs that need no escape (found eight
//! bytes at a time), whole numbers are written with `itoa`, and only fractions and nested
//! values (arrays, objects) are left to serde_json.

use super::plain_text::plain_text_length;
use serde_json::Value;
use tidelink_core::Row;

/// A row as a JSON object, columns in name order.
pub(super) fn write_row(out: &mut Vec<u8>, row: &Row) {
    out.push(b'{');
    for (i, (name, value)) in row.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_text(out, name);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// A row, or `null`.
pub(super) fn write_optional_row(out: &mut Vec<u8>, row: Option<&Row>) {
    match row {
        Some(row) => write_row(out, row),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(text) => write_text(out, text),
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) if number.is_i64() || number.is_u64() => {
            tidelink_core::with_number_text(number, |text| out.extend_from_slice(text.as_bytes()))
        }
        other => super::write_json(out, other),
    }
}

/// Text as a JSON string, escaped as serde_json escapes it: `"` and `\` with a backslash,
/// the control characters as `\b \f \n \r \t` or `\u00xx`, everything else as it is.
pub(super) fn write_text(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let mut rest = text.as_bytes();
    while let Some(plain) = plain_text_length(rest) {
        out.extend_from_slice(&rest[..plain]);
        let byte = rest[plain];
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\x08' => out.extend_from_slice(b"\\b"),
            b'\x0c' => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            control => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(control >> 4)]);
                out.push(HEX[usize::from(control & 0xf)]);
            }
        }
        rest = &rest[plain + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn written(row: &Row) -> Vec<u8> {
        let mut out = Vec::new();
        write_row(&mut out, row);
        out
    }

    #[test]
    fn rows_are_written_byte_for_byte_as_serde_json_writes_them() {
        let every_ascii: String = (0u8..128).map(char::from).collect();
        let values = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(-1),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(1.5),
            json!(-0.0),
            json!(1e300),
            json!(-2.5e-300),
            json!(""),
            json!(every_ascii),
            json!("é ☃ 😀 \u{7f} \u{1f} a\"b\\c\nd"),
            json!([1, "two", {"three": [null, 3.5]}]),
            json!({"z": 1, "a": "\u{1}"}),
        ];
        let mut row = Row::new();
        for (i, value) in values.iter().enumerate() {
            row.insert(format!("column {i} \"\\\u{2}"), value.clone());
        }
        assert_eq!(written(&row), serde_json::to_vec(&row).expect("json"));
        // Every single character and every pair around the eight-byte boundaries.
        for byte in 0u8..128 {
            for length in [1usize, 7, 8, 9, 15, 16, 17] {
                let mut text = "x".repeat(length - 1);
                text.push(char::from(byte));
                let row: Row = [(text.clone(), json!(text))].into_iter().collect();
                assert_eq!(written(&row), serde_json::to_vec(&row).expect("json"));
            }
        }
        let mut mutator = tidelink_core::fuzz::Mutator::new(0x00e7_c0de);
        let seed = every_ascii.as_bytes();
        for _ in 0..20_000 {
            let text = String::from_utf8_lossy(&mutator.input(&[seed])).into_owned();
            let row: Row = [("t".to_string(), json!(text))].into_iter().collect();
            assert_eq!(written(&row), serde_json::to_vec(&row).expect("json"));
        }
        let mut out = Vec::new();
        write_optional_row(&mut out, None);
        assert_eq!(out, b"null");
    }
}
