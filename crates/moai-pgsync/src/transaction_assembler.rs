//! Decoded pgoutput messages in, complete committed transactions out.
//!
//! A transaction is only emitted at its Commit, so nothing downstream can ever observe half of
//! one. Each change gets `seq` = its 0-based index inside the transaction, making
//! `(commit_lsn, seq)` a total order over all changes: keyset paging on that pair resumes exactly
//! and cannot drop the tail of a transaction bigger than a page (the original design's bug).
//! Truncate of N tables yields N changes, each with its own seq.
//!
//! Key columns: pgoutput flags the replica-identity columns. Under `REPLICA IDENTITY FULL`
//! every column is flagged, which would make the whole row the "key"; callers that know the
//! primary key (from the catalog) set it with [`TransactionAssembler::set_key_columns`].
//!
//! Updates are patches (docs/pgsync-protocol.md §4, `changes`): unchanged-TOAST columns are left
//! out of `row` and listed in `unchanged`, unless the old image (FULL identity, §11) carries the
//! value, which is then used.
//!
//! Not supported: v2 streaming of in-progress transactions (moai never enables it, so a
//! transaction arrives only with its commit: docs/pgsync-protocol.md §5, "Whole transactions")
//! and binary-format columns; both return typed errors.

use std::collections::HashMap;

use serde_json::Value;

use crate::lsn::Lsn;
use crate::pg_time;
use crate::pgoutput::{
    ColumnValue, DecodingMessage, LogicalMessage, Oid, OldTuple, PgTimestamp, Relation, RelationCache, RelationUpdate,
    TupleData,
};
use crate::position::Position;
use crate::protocol::{ColumnSchema, Row, WireOp, WireTransaction};
use crate::raw_row::RawRow;
use crate::value_mapping;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A relation's definition changed mid-stream (stored in `change_history` as `op = 'S'`);
    /// `schema` holds the new column list. Not sent to clients as-is: serving a page turns it
    /// into `must_refetch{schema_changed}` for the shapes on the table (docs/pgsync-protocol.md
    /// §10 item 4).
    Schema,
}

impl ChangeOp {
    /// The `op` code stored in `change_history`.
    pub fn code(self) -> char {
        match self {
            ChangeOp::Insert => 'I',
            ChangeOp::Update => 'U',
            ChangeOp::Delete => 'D',
            ChangeOp::Truncate => 'T',
            ChangeOp::Schema => 'S',
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub seq: u32,
    /// `schema.table`.
    pub table: String,
    pub op: ChangeOp,
    /// Key after the change (I/U), or of the deleted row (D). `None` for T/S.
    pub key: Option<Row>,
    /// Key before an update, only when it differs from `key`.
    pub old_key: Option<Row>,
    /// I: full row. U: sent columns (patch). D/T/S: `None`.
    pub row: Option<Row>,
    /// Old row image, only under REPLICA IDENTITY FULL (needed to detect moves out of a shape).
    pub old: Option<Row>,
    /// U: columns left out of `row` because they were unchanged TOAST.
    pub unchanged: Vec<String>,
    /// S: the new column list.
    pub schema: Option<Vec<ColumnSchema>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    pub xid: u32,
    pub commit_lsn: Lsn,
    /// Acknowledge the slot with this once the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    /// Replication origin, if the transaction was replayed from elsewhere.
    pub origin: Option<String>,
    pub changes: Vec<Change>,
    /// Transactional `pg_logical_emit_message` payloads, in order.
    pub messages: Vec<DecodingMessage>,
}

impl Transaction {
    /// Position just after the last change: what a client acks after applying this transaction.
    pub fn end_position(&self) -> Position {
        match self.changes.last() {
            Some(c) => Position::new(self.commit_lsn, c.seq),
            None => Position::new(self.commit_lsn, 0),
        }
    }

    /// The client view of this whole transaction (schema markers are left to the session).
    pub fn to_wire(&self) -> WireTransaction {
        WireTransaction {
            lsn: self.commit_lsn,
            xid: self.xid.to_string(),
            commit_time: pg_time::to_rfc3339(self.commit_time),
            last: true,
            ops: self.changes.iter().filter_map(Change::to_wire).collect(),
        }
    }
}

impl Change {
    pub fn to_wire(&self) -> Option<WireOp> {
        let table = self.table.clone();
        let raw = |r: &Option<Row>| r.as_ref().map(RawRow::from_row);
        let key = raw(&self.key).unwrap_or_default();
        let seq = self.seq;
        Some(match self.op {
            ChangeOp::Insert => WireOp::Insert { seq, table, key, row: raw(&self.row).unwrap_or_default() },
            ChangeOp::Update => WireOp::Update {
                seq,
                table,
                key,
                old_key: raw(&self.old_key),
                row: raw(&self.row).unwrap_or_default(),
                unchanged: self.unchanged.clone(),
            },
            ChangeOp::Delete => WireOp::Delete { seq, table, key },
            ChangeOp::Truncate => WireOp::Truncate { seq, table },
            ChangeOp::Schema => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Assembled {
    Transaction(Transaction),
    /// A non-transactional logical message; it belongs to no transaction.
    Message(DecodingMessage),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("{0} outside a transaction")]
    NotInTransaction(&'static str),
    #[error("Begin of xid {new} while xid {open} is still open")]
    NestedBegin { open: u32, new: u32 },
    #[error("Commit LSN {commit} does not match Begin final LSN {begin}")]
    CommitLsnMismatch { begin: Lsn, commit: Lsn },
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(Oid),
    #[error("{table}: tuple has {got} columns, relation has {expected}")]
    ColumnCountMismatch { table: String, expected: usize, got: usize },
    #[error("{table}.{column}: binary-format columns are not supported")]
    BinaryColumn { table: String, column: String },
    #[error("{table}.{column}: value is not valid UTF-8")]
    InvalidUtf8 { table: String, column: String },
    #[error("{table}: key column {column} has no value")]
    MissingKeyValue { table: String, column: String },
    #[error("streamed (in-progress) transactions are not supported; do not enable `streaming`")]
    StreamingUnsupported,
    #[error("transaction has more than u32::MAX changes")]
    TooManyChanges,
}

#[derive(Debug)]
struct OpenTxn {
    xid: u32,
    final_lsn: Lsn,
    commit_time: PgTimestamp,
    origin: Option<String>,
    changes: Vec<Change>,
    /// Changes already handed out by [`TransactionAssembler::drain_open`].
    drained: usize,
    messages: Vec<DecodingMessage>,
}

impl OpenTxn {
    fn next_seq(&self) -> Result<u32, AssembleError> {
        u32::try_from(self.drained + self.changes.len()).map_err(|_| AssembleError::TooManyChanges)
    }
}

/// The changes of a still-open transaction taken out early (see
/// [`TransactionAssembler::drain_open`]). Its rows must stay invisible to clients until the
/// transaction's Commit arrives: the replicator writes them without moving the watermark.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialTransaction {
    pub xid: u32,
    /// Begin.final_lsn, which is the commit LSN of the transaction.
    pub commit_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub changes: Vec<Change>,
}

#[derive(Debug, Default)]
pub struct TransactionAssembler {
    relations: RelationCache,
    key_overrides: HashMap<String, Vec<String>>,
    /// Value mappings of non-builtin column types (domains, enums, arrays), resolved from the
    /// catalog by the replicator before it pushes the Relation that uses them.
    types: value_mapping::TypeMap,
    open: Option<OpenTxn>,
}

impl TransactionAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Use these columns as the key of `schema.table` instead of the replica-identity flags.
    pub fn set_key_columns(&mut self, table: impl Into<String>, columns: Vec<String>) {
        self.key_overrides.insert(table.into(), columns);
    }

    pub fn relations(&self) -> &RelationCache {
        &self.relations
    }

    /// Whether values of this type can be mapped without asking the catalog.
    pub fn knows_type(&self, oid: Oid) -> bool {
        self.types.knows(oid)
    }

    /// Map values of `oid` with `mapping` (see [`value_mapping::resolve`]). Types never set map
    /// as their builtin mapping, or as text.
    pub fn set_type_mapping(&mut self, oid: Oid, mapping: value_mapping::Mapping) {
        self.types.insert(oid, mapping);
    }

    /// Drop a half-received transaction. Call when the replication connection is lost: the
    /// server resends the whole transaction after reconnecting. The relation cache is kept
    /// because the server re-announces relations on the new connection anyway.
    pub fn reset(&mut self) {
        self.open = None;
    }

    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Number of changes buffered for the open transaction (not counting drained ones).
    pub fn open_len(&self) -> usize {
        self.open.as_ref().map_or(0, |o| o.changes.len())
    }

    /// Take the buffered changes of the open transaction, so a transaction bigger than memory
    /// should hold can be written in chunks. Seq numbering continues across drains, and the
    /// final [`Transaction`] holds only the changes after the last drain.
    pub fn drain_open(&mut self) -> Option<PartialTransaction> {
        let open = self.open.as_mut()?;
        let changes = std::mem::take(&mut open.changes);
        open.drained += changes.len();
        Some(PartialTransaction { xid: open.xid, commit_lsn: open.final_lsn, commit_time: open.commit_time, changes })
    }

    pub fn push(&mut self, msg: LogicalMessage) -> Result<Option<Assembled>, AssembleError> {
        match msg {
            LogicalMessage::Begin(b) => {
                if let Some(open) = &self.open {
                    return Err(AssembleError::NestedBegin { open: open.xid, new: b.xid });
                }
                self.open = Some(OpenTxn {
                    xid: b.xid,
                    final_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                    origin: None,
                    changes: Vec::new(),
                    drained: 0,
                    messages: Vec::new(),
                });
                Ok(None)
            }
            LogicalMessage::Commit(c) => {
                let open = self.open.as_ref().ok_or(AssembleError::NotInTransaction("Commit"))?;
                // Begin.final_lsn is the commit LSN; rows may already have been keyed by it, so
                // a mismatch means the stream is not what we think it is.
                if open.final_lsn != c.commit_lsn {
                    return Err(AssembleError::CommitLsnMismatch { begin: open.final_lsn, commit: c.commit_lsn });
                }
                let open = self.open.take().ok_or(AssembleError::NotInTransaction("Commit"))?;
                Ok(Some(Assembled::Transaction(Transaction {
                    xid: open.xid,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                    origin: open.origin,
                    changes: open.changes,
                    messages: open.messages,
                })))
            }
            LogicalMessage::Origin(o) => {
                let open = self.open.as_mut().ok_or(AssembleError::NotInTransaction("Origin"))?;
                open.origin = Some(o.name);
                Ok(None)
            }
            LogicalMessage::Relation(r) => {
                let id = r.id;
                let update = self.relations.apply(r);
                if let (RelationUpdate::Changed { .. }, Some(open)) = (update, self.open.as_mut()) {
                    if let Some(rel) = self.relations.get(id) {
                        let seq = open.next_seq()?;
                        let schema = rel
                            .columns
                            .iter()
                            .map(|c| ColumnSchema {
                                name: c.name.clone(),
                                type_name: value_mapping::type_name(c.type_oid, &self.relations),
                            })
                            .collect();
                        open.changes.push(Change {
                            seq,
                            table: qualified(rel),
                            op: ChangeOp::Schema,
                            key: None,
                            old_key: None,
                            row: None,
                            old: None,
                            unchanged: Vec::new(),
                            schema: Some(schema),
                        });
                    }
                }
                Ok(None)
            }
            LogicalMessage::Type(t) => {
                self.relations.apply_type(t);
                Ok(None)
            }
            LogicalMessage::Insert(i) => {
                let change = self.row_change(i.relation_id, |a, rel, seq| {
                    let (row, _) = a.tuple_to_row(rel, &i.new, None)?;
                    let key = a.key_of(rel, &row, None)?;
                    Ok(Change {
                        seq,
                        table: qualified(rel),
                        op: ChangeOp::Insert,
                        key: Some(key),
                        old_key: None,
                        row: Some(row),
                        old: None,
                        unchanged: Vec::new(),
                        schema: None,
                    })
                })?;
                self.push_change(change)
            }
            LogicalMessage::Update(u) => {
                let change = self.row_change(u.relation_id, |a, rel, seq| {
                    let (old_row, full_old) = match &u.old {
                        Some(OldTuple::Key(t)) => (Some(a.tuple_to_row(rel, t, None)?.0), None),
                        Some(OldTuple::Full(t)) => {
                            let r = a.tuple_to_row(rel, t, None)?.0;
                            (Some(r.clone()), Some(r))
                        }
                        None => (None, None),
                    };
                    let (row, unchanged) = a.tuple_to_row(rel, &u.new, full_old.as_ref())?;
                    let key = a.key_of(rel, &row, old_row.as_ref())?;
                    let old_key = match &old_row {
                        Some(old) => {
                            let k = a.key_of(rel, old, None)?;
                            (k != key).then_some(k)
                        }
                        None => None,
                    };
                    Ok(Change {
                        seq,
                        table: qualified(rel),
                        op: ChangeOp::Update,
                        key: Some(key),
                        old_key,
                        row: Some(row),
                        old: full_old,
                        unchanged,
                        schema: None,
                    })
                })?;
                self.push_change(change)
            }
            LogicalMessage::Delete(d) => {
                let change = self.row_change(d.relation_id, |a, rel, seq| {
                    let (tuple, is_full) = match &d.old {
                        OldTuple::Key(t) => (t, false),
                        OldTuple::Full(t) => (t, true),
                    };
                    let (old_row, _) = a.tuple_to_row(rel, tuple, None)?;
                    let key = a.key_of(rel, &old_row, None)?;
                    Ok(Change {
                        seq,
                        table: qualified(rel),
                        op: ChangeOp::Delete,
                        key: Some(key),
                        old_key: None,
                        row: None,
                        old: is_full.then_some(old_row),
                        unchanged: Vec::new(),
                        schema: None,
                    })
                })?;
                self.push_change(change)
            }
            LogicalMessage::Truncate(t) => {
                if self.open.is_none() {
                    return Err(AssembleError::NotInTransaction("Truncate"));
                }
                // Resolve every relation before mutating, so an error leaves the txn untouched.
                let tables = t
                    .relation_ids
                    .iter()
                    .map(|id| self.relations.get(*id).map(qualified).ok_or(AssembleError::UnknownRelation(*id)))
                    .collect::<Result<Vec<_>, _>>()?;
                let open = self.open.as_mut().ok_or(AssembleError::NotInTransaction("Truncate"))?;
                for table in tables {
                    let seq = open.next_seq()?;
                    open.changes.push(Change {
                        seq,
                        table,
                        op: ChangeOp::Truncate,
                        key: None,
                        old_key: None,
                        row: None,
                        old: None,
                        unchanged: Vec::new(),
                        schema: None,
                    });
                }
                Ok(None)
            }
            LogicalMessage::Message(m) => {
                if !m.transactional {
                    return Ok(Some(Assembled::Message(m)));
                }
                let open = self.open.as_mut().ok_or(AssembleError::NotInTransaction("transactional Message"))?;
                open.messages.push(m);
                Ok(None)
            }
            LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_) => Err(AssembleError::StreamingUnsupported),
        }
    }

    fn row_change(
        &self,
        relation_id: Oid,
        build: impl FnOnce(&Self, &Relation, u32) -> Result<Change, AssembleError>,
    ) -> Result<Change, AssembleError> {
        let open = self.open.as_ref().ok_or(AssembleError::NotInTransaction("row change"))?;
        let rel = self.relations.get(relation_id).ok_or(AssembleError::UnknownRelation(relation_id))?;
        build(self, rel, open.next_seq()?)
    }

    fn push_change(&mut self, change: Change) -> Result<Option<Assembled>, AssembleError> {
        let open = self.open.as_mut().ok_or(AssembleError::NotInTransaction("row change"))?;
        open.changes.push(change);
        Ok(None)
    }

    /// Map a tuple to a row. Unchanged-TOAST columns are filled from `fill_from` when it has
    /// them, otherwise left out and returned in the second list.
    fn tuple_to_row(
        &self,
        rel: &Relation,
        tuple: &TupleData,
        fill_from: Option<&Row>,
    ) -> Result<(Row, Vec<String>), AssembleError> {
        if tuple.columns.len() != rel.columns.len() {
            return Err(AssembleError::ColumnCountMismatch {
                table: qualified(rel),
                expected: rel.columns.len(),
                got: tuple.columns.len(),
            });
        }
        let mut row = Row::new();
        let mut unchanged = Vec::new();
        for (col, value) in rel.columns.iter().zip(&tuple.columns) {
            match value {
                ColumnValue::Null => {
                    row.insert(col.name.clone(), Value::Null);
                }
                ColumnValue::Text(bytes) => {
                    let text = std::str::from_utf8(bytes)
                        .map_err(|_| AssembleError::InvalidUtf8 { table: qualified(rel), column: col.name.clone() })?;
                    row.insert(col.name.clone(), value_mapping::map_text(&self.types.get(col.type_oid), text));
                }
                ColumnValue::Binary(_) => {
                    return Err(AssembleError::BinaryColumn { table: qualified(rel), column: col.name.clone() })
                }
                ColumnValue::UnchangedToast => match fill_from.and_then(|old| old.get(&col.name)) {
                    Some(v) => {
                        row.insert(col.name.clone(), v.clone());
                    }
                    None => unchanged.push(col.name.clone()),
                },
            }
        }
        Ok((row, unchanged))
    }

    fn key_columns<'r>(&'r self, rel: &'r Relation) -> Vec<&'r str> {
        match self.key_overrides.get(&qualified(rel)) {
            Some(cols) => cols.iter().map(String::as_str).collect(),
            None => rel.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect(),
        }
    }

    /// Key from `row`, falling back to `fallback` (the old key tuple) for key columns the new
    /// tuple did not carry (an unchanged-TOAST key column).
    fn key_of(&self, rel: &Relation, row: &Row, fallback: Option<&Row>) -> Result<Row, AssembleError> {
        let mut key = Row::new();
        for name in self.key_columns(rel) {
            let v = row
                .get(name)
                .or_else(|| fallback.and_then(|f| f.get(name)))
                .ok_or_else(|| AssembleError::MissingKeyValue { table: qualified(rel), column: name.to_owned() })?;
            key.insert(name.to_owned(), v.clone());
        }
        Ok(key)
    }
}

fn qualified(rel: &Relation) -> String {
    format!("{}.{}", rel.namespace, rel.name)
}

#[cfg(test)]
#[path = "transaction_assembler_tests.rs"]
mod tests;
