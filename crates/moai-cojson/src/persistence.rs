//! The data that crosses between the relay and the storage driver.
//!
//! The relay never touches storage; it asks the driver to write
//! ([`PersistRequest`]) and to read ([`StoredCoValue`]). These types fix what
//! the driver must keep so a CoValue can be rebuilt exactly:
//! * the header as received (its key order and number text matter to no
//!   signature, but they are what cojson stores and serves);
//! * per session, the transactions as received, the last signature, and the
//!   checkpoint signatures (`signatureAfter`) — without those a large session
//!   can only be served in one piece;
//! * a deleted flag (after a valid delete only delete sessions remain).
//!
//! Hash chains are not stored: [`rebuild`] recomputes them from the
//! transactions (cheap compared with a storage read) so the relay can verify
//! later content. Stored signatures are not re-verified: storage only ever
//! receives verified content.

use crate::covalue::{CoValueState, SessionLog};
use crate::crypto::Signature;
use crate::header::{Header, HeaderError};
use crate::ids::{CoId, SessionId};
use crate::known_state::KnownState;
use crate::transaction_hash::{canonical_transaction, SessionHasher, TransactionError};
use serde_json::Value;
use std::collections::BTreeMap;
use thiserror::Error;

/// Identifies one write; the driver answers it with `Persisted(token)` once
/// the write is durable (or `PersistFailed(token)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PersistToken(pub u64);

/// New transactions of one session to append.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionAppend {
    pub session: SessionId,
    /// The stored count this append starts at. The driver must refuse (fail
    /// the whole request) if its count differs: never store a gap.
    pub after: u64,
    pub transactions: Vec<Value>,
    /// Signature valid after the last of `transactions`.
    pub last_signature: Signature,
    /// New checkpoints inside this append: transaction count → signature.
    pub checkpoints: Vec<(u64, Signature)>,
}

/// One atomic write: everything in it is durable, or none of it.
#[derive(Debug, Clone, PartialEq)]
pub struct PersistRequest {
    pub token: PersistToken,
    pub id: CoId,
    /// The header as received, when this write creates the CoValue.
    pub header: Option<Value>,
    pub sessions: Vec<SessionAppend>,
    /// Set by the write that deletes the CoValue: afterwards only delete
    /// sessions (ending in `$`) are part of it.
    pub deleted: bool,
    /// The sessions whose stored content this write erases: on delete, every
    /// session that is not a delete session. Nobody is served them again, and
    /// a user who deletes expects the data gone, not hidden (the reference
    /// server erases only with `enableDeletedCoValuesErasure`, later).
    pub erase: Vec<SessionId>,
}

/// One session as read back from storage.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    pub session: SessionId,
    pub transactions: Vec<Value>,
    pub last_signature: Signature,
    pub checkpoints: BTreeMap<u64, Signature>,
}

/// A CoValue as read back from storage.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCoValue {
    pub header: Value,
    pub sessions: Vec<StoredSession>,
    pub deleted: bool,
}

impl StoredCoValue {
    /// What this stored CoValue holds as a known state (header + per-session counts), the
    /// answer a driver gives to [`crate::relay::Action::LoadKnown`] when it holds whole
    /// CoValues anyway (tests, memory).
    pub fn stored_known(&self, id: &CoId) -> StoredKnown {
        let mut state = KnownState::empty(id.clone());
        state.header = true;
        for s in &self.sessions {
            state.raise(&s.session, s.transactions.len() as u64);
        }
        StoredKnown::Stored { state, deleted: self.deleted }
    }
}

/// The answer to a known-state read ([`crate::relay::Action::LoadKnown`]): what storage holds
/// of one CoValue, without its transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredKnown {
    /// Stored: the header and these per-session counts are durable. `deleted` as stored (the
    /// relay takes the full-load path for a deleted CoValue, whose served sessions are a rule
    /// of the engine, not of storage).
    Stored { state: KnownState, deleted: bool },
    /// Storage does not have it.
    NotStored,
    /// The read failed or the row does not decode: the relay falls back to a full `Load`
    /// (whose answer has its own failure rule).
    Unreadable,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoredError {
    #[error("stored header: {0}")]
    Header(#[from] HeaderError),
    #[error("stored session {session} transaction {index}: {error}")]
    Transaction { session: SessionId, index: usize, error: TransactionError },
    #[error("stored session {0} has no transactions")]
    EmptySession(SessionId),
    #[error("stored session {0} has a checkpoint beyond its end")]
    CheckpointBeyondEnd(SessionId),
}

/// Rebuilds the in-memory state of a stored CoValue.
pub fn rebuild(id: &CoId, stored: StoredCoValue) -> Result<CoValueState, StoredError> {
    let header = Header::validate(id, &stored.header)?;
    let mut state = CoValueState::new(header);
    state.deleted = stored.deleted;
    for s in stored.sessions {
        if s.transactions.is_empty() {
            return Err(StoredError::EmptySession(s.session));
        }
        let mut hasher = SessionHasher::new();
        let mut payloads = Vec::with_capacity(s.transactions.len());
        for (index, tx) in s.transactions.iter().enumerate() {
            let c = canonical_transaction(tx).map_err(|error| StoredError::Transaction {
                session: s.session.clone(),
                index,
                error,
            })?;
            hasher.update(&c.json);
            payloads.push(c.payload_len);
        }
        let count = hasher.count();
        if s.checkpoints.keys().any(|&c| c > count || c == 0) {
            return Err(StoredError::CheckpointBeyondEnd(s.session));
        }
        // Payload since the last checkpoint, so checkpointing continues where it stopped.
        let since = s.checkpoints.keys().next_back().map_or(0, |&c| c as usize);
        let bytes_since_checkpoint = payloads.get(since..).map_or(0, |p| p.iter().sum::<usize>());
        state.sessions.insert(
            s.session,
            SessionLog {
                transactions: s.transactions,
                hasher,
                last_signature: s.last_signature,
                signature_after: s.checkpoints,
                bytes_since_checkpoint,
            },
        );
    }
    Ok(state)
}

/// The write for what [`CoValueState::apply`] just committed: session ranges
/// `before..after` of the (already updated) state.
pub fn persist_request(
    token: PersistToken,
    state: &CoValueState,
    header_installed: bool,
    sessions: &[(SessionId, u64, u64)],
    deleted_now: bool,
    erase: &[SessionId],
) -> PersistRequest {
    let appends = sessions
        .iter()
        .filter_map(|(session, before, after)| {
            let log = state.sessions.get(session)?;
            let txs = log.transactions.get(usize::try_from(*before).ok()?..usize::try_from(*after).ok()?)?;
            Some(SessionAppend {
                session: session.clone(),
                after: *before,
                transactions: txs.to_vec(),
                last_signature: log.last_signature,
                checkpoints: log
                    .signature_after
                    .range(before.saturating_add(1)..=*after)
                    .map(|(&c, s)| (c, *s))
                    .collect(),
            })
        })
        .collect();
    PersistRequest {
        token,
        id: state.header.id.clone(),
        header: header_installed.then(|| state.header.raw.clone()),
        sessions: appends,
        deleted: deleted_now,
        erase: erase.to_vec(),
    }
}
