//! Sans-IO pgoutput decoder: one XLogData payload in, one [`LogicalMessage`] out.
//!
//! It is stateful only where the protocol is: between Stream Start and Stream Stop (v2), DML,
//! Relation, Type and Message carry an extra xid field, so the decoder must remember whether it
//! is inside a stream block. State changes only after a message decoded successfully, so an error
//! never leaves the decoder half-updated.

use super::error::DecodeError;
use super::message::*;
use super::reader::Reader;
use crate::lsn::Lsn;

#[derive(Debug, Clone)]
pub struct Decoder {
    protocol_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// `protocol_version` is the `proto_version` passed to START_REPLICATION.
    pub fn new(protocol_version: u32) -> Result<Self, DecodeError> {
        if !(1..=4).contains(&protocol_version) {
            return Err(DecodeError::UnsupportedProtocolVersion(protocol_version));
        }
        Ok(Decoder { protocol_version, in_stream: false })
    }

    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    pub fn decode(&mut self, buf: &[u8]) -> Result<LogicalMessage, DecodeError> {
        let mut r = Reader::new(buf);
        let tag = r.u8().map_err(|_| DecodeError::Empty)?;
        let msg = self.decode_body(tag, &mut r)?;
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes { tag: tag as char, remaining: r.remaining() });
        }
        match msg {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }

    fn require_v2(&self, tag: u8) -> Result<(), DecodeError> {
        if self.protocol_version < 2 {
            return Err(DecodeError::NeedsNewerProtocol {
                tag: tag as char,
                min_version: 2,
                version: self.protocol_version,
            });
        }
        Ok(())
    }

    /// The xid prefix present on some messages inside a stream block only.
    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            Ok(Some(r.u32()?))
        } else {
            Ok(None)
        }
    }

    fn decode_body(&self, tag: u8, r: &mut Reader<'_>) -> Result<LogicalMessage, DecodeError> {
        Ok(match tag {
            b'B' => LogicalMessage::Begin(Begin { final_lsn: Lsn(r.u64()?), commit_time: r.i64()?, xid: r.u32()? }),
            b'C' => LogicalMessage::Commit(Commit {
                flags: r.u8()?,
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_time: r.i64()?,
            }),
            b'O' => LogicalMessage::Origin(Origin { commit_lsn: Lsn(r.u64()?), name: r.cstr()? }),
            b'R' => LogicalMessage::Relation(self.relation(r)?),
            b'Y' => LogicalMessage::Type(TypeInfo {
                xid: self.stream_xid(r)?,
                id: r.u32()?,
                namespace: r.cstr()?,
                name: r.cstr()?,
            }),
            b'I' => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32()?;
                expect_marker(r, b'N', "'N'")?;
                LogicalMessage::Insert(Insert { xid, relation_id, new: tuple(r)? })
            }
            b'U' => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32()?;
                let at = r.offset();
                let (old, new) = match r.u8()? {
                    b'N' => (None, tuple(r)?),
                    b'K' => {
                        let old = OldTuple::Key(tuple(r)?);
                        expect_marker(r, b'N', "'N'")?;
                        (Some(old), tuple(r)?)
                    }
                    b'O' => {
                        let old = OldTuple::Full(tuple(r)?);
                        expect_marker(r, b'N', "'N'")?;
                        (Some(old), tuple(r)?)
                    }
                    found => {
                        return Err(DecodeError::UnexpectedTupleMarker {
                            expected: "'K', 'O' or 'N'",
                            found,
                            offset: at,
                        })
                    }
                };
                LogicalMessage::Update(Update { xid, relation_id, old, new })
            }
            b'D' => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32()?;
                let at = r.offset();
                let old = match r.u8()? {
                    b'K' => OldTuple::Key(tuple(r)?),
                    b'O' => OldTuple::Full(tuple(r)?),
                    found => {
                        return Err(DecodeError::UnexpectedTupleMarker { expected: "'K' or 'O'", found, offset: at })
                    }
                };
                LogicalMessage::Delete(Delete { xid, relation_id, old })
            }
            b'T' => {
                let xid = self.stream_xid(r)?;
                let at = r.offset();
                let n = r.i32()?;
                let n = usize::try_from(n).map_err(|_| DecodeError::NegativeCount {
                    what: "relation count",
                    value: i64::from(n),
                    offset: at,
                })?;
                let options = r.u8()?;
                // Capacity is bounded by what the buffer can hold, so a forged count cannot
                // make us allocate gigabytes before failing.
                let mut relation_ids = Vec::with_capacity(n.min(r.remaining() / 4));
                for _ in 0..n {
                    relation_ids.push(r.u32()?);
                }
                LogicalMessage::Truncate(Truncate {
                    xid,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                    relation_ids,
                })
            }
            b'M' => {
                let xid = self.stream_xid(r)?;
                let flags = r.u8()?;
                let lsn = Lsn(r.u64()?);
                let prefix = r.cstr()?;
                let content = r.len_prefixed("message length")?.to_vec();
                LogicalMessage::Message(DecodingMessage { xid, transactional: flags & 1 != 0, lsn, prefix, content })
            }
            b'S' => {
                self.require_v2(tag)?;
                if self.in_stream {
                    return Err(DecodeError::NestedStreamStart);
                }
                LogicalMessage::StreamStart(StreamStart { xid: r.u32()?, first_segment: r.u8()? == 1 })
            }
            b'E' => {
                self.require_v2(tag)?;
                if !self.in_stream {
                    return Err(DecodeError::NotInStream { tag: 'E' });
                }
                LogicalMessage::StreamStop
            }
            b'c' => {
                self.require_v2(tag)?;
                LogicalMessage::StreamCommit(StreamCommit {
                    xid: r.u32()?,
                    flags: r.u8()?,
                    commit_lsn: Lsn(r.u64()?),
                    end_lsn: Lsn(r.u64()?),
                    commit_time: r.i64()?,
                })
            }
            b'A' => {
                self.require_v2(tag)?;
                let xid = r.u32()?;
                let subxid = r.u32()?;
                // v4 appends abort LSN + timestamp, but only with `streaming = parallel`, so
                // their presence is decided by the length, not the version alone.
                let (abort_lsn, abort_time) = if self.protocol_version >= 4 && r.remaining() > 0 {
                    (Some(Lsn(r.u64()?)), Some(r.i64()?))
                } else {
                    (None, None)
                };
                LogicalMessage::StreamAbort(StreamAbort { xid, subxid, abort_lsn, abort_time })
            }
            b'b' | b'P' | b'K' | b'r' | b'p' => return Err(DecodeError::UnsupportedMessage(tag as char)),
            other => return Err(DecodeError::UnknownMessageType(other)),
        })
    }

    fn relation(&self, r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
        let xid = self.stream_xid(r)?;
        let id = r.u32()?;
        let namespace = r.cstr()?;
        let name = r.cstr()?;
        let ident = r.u8()?;
        let replica_identity = ReplicaIdentity::from_byte(ident).ok_or(DecodeError::UnknownReplicaIdentity(ident))?;
        let n = count(r, "column count")?;
        // Each column needs at least 10 bytes on the wire.
        let mut columns = Vec::with_capacity(n.min(r.remaining() / 10));
        for _ in 0..n {
            let flags = r.u8()?;
            columns.push(RelationColumn {
                is_key: flags & 1 != 0,
                name: r.cstr()?,
                type_oid: r.u32()?,
                type_modifier: r.i32()?,
            });
        }
        Ok(Relation { xid, id, namespace, name, replica_identity, columns })
    }
}

fn count(r: &mut Reader<'_>, what: &'static str) -> Result<usize, DecodeError> {
    let at = r.offset();
    let n = r.i16()?;
    usize::try_from(n).map_err(|_| DecodeError::NegativeCount { what, value: i64::from(n), offset: at })
}

fn expect_marker(r: &mut Reader<'_>, marker: u8, expected: &'static str) -> Result<(), DecodeError> {
    let at = r.offset();
    let found = r.u8()?;
    if found != marker {
        return Err(DecodeError::UnexpectedTupleMarker { expected, found, offset: at });
    }
    Ok(())
}

fn tuple(r: &mut Reader<'_>) -> Result<TupleData, DecodeError> {
    let n = count(r, "tuple column count")?;
    let mut columns = Vec::with_capacity(n.min(r.remaining()));
    for _ in 0..n {
        let at = r.offset();
        columns.push(match r.u8()? {
            b'n' => ColumnValue::Null,
            b'u' => ColumnValue::UnchangedToast,
            b't' => ColumnValue::Text(r.len_prefixed("column length")?.to_vec()),
            b'b' => ColumnValue::Binary(r.len_prefixed("column length")?.to_vec()),
            kind => return Err(DecodeError::UnknownColumnKind { kind, offset: at }),
        });
    }
    Ok(TupleData { columns })
}
