//! Decoder for the `pgoutput` logical replication protocol, version 1.
//!
//! The replication client hands over each XLogData payload; Begin and Commit are framed by
//! the client itself, so this module decodes the messages in between: Relation (the table's
//! columns, their type OIDs and which form the replica identity), Type, Insert, Update,
//! Delete, Truncate and Origin. Tuple columns keep their three states — SQL NULL, text
//! value, and "unchanged TOASTed value not sent" — because collapsing the last into NULL
//! would silently erase data in the target.
//!
//! Every read is bounds-checked: a truncated or foreign payload is an error naming the
//! message type and offset, never a panic.

use std::fmt;

/// One column value as pgoutput sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change and was not sent.
    UnchangedToast,
    /// The value in the type's text output form.
    Text(String),
    /// The value in the type's binary form (only with the `binary` option).
    Binary(Vec<u8>),
}

/// A column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`-1` when none).
    pub type_modifier: i32,
}

/// A Relation message: the shape of a table, sent before its first change and after DDL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Table OID.
    pub id: u32,
    /// Schema.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in table order.
    pub columns: Vec<RelationColumn>,
}

/// A decoded pgoutput message (Begin and Commit are handled by the replication client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// Table shape.
    Relation(Relation),
    /// A user-defined type's name.
    Type {
        /// Type OID.
        id: u32,
        /// Schema.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// Row inserted.
    Insert {
        /// Table OID.
        relation: u32,
        /// New row.
        new: Vec<TupleValue>,
    },
    /// Row updated. `old` is present when the key changed (`K`) or under REPLICA IDENTITY
    /// FULL (`O`).
    Update {
        /// Table OID.
        relation: u32,
        /// Old key or old row.
        old: Option<OldTuple>,
        /// New row.
        new: Vec<TupleValue>,
    },
    /// Row deleted.
    Delete {
        /// Table OID.
        relation: u32,
        /// Old key or old row.
        old: OldTuple,
    },
    /// Tables truncated.
    Truncate {
        /// Table OIDs.
        relations: Vec<u32>,
        /// CASCADE (1) and RESTART IDENTITY (2) bits.
        options: u8,
    },
    /// Replication origin of the transaction.
    Origin {
        /// Commit LSN on the origin.
        lsn: u64,
        /// Origin name.
        name: String,
    },
    /// Begin, Commit or Message, which the replication client reports itself.
    Boundary(u8),
}

/// The old tuple of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple {
    /// `K`: only the replica identity columns are meaningful (others are NULL placeholders).
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    pub key_only: bool,
    /// Column values in table order.
    pub values: Vec<TupleValue>,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Message type byte, as a character.
    pub message_type: char,
    /// Byte offset where decoding failed.
    pub offset: usize,
    /// What was wrong.
    pub reason: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot decode pgoutput message '{}' at byte {}: {}",
            self.message_type, self.offset, self.reason
        )
    }
}

impl std::error::Error for DecodeError {}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    message_type: char,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, reason: impl Into<String>) -> Result<T, DecodeError> {
        Err(DecodeError {
            message_type: self.message_type,
            offset: self.pos,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.data.len() - self.pos < n {
            return self.fail(format!(
                "needs {n} more bytes, {} left",
                self.data.len() - self.pos
            ));
        }
        let slice = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn cstring(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return self.fail("string without terminating NUL");
        };
        let s = match std::str::from_utf8(&rest[..end]) {
            Ok(s) => s.to_string(),
            Err(e) => return self.fail(format!("string is not UTF-8: {e}")),
        };
        self.pos += end + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16()?;
        if n < 0 {
            return self.fail(format!("negative column count {n}"));
        }
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let value = match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    if len < 0 {
                        return self.fail(format!("negative value length {len}"));
                    }
                    let bytes = self.take(len as usize)?;
                    if kind == b't' {
                        match std::str::from_utf8(bytes) {
                            Ok(s) => TupleValue::Text(s.to_string()),
                            Err(e) => return self.fail(format!("text value is not UTF-8: {e}")),
                        }
                    } else {
                        TupleValue::Binary(bytes.to_vec())
                    }
                }
                other => return self.fail(format!("unknown tuple value kind {other:#04x}")),
            };
            values.push(value);
        }
        Ok(values)
    }

    fn old_tuple(&mut self) -> Result<OldTuple, DecodeError> {
        match self.u8()? {
            b'K' => Ok(OldTuple {
                key_only: true,
                values: self.tuple()?,
            }),
            b'O' => Ok(OldTuple {
                key_only: false,
                values: self.tuple()?,
            }),
            other => self.fail(format!("expected 'K' or 'O', found {other:#04x}")),
        }
    }

    fn expect_new(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            b'N' => Ok(()),
            other => self.fail(format!("expected 'N', found {other:#04x}")),
        }
    }
}

/// Decodes one pgoutput payload.
pub fn decode(data: &[u8]) -> Result<PgOutputMessage, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError {
            message_type: '?',
            offset: 0,
            reason: "empty payload".into(),
        });
    };
    let mut r = Reader {
        data,
        pos: 1,
        message_type: tag as char,
    };
    let message = match tag {
        b'B' | b'C' | b'M' => PgOutputMessage::Boundary(tag),
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstring()?;
            let name = r.cstring()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            if n < 0 {
                return r.fail(format!("negative column count {n}"));
            }
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    is_key: flags & 1 == 1,
                    name: r.cstring()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            PgOutputMessage::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => PgOutputMessage::Type {
            id: r.u32()?,
            namespace: r.cstring()?,
            name: r.cstring()?,
        },
        b'I' => {
            let relation = r.u32()?;
            r.expect_new()?;
            PgOutputMessage::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match data.get(r.pos) {
                Some(b'K') | Some(b'O') => Some(r.old_tuple()?),
                _ => None,
            };
            r.expect_new()?;
            PgOutputMessage::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            PgOutputMessage::Delete {
                relation,
                old: r.old_tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            if n as usize > data.len() / 4 {
                return r.fail(format!(
                    "truncate names {n} relations, more than the payload holds"
                ));
            }
            let mut relations = Vec::with_capacity(n as usize);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            PgOutputMessage::Truncate { relations, options }
        }
        b'O' => PgOutputMessage::Origin {
            lsn: r.u64()?,
            name: r.cstring()?,
        },
        other => {
            return r.fail(format!("unknown message type {other:#04x}"));
        }
    };
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16384u32.to_be_bytes());
        b.extend(b"public\0items\0");
        b.push(b'd');
        b.extend(2i16.to_be_bytes());
        b.push(1);
        b.extend(b"id\0");
        b.extend(23u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"body\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b
    }

    #[test]
    fn decodes_relation() {
        let PgOutputMessage::Relation(rel) = decode(&relation_bytes()).expect("decodes") else {
            panic!("not a relation");
        };
        assert_eq!(rel.namespace, "public");
        assert_eq!(rel.name, "items");
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].is_key);
        assert_eq!(rel.columns[1].type_oid, 25);
    }

    #[test]
    fn decodes_update_with_unchanged_toast_and_old_key() {
        let mut b = vec![b'U'];
        b.extend(16384u32.to_be_bytes());
        b.push(b'K');
        b.extend(2i16.to_be_bytes());
        b.push(b't');
        b.extend(1i32.to_be_bytes());
        b.push(b'7');
        b.push(b'n');
        b.push(b'N');
        b.extend(2i16.to_be_bytes());
        b.push(b't');
        b.extend(1i32.to_be_bytes());
        b.push(b'8');
        b.push(b'u');
        let msg = decode(&b).expect("decodes");
        assert_eq!(
            msg,
            PgOutputMessage::Update {
                relation: 16384,
                old: Some(OldTuple {
                    key_only: true,
                    values: vec![TupleValue::Text("7".into()), TupleValue::Null]
                }),
                new: vec![TupleValue::Text("8".into()), TupleValue::UnchangedToast],
            }
        );
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error_not_a_panic() {
        let full = relation_bytes();
        for cut in 0..full.len() {
            assert!(
                decode(&full[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
    }

    #[test]
    fn mutated_and_random_payloads_never_panic() {
        let mut insert = vec![b'I'];
        insert.extend(16384u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(2i16.to_be_bytes());
        insert.push(b't');
        insert.extend(3i32.to_be_bytes());
        insert.extend(b"abc");
        insert.push(b'u');
        let truncate = [b'T', 0, 0, 0, 2, 1, 0, 0, 0x40, 0, 0, 0, 0x40, 1];
        let seeds: [&[u8]; 4] = [
            &relation_bytes(),
            &insert,
            &truncate,
            b"O\0\0\0\0\0\0\0\x01origin\0",
        ];
        let mut mutator = tidelink_core::fuzz::Mutator::new(0x5eed);
        for _ in 0..50_000 {
            let _ = decode(&mutator.input(&seeds));
        }
    }

    #[test]
    fn garbage_is_an_error_naming_the_type() {
        let err = decode(b"Zxyz").expect_err("unknown type");
        assert_eq!(err.message_type, 'Z');
        let err = decode(b"I\0\0\0\x01N\xff\xff").expect_err("negative count");
        assert!(err.reason.contains("negative"), "{err}");
    }
}
