//! The decoded pgoutput messages, one variant per wire message.
//!
//! These types mirror the wire format closely (no interpretation of tuples): interpretation
//! needs the relation cache and lives in the transaction assembler. Values are owned so a message
//! can outlive the network buffer it came from.

use crate::lsn::Lsn;

/// Postgres object id (relation or type).
pub type Oid = u32;

/// Microseconds since 2000-01-01 00:00:00 UTC, as Postgres sends timestamps.
pub type PgTimestamp = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(DecodingMessage),
    /// Protocol v2 streaming of in-progress transactions.
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record; equals `Commit::commit_lsn` of the same transaction.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: what the slot is acknowledged with.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: primary key.
    Default,
    /// `n`: nothing; UPDATE/DELETE cannot be published.
    Nothing,
    /// `f`: all columns (every column is flagged as key on the wire).
    Full,
    /// `i`: a unique index chosen with `REPLICA IDENTITY USING INDEX`.
    Index,
}

impl ReplicaIdentity {
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (bit 0 of the flags byte).
    pub is_key: bool,
    pub name: String,
    pub type_oid: Oid,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Only inside a v2 stream block.
    pub xid: Option<u32>,
    pub id: Oid,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub xid: Option<u32>,
    pub id: Oid,
    pub namespace: String,
    pub name: String,
}

/// One column of a tuple as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    Null,
    /// `u`: a TOASTed value that did not change; the real value is not in the message.
    UnchangedToast,
    /// `t`: the type's text output, in the server encoding.
    Text(Vec<u8>),
    /// `b`: the type's binary send format (only with the `binary` option).
    Binary(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleData {
    pub columns: Vec<ColumnValue>,
}

/// The "before" image of an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only replica-identity columns are meaningful, the others are null.
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation_id: Oid,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation_id: Oid,
    /// Absent when the key did not change and identity is not FULL.
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation_id: Oid,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<u32>,
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<Oid>,
}

/// A `pg_logical_emit_message()` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodingMessage {
    pub xid: Option<u32>,
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    pub first_segment: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
    /// Protocol v4 with parallel streaming only.
    pub abort_lsn: Option<Lsn>,
    pub abort_time: Option<PgTimestamp>,
}
