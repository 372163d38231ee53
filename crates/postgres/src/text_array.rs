//! The PostgreSQL sink's statement parameters: one `text[]` per column of a batched
//! statement, written as each row's value is converted, straight into the binary array
//! form the server receives. A batch of n rows and c columns costs c growing buffers
//! instead of n × c strings (and the vectors of them the generic `Vec<Option<String>>`
//! encoding would walk a second time).

use crate::types::{json_to_text, push_bytea_hex, TargetKind};
use base64::Engine as _;
use bytes::{BufMut, BytesMut};
use serde_json::Value;
use std::error::Error;
use tidelink_core::with_number_text;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// The elements of one `text[]` parameter, each a length (-1 for NULL) and its bytes.
#[derive(Debug, Default)]
pub(crate) struct TextArray {
    elements: Vec<u8>,
    len: i32,
    has_nulls: bool,
}

impl TextArray {
    /// An empty array with room for `rows` elements of a few bytes.
    pub(crate) fn with_rows(rows: usize) -> Self {
        Self {
            elements: Vec::with_capacity(rows * 12),
            ..Self::default()
        }
    }

    /// Number of elements.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// Appends a NULL element.
    pub(crate) fn push_null(&mut self) {
        self.elements.put_i32(-1);
        self.len += 1;
        self.has_nulls = true;
    }

    /// Appends an element whose text `write` puts at the end of the buffer it is given.
    fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.elements.len();
        self.elements.put_i32(0);
        write(&mut self.elements);
        let length = (self.elements.len() - start - 4) as i32;
        self.elements[start..start + 4].copy_from_slice(&length.to_be_bytes());
        self.len += 1;
    }

    /// Appends `text`.
    pub(crate) fn push_text(&mut self, text: &str) {
        self.push_with(|out| out.extend_from_slice(text.as_bytes()));
    }

    /// Appends a value from the envelope in the text form of a column of `kind`, as
    /// [`json_to_text`] converts it.
    pub(crate) fn push_value(&mut self, value: &Value, kind: &TargetKind) -> Result<(), String> {
        match (value, kind) {
            (Value::Null, _) => self.push_null(),
            (Value::Bool(b), _) => self.push_text(if *b { "true" } else { "false" }),
            (Value::Number(n), _) => with_number_text(n, |text| self.push_text(text)),
            (Value::String(s), TargetKind::Bytes) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| format!("bytea value is not base64: {e}"))?;
                self.push_with(|out| push_bytea_hex(out, &bytes));
            }
            (Value::String(s), _) => self.push_text(s),
            (other, _) => match json_to_text(other, kind)? {
                Some(text) => self.push_text(&text),
                None => self.push_null(),
            },
        }
        Ok(())
    }
}

impl ToSql for TextArray {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        // One dimension, whether any element is NULL, the element type, the dimension's
        // length and lower bound (as tokio-postgres writes any array), then the elements.
        out.reserve(20 + self.elements.len());
        out.put_i32(1);
        out.put_i32(i32::from(self.has_nulls));
        out.put_u32(Type::TEXT.oid());
        out.put_i32(self.len);
        out.put_i32(1);
        out.extend_from_slice(&self.elements);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What tokio-postgres writes for the same elements as a `Vec<Option<&str>>`.
    fn generic(elements: &[Option<&str>]) -> BytesMut {
        let mut out = BytesMut::new();
        elements
            .to_vec()
            .to_sql(&Type::TEXT_ARRAY, &mut out)
            .expect("encodes");
        out
    }

    fn written(array: &TextArray) -> BytesMut {
        let mut out = BytesMut::new();
        array.to_sql(&Type::TEXT_ARRAY, &mut out).expect("encodes");
        out
    }

    #[test]
    fn writes_what_the_generic_encoding_writes() {
        let mut array = TextArray::with_rows(4);
        for value in [
            json!(7),
            json!(null),
            json!("ada"),
            json!(true),
            json!(-1.5),
        ] {
            array
                .push_value(&value, &TargetKind::Other)
                .expect("converts");
        }
        assert_eq!(array.len(), 5);
        assert_eq!(
            written(&array),
            generic(&[Some("7"), None, Some("ada"), Some("true"), Some("-1.5")])
        );
        let mut no_nulls = TextArray::default();
        no_nulls.push_text("x");
        assert_eq!(written(&no_nulls), generic(&[Some("x")]));
        assert_eq!(written(&TextArray::default()), generic(&[]));
    }

    #[test]
    fn values_convert_as_json_to_text_converts_them() {
        let cases = [
            (json!("AP8="), TargetKind::Bytes),
            (json!({"a": [1, "b"]}), TargetKind::Json),
            (
                json!([1, null, 3]),
                TargetKind::Array(Box::new(TargetKind::Other)),
            ),
            (
                json!(["a\"b", "c"]),
                TargetKind::Array(Box::new(TargetKind::Other)),
            ),
            (json!(12345678901234_i64), TargetKind::Other),
            (json!(u64::MAX), TargetKind::Other),
            (json!(i64::MIN), TargetKind::Other),
            (json!("2026-12-03 10:00:00+00"), TargetKind::Other),
        ];
        for (value, kind) in cases {
            let mut array = TextArray::default();
            array.push_value(&value, &kind).expect("converts");
            let text = json_to_text(&value, &kind).expect("converts");
            assert_eq!(written(&array), generic(&[text.as_deref()]), "{value}");
        }
    }

    #[test]
    fn a_value_that_does_not_convert_leaves_the_array_as_it_was() {
        let mut array = TextArray::default();
        array.push_text("kept");
        let error = array
            .push_value(&json!("not base64!"), &TargetKind::Bytes)
            .expect_err("refused");
        assert!(error.contains("base64"), "{error}");
        assert_eq!(written(&array), generic(&[Some("kept")]));
    }
}
