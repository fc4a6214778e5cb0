//! The CoValue store: the storage contract of the CoJSON engine.
//!
//! A CoValue is a header plus, per session, an append-only log of signed transactions. The relay
//! verifies everything before it asks for a write, so storage only has to keep what it is given,
//! exactly, and refuse anything that would leave a gap in a log. Shape of the contract:
//!
//! * [`CoValueStore::load_covalue`]: everything needed to rebuild a CoValue in memory (header,
//!   per session the transactions, the last signature and the checkpoint signatures, the
//!   deleted flag).
//! * [`CoValueStore::append_covalues`]: several appends in one durable commit, each atomic on its
//!   own. An append whose `after` differs from the stored count of its session is refused with
//!   [`AppendError::CountMismatch`] and changes nothing: a log with a gap could never be served
//!   (signatures are only valid at the index they were made for).
//! * [`CoValueStore::known_states`]: header present + per-session counts, without reading any
//!   transaction — what a reconnect storm asks for (`reconcile`, lazy `load`).
//!
//! Dependency rule: these are storage-side records (strings, JSON text, counts), not engine types;
//! the engine converts. JSON text is stored exactly as the engine serialised it, so every field
//! value survives as received.

use async_trait::async_trait;
use thiserror::Error;

use crate::StorageError;

/// One session of a stored CoValue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub session: String,
    /// The transactions in order, each as JSON text.
    pub transactions: Vec<String>,
    /// The signature valid after the last transaction (`signature_z…`).
    pub last_signature: String,
    /// Checkpoints (`signatureAfter`): `(transaction count, signature valid at that count)`,
    /// ascending by count.
    pub checkpoints: Vec<(u64, String)>,
}

/// A stored CoValue as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoValueRecord {
    /// The header as JSON text.
    pub header: String,
    /// Sessions in the order they were first stored.
    pub sessions: Vec<SessionRecord>,
    pub deleted: bool,
}

/// How an append moves the per-session "payload bytes since the last signature checkpoint"
/// counter (cojson's `bytesSinceLastSignature`). Storage keeps it so a later lazy loader can
/// continue checkpointing without reading the transactions; it never affects correctness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BytesSinceSignature {
    /// No checkpoint inside this append: add this many payload bytes.
    Add(u64),
    /// The append contains a checkpoint: the counter becomes this value.
    Reset(u64),
}

/// New transactions of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionAppendRecord {
    pub session: String,
    /// The stored count this append starts at; anything else is refused.
    pub after: u64,
    /// JSON text of each new transaction.
    pub transactions: Vec<String>,
    /// The signature valid after the last of `transactions`.
    pub last_signature: String,
    /// New checkpoints inside this append: `(transaction count, signature)`.
    pub checkpoints: Vec<(u64, String)>,
    pub bytes_since_signature: BytesSinceSignature,
}

/// One atomic write to one CoValue: all of it is stored, or none of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoValueAppend {
    pub id: String,
    /// The header as JSON text, when this write creates the CoValue. If the CoValue is already
    /// stored the stored header is kept (a header is a pure function of the id).
    pub header: Option<String>,
    pub sessions: Vec<SessionAppendRecord>,
    /// Marks the CoValue deleted (never cleared). Which sessions a deleted CoValue still serves is
    /// the engine's rule, carried out through `erase_sessions`.
    pub deleted: bool,
    /// Sessions whose stored rows (transactions, signatures, the session) this same write
    /// removes, e.g. the content of a CoValue its owner deleted. Applied after `sessions`.
    pub erase_sessions: Vec<String>,
}

/// What is stored of a CoValue, without its transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKnownState {
    /// Always true for a stored CoValue (a row exists only with its header); kept so the record
    /// maps one to one onto a cojson known state.
    pub header: bool,
    /// `(session, transaction count)` in the order the sessions were first stored.
    pub sessions: Vec<(String, u64)>,
    pub deleted: bool,
}

/// Why an append was refused. Nothing of a refused append is stored.
#[derive(Debug, Error)]
pub enum AppendError {
    /// The append does not continue the stored log: storing it would leave a gap (or overwrite).
    #[error("session {session} of {id}: append starts at {after} but {stored} transactions are stored")]
    CountMismatch { id: String, session: String, after: u64, stored: u64 },
    /// The CoValue is not stored and the append carries no header to create it.
    #[error("{id} is not stored and the append has no header")]
    MissingHeader { id: String },
    /// An append must add at least one transaction to each session it names.
    #[error("session {session} of {id}: empty append")]
    EmptySession { id: String, session: String },
    /// A checkpoint must name a count inside the append (`after < count <= after + len`).
    #[error("session {session} of {id}: checkpoint at {count} is outside the append")]
    CheckpointOutOfRange { id: String, session: String, count: u64 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[async_trait]
pub trait CoValueStore: Send + Sync + 'static {
    /// Reads a whole CoValue. `None` if it is not stored.
    async fn load_covalue(&self, id: &str) -> Result<Option<CoValueRecord>, StorageError>;

    /// Applies `appends` in order within one durable commit; each one is atomic on its own and
    /// gets its own result (same length and order as `appends`). When a result is `Ok`, that
    /// append is durable. Appends to the same CoValue later in the list see the earlier ones.
    async fn append_covalues(&self, appends: Vec<CoValueAppend>) -> Vec<Result<(), AppendError>>;

    /// One append; see [`CoValueStore::append_covalues`].
    async fn append_covalue(&self, append: CoValueAppend) -> Result<(), AppendError> {
        let mut results = self.append_covalues(vec![append]).await;
        // A backend that returns fewer results than appends is a bug; report it as a failure.
        results.pop().unwrap_or_else(|| Err(StorageError::CommitFailed("no result for the append".into()).into()))
    }

    /// Known states of many CoValues in one read, without loading transactions. Same length and
    /// order as `ids`; `None` for a CoValue that is not stored.
    async fn known_states(&self, ids: Vec<String>) -> Result<Vec<Option<StoredKnownState>>, StorageError>;
}

/// Checks an append against the stored counts of its CoValue (`stored(session)`), session by
/// session, counting earlier sessions of the same append. Shared by the backends so they refuse
/// exactly the same things. Returns nothing when the append may be applied.
pub(crate) fn check_append(
    append: &CoValueAppend,
    exists: bool,
    mut stored: impl FnMut(&str) -> Result<u64, StorageError>,
) -> Result<(), AppendError> {
    if !exists && append.header.is_none() {
        return Err(AppendError::MissingHeader { id: append.id.clone() });
    }
    let mut seen: Vec<(&str, u64)> = Vec::new();
    for s in &append.sessions {
        if s.transactions.is_empty() {
            return Err(AppendError::EmptySession { id: append.id.clone(), session: s.session.clone() });
        }
        let current = match seen.iter().find(|(name, _)| *name == s.session) {
            Some((_, count)) => *count,
            None if exists => stored(&s.session)?,
            None => 0,
        };
        if current != s.after {
            return Err(AppendError::CountMismatch {
                id: append.id.clone(),
                session: s.session.clone(),
                after: s.after,
                stored: current,
            });
        }
        let next = s.after.saturating_add(s.transactions.len() as u64);
        if let Some(&(count, _)) = s.checkpoints.iter().find(|(c, _)| *c <= s.after || *c > next) {
            return Err(AppendError::CheckpointOutOfRange { id: append.id.clone(), session: s.session.clone(), count });
        }
        match seen.iter_mut().find(|(name, _)| *name == s.session) {
            Some(entry) => entry.1 = next,
            None => seen.push((&s.session, next)),
        }
    }
    Ok(())
}
