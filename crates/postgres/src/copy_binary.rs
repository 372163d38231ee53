//! PostgreSQL's binary `COPY` format, read only as far as a direct backfill needs: the
//! bytes of a `COPY … TO STDOUT (FORMAT binary)` pass to the target's
//! `COPY … FROM STDIN (FORMAT binary)` untouched, while [`TupleWalker`] counts their
//! tuples and keeps the last one, whose key columns [`key_text`] renders as the type's
//! output function would (the text form every other backfill path records as progress).
//!
//! The format: an 11-byte signature, a 32-bit flags field and a 32-bit header extension
//! length (followed by that many bytes); then each tuple as a 16-bit field count and,
//! per field, a 32-bit length (-1 for NULL) and that many bytes; then a 16-bit -1. All
//! integers are big-endian. Binary values are type-specific, so only columns of the same
//! built-in type on both sides may take this path, and only keys of the types below can
//! be rendered as text here.

/// The signature that opens a binary `COPY` stream.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Signature, flags and the extension's length.
const HEADER_BYTES: usize = 19;

const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const NAME: u32 = 19;
const TEXT: u32 = 25;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const UUID: u32 = 2950;

/// Whether a key column of type `oid` can be rendered as text from its binary form.
pub fn key_type_readable(oid: u32) -> bool {
    matches!(
        oid,
        INT2 | INT4 | INT8 | NAME | TEXT | BPCHAR | VARCHAR | UUID
    )
}

/// Built-in types (their OIDs are the same in every cluster) whose binary form carries the
/// value alone, so that it means the same on another server: numbers, text, bytea,
/// booleans, dates and times, json and jsonb, uuids, network addresses, bit strings, and
/// arrays of these. Left out on purpose: the `reg*` types (their binary form is an OID
/// local to the source cluster, where the text form is a name), types without a binary
/// form (`aclitem`), and every type a cluster defines itself (enums, domains, composites,
/// extensions' types; an array's binary form names its element type's OID).
const PORTABLE_TYPES: &[u32] = &[
    16, 17, 18, 19, 20, 21, 23, 25, 26, 114, 650, 700, 701, 774, 790, 829, 869, 1042, 1043, 1082,
    1083, 1114, 1184, 1186, 1266, 1560, 1562, 1700, 2950, 3802, // Their arrays.
    1000, 1001, 1002, 1003, 1016, 1005, 1007, 1009, 1028, 199, 651, 1021, 1022, 775, 791, 1040,
    1041, 1014, 1015, 1182, 1183, 1115, 1185, 1187, 1270, 1561, 1563, 1231, 2951, 3807,
];

/// Whether a column of type `oid` may move in binary form to a column of the same type on
/// another server of the same major version.
pub fn column_type_portable(oid: u32) -> bool {
    PORTABLE_TYPES.contains(&oid)
}

/// Walks a binary `COPY` stream given in pieces of any size: counts its tuples and keeps
/// the last complete one.
#[derive(Default)]
pub struct TupleWalker {
    header_read: bool,
    /// The start of a tuple (or header) that the pieces so far cut off.
    carry: Vec<u8>,
    tuples: usize,
    last_tuple: Vec<u8>,
    ended: bool,
}

/// What the bytes at the cursor hold.
enum Next {
    /// A whole tuple of this many bytes.
    Tuple(usize),
    /// The trailer (two bytes).
    Trailer,
    /// Not enough bytes yet.
    Incomplete,
}

impl TupleWalker {
    /// Reads the next piece of the stream.
    pub fn read(&mut self, piece: &[u8]) -> Result<(), String> {
        if self.carry.is_empty() {
            let rest = self.walk(piece)?;
            self.carry.extend_from_slice(&piece[rest..]);
        } else {
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(piece);
            let rest = self.walk(&joined)?;
            joined.drain(..rest);
            self.carry = joined;
        }
        Ok(())
    }

    /// Walks what `bytes` holds whole; returns where the part it cuts off starts.
    fn walk(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let mut at = 0;
        if !self.header_read {
            if bytes.len() < HEADER_BYTES {
                return Ok(0);
            }
            if bytes[..SIGNATURE.len()] != SIGNATURE[..] {
                return Err("the binary COPY stream does not start with its signature".into());
            }
            let extension = u32::from_be_bytes(bytes[15..19].try_into().expect("4 bytes"));
            let header = HEADER_BYTES + extension as usize;
            if bytes.len() < header {
                return Ok(0);
            }
            self.header_read = true;
            at = header;
        }
        let mut last = None;
        while at < bytes.len() {
            if self.ended {
                return Err("the binary COPY stream goes on after its trailer".into());
            }
            match next(&bytes[at..])? {
                Next::Tuple(length) => {
                    last = Some(at..at + length);
                    self.tuples += 1;
                    at += length;
                }
                Next::Trailer => {
                    self.ended = true;
                    at += 2;
                }
                Next::Incomplete => break,
            }
        }
        if let Some(range) = last {
            self.last_tuple.clear();
            self.last_tuple.extend_from_slice(&bytes[range]);
        }
        Ok(at)
    }

    /// Tuples read whole so far.
    pub fn tuples(&self) -> usize {
        self.tuples
    }

    /// Whether the trailer was read, and nothing is left over.
    pub fn complete(&self) -> bool {
        self.ended && self.carry.is_empty()
    }

    /// The fields of the last tuple read (`None` for NULL), or `None` before any.
    pub fn last_fields(&self) -> Option<Vec<Option<&[u8]>>> {
        if self.tuples == 0 {
            return None;
        }
        let tuple = &self.last_tuple;
        let count = i16::from_be_bytes([tuple[0], tuple[1]]);
        let mut fields = Vec::with_capacity(count.max(0) as usize);
        let mut at = 2;
        for _ in 0..count {
            let length = i32::from_be_bytes(tuple[at..at + 4].try_into().expect("4 bytes"));
            at += 4;
            if length < 0 {
                fields.push(None);
            } else {
                let end = at + length as usize;
                fields.push(Some(&tuple[at..end]));
                at = end;
            }
        }
        Some(fields)
    }
}

/// What starts at the beginning of `bytes`.
fn next(bytes: &[u8]) -> Result<Next, String> {
    let Some(count) = bytes.get(..2) else {
        return Ok(Next::Incomplete);
    };
    let count = i16::from_be_bytes([count[0], count[1]]);
    if count == -1 {
        return Ok(Next::Trailer);
    }
    if count < 0 {
        return Err(format!("a binary COPY tuple claims {count} fields"));
    }
    let mut at = 2;
    for _ in 0..count {
        let Some(length) = bytes.get(at..at + 4) else {
            return Ok(Next::Incomplete);
        };
        let length = i32::from_be_bytes(length.try_into().expect("4 bytes"));
        at += 4;
        if length >= 0 {
            at += length as usize;
        } else if length != -1 {
            return Err(format!("a binary COPY field claims {length} bytes"));
        }
    }
    Ok(if at <= bytes.len() {
        Next::Tuple(at)
    } else {
        Next::Incomplete
    })
}

/// A key value of type `oid` (one [`key_type_readable`] accepts) as its output function
/// writes it.
pub fn key_text(oid: u32, value: &[u8]) -> Result<String, String> {
    let wrong = || format!("a key value of type {oid} has {} bytes", value.len());
    Ok(match oid {
        INT2 => i16::from_be_bytes(value.try_into().map_err(|_| wrong())?).to_string(),
        INT4 => i32::from_be_bytes(value.try_into().map_err(|_| wrong())?).to_string(),
        INT8 => i64::from_be_bytes(value.try_into().map_err(|_| wrong())?).to_string(),
        NAME | TEXT | BPCHAR | VARCHAR => String::from_utf8(value.to_vec())
            .map_err(|e| format!("a text key value is not UTF-8: {e}"))?,
        UUID => {
            use std::fmt::Write;
            let bytes: &[u8; 16] = value.try_into().map_err(|_| wrong())?;
            let mut text = String::with_capacity(36);
            for (i, byte) in bytes.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    text.push('-');
                }
                let _ = write!(text, "{byte:02x}");
            }
            text
        }
        other => return Err(format!("no binary reading of key type {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary COPY stream of `tuples` (each a list of fields, `None` for NULL).
    fn stream(tuples: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        // A header extension of three bytes, which a reader must skip.
        out.extend_from_slice(&3u32.to_be_bytes());
        out.extend_from_slice(b"ext");
        for tuple in tuples {
            out.extend_from_slice(&(tuple.len() as i16).to_be_bytes());
            for field in tuple {
                match field {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(bytes) => {
                        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                        out.extend_from_slice(bytes);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn tuples(n: i64) -> Vec<Vec<Option<Vec<u8>>>> {
        (1..=n)
            .map(|i| {
                vec![
                    Some(i.to_be_bytes().to_vec()),
                    (i % 3 != 0).then(|| format!("name {i}").into_bytes()),
                    Some(Vec::new()),
                ]
            })
            .collect()
    }

    #[test]
    fn tuples_are_counted_and_the_last_kept_however_the_stream_is_cut() {
        let bytes = stream(&tuples(50));
        for piece in [1, 2, 3, 7, 19, 20, 64, bytes.len()] {
            let mut walker = TupleWalker::default();
            for part in bytes.chunks(piece) {
                walker.read(part).expect("valid stream");
            }
            assert_eq!(walker.tuples(), 50, "pieces of {piece}");
            assert!(walker.complete());
            let fields = walker.last_fields().expect("a last tuple");
            assert_eq!(key_text(INT8, fields[0].expect("key")).unwrap(), "50");
            assert_eq!(fields[1], Some(&b"name 50"[..]));
            assert_eq!(fields[2], Some(&b""[..]));
        }
    }

    #[test]
    fn an_empty_stream_has_no_last_tuple_and_a_cut_one_is_not_complete() {
        let bytes = stream(&[]);
        let mut walker = TupleWalker::default();
        walker.read(&bytes).expect("valid");
        assert!(walker.complete());
        assert!(walker.last_fields().is_none());
        let bytes = stream(&tuples(2));
        let mut walker = TupleWalker::default();
        walker
            .read(&bytes[..bytes.len() - 5])
            .expect("valid so far");
        assert_eq!(walker.tuples(), 1);
        assert!(!walker.complete());
    }

    #[test]
    fn a_stream_without_the_signature_or_with_bytes_after_the_trailer_is_refused() {
        let mut walker = TupleWalker::default();
        assert!(walker.read(b"id\tname\n1\tada\n0123456789").is_err());
        let mut bytes = stream(&tuples(1));
        bytes.extend_from_slice(b"\0\x01");
        assert!(TupleWalker::default().read(&bytes).is_err());
    }

    #[test]
    fn key_values_read_as_their_output_functions_write_them() {
        assert_eq!(key_text(INT2, &(-7i16).to_be_bytes()).unwrap(), "-7");
        assert_eq!(
            key_text(INT4, &i32::MIN.to_be_bytes()).unwrap(),
            "-2147483648"
        );
        assert_eq!(
            key_text(INT8, &i64::MAX.to_be_bytes()).unwrap(),
            i64::MAX.to_string()
        );
        assert_eq!(
            key_text(TEXT, "tab\there é".as_bytes()).unwrap(),
            "tab\there é"
        );
        let uuid = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(
            key_text(UUID, &uuid).unwrap(),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
        assert!(key_text(INT4, &[0, 1]).is_err());
        assert!(key_text(1082, &[0; 4]).is_err(), "date is not read here");
        assert!(key_type_readable(UUID) && !key_type_readable(1082));
    }

    #[test]
    fn only_types_whose_binary_form_is_the_value_alone_are_portable() {
        for readable_key in [INT2, INT4, INT8, NAME, TEXT, BPCHAR, VARCHAR, UUID] {
            assert!(column_type_portable(readable_key), "{readable_key}");
        }
        // numeric, timestamptz, jsonb, int4[] and text[].
        for oid in [1700, 1184, 3802, 1007, 1009] {
            assert!(column_type_portable(oid), "{oid}");
        }
        // regclass and regtype (OIDs local to a cluster), aclitem (no binary form), a
        // type a cluster created.
        for oid in [2205, 2206, 1033, 16_384] {
            assert!(!column_type_portable(oid), "{oid}");
        }
    }
}
