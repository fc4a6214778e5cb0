//! Verification of incoming `content` before anything is stored or forwarded.
//!
//! Pure: [`verify_content`] reads the current state and returns a
//! [`ContentVerdict`]; nothing changes until the caller applies it
//! ([`crate::covalue::CoValueState::apply`]). Each session is staged on a
//! *clone* of its hasher, so a rejected batch leaves that session exactly as
//! it was — unlike cojson-core 0.20.19, whose leftover staged transactions
//! poison every later batch of the session (docs/protocols/cojson.md §10.4).
//!
//! Per session, following cojson's `handleNewContent`:
//! * `after` beyond our count is a gap (answer with a correction);
//! * the overlap `count - after` is dropped, nothing new is a no-op;
//! * delete-session rules; canonical transactions; chain hash; Ed25519
//!   against the author's signer — the agent's own `signer_z…`, or for an
//!   account author the `initialAdmin` agent of that account's header.
//!
//! Sessions are independent, as in cojson: a bad session is rejected while
//! valid sessions of the same message are accepted. The caller decides how to
//! treat the peer afterwards (cojson marks the CoValue errored for it).

use crate::covalue::CoValueState;
use crate::crypto::{agent_signer_id, CryptoError, Signature, SignerId};
use crate::header::{Header, HeaderError};
use crate::ids::{CoId, IdError, SessionAuthor, SessionId};
use crate::message::ContentMessage;
use crate::transaction_hash::{canonical_transaction, CanonicalTransaction, Privacy, SessionHasher, TransactionError};
use serde_json::Value;
use std::collections::HashMap;
use thiserror::Error;

/// Why one session's batch was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    #[error("bad session id: {0}")]
    SessionId(#[from] IdError),
    #[error("transaction {index}: {error}")]
    Transaction { index: u64, error: TransactionError },
    #[error("lastSignature: {0}")]
    SignatureEncoding(CryptoError),
    #[error("signer: {0}")]
    Signer(CryptoError),
    #[error("signature does not match the session hash")]
    BadSignature,
    /// The author's account header is not known here yet. cojson requests it
    /// from the sender and retries; a relay should do the same.
    #[error("author account {0} is not known")]
    UnknownAccount(CoId),
    #[error("author {0} is not an account")]
    NotAnAccount(CoId),
    #[error("invalid delete transaction: {0}")]
    InvalidDelete(&'static str),
    #[error("groups and accounts cannot be deleted")]
    NotDeletable,
    #[error("delete not permitted: {0}")]
    DeleteNotPermitted(&'static str),
}

/// Why a whole content message could not be considered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ContentError {
    /// Unknown CoValue and no header: answer `known {isCorrection, header:false}`.
    #[error("unknown CoValue and the message has no header")]
    HeaderMissing,
    /// cojson logs "Header validation failed" and answers nothing.
    #[error("invalid header: {0}")]
    Header(#[from] HeaderError),
}

/// Read access to headers of other CoValues (author accounts).
pub trait HeaderLookup {
    fn header(&self, id: &CoId) -> Option<&Header>;
}

impl HeaderLookup for HashMap<CoId, Header> {
    fn header(&self, id: &CoId) -> Option<&Header> {
        self.get(id)
    }
}

/// The only role check cojson makes at ingest: is the author of a delete an
/// admin of the owning group at `madeAt`. That needs the group's transactions,
/// which this module does not see: the relay answers it from the CoValues in
/// memory with [`crate::group_roles`].
pub trait DeletePolicy {
    fn author_is_admin(&self, owner_group: &CoId, author: &SessionAuthor, made_at: u64) -> bool;
}

/// Rejects every delete (for verifying without any group state, in tests).
#[cfg(test)]
pub struct DenyDeletes;

#[cfg(test)]
impl DeletePolicy for DenyDeletes {
    fn author_is_admin(&self, _: &CoId, _: &SessionAuthor, _: u64) -> bool {
        false
    }
}

/// A verified, not yet applied, batch of one session.
#[derive(Debug, Clone)]
pub struct VerifiedSession {
    pub session: SessionId,
    /// Our count when verified; the batch applies only on top of exactly that.
    pub after: u64,
    /// The new transactions (overlap removed), as received.
    pub transactions: Vec<Value>,
    pub canonical: Vec<CanonicalTransaction>,
    /// Hash state after the batch.
    pub hasher: SessionHasher,
    pub signature: Signature,
    /// A valid delete marker: applying it deletes the CoValue.
    pub is_delete: bool,
}

#[derive(Debug, Clone)]
pub struct ContentVerdict {
    pub id: CoId,
    /// The header to install, when the CoValue was not known before.
    pub new_header: Option<Header>,
    pub accepted: Vec<VerifiedSession>,
    /// Some session started beyond our count: reply with a correction.
    pub gap: bool,
    pub rejected: Vec<(String, VerifyError)>,
    /// Non-delete sessions ignored because the CoValue is deleted.
    pub skipped_deleted: Vec<String>,
}

impl ContentVerdict {
    /// Whether anything would be stored (a new header or transactions).
    #[cfg(test)]
    pub fn has_new_content(&self) -> bool {
        self.new_header.is_some() || !self.accepted.is_empty()
    }
}

fn resolve_signer(author: &SessionAuthor, this: &Header, headers: &dyn HeaderLookup) -> Result<SignerId, VerifyError> {
    let agent = match author {
        SessionAuthor::Agent(agent) => agent.clone(),
        SessionAuthor::Account(account) => {
            let header = if account == &this.id { Some(this) } else { headers.header(account) };
            let header = header.ok_or_else(|| VerifyError::UnknownAccount(account.clone()))?;
            header.account_agent().ok_or_else(|| VerifyError::NotAnAccount(account.clone()))?
        }
    };
    agent_signer_id(&agent).map_err(VerifyError::Signer)
}

/// `#getDeleteMarker`: a trusting transaction whose `meta` parses to an
/// object with a string `deleted`.
fn delete_marker(tx: &CanonicalTransaction) -> Option<String> {
    if tx.privacy != Privacy::Trusting {
        return None;
    }
    let meta: Value = serde_json::from_str(tx.trusting_meta.as_deref()?).ok()?;
    meta.get("deleted")?.as_str().map(str::to_string)
}

/// Delete-session rules of cojson's `#isDeleteTransaction`, checked before
/// the signature. Returns whether the batch is a (valid) delete.
fn check_delete(
    header: &Header,
    session: &SessionId,
    prior_count: u64,
    txs: &[CanonicalTransaction],
    deletes: &dyn DeletePolicy,
) -> Result<bool, VerifyError> {
    if prior_count > 0 || txs.len() > 1 {
        return Err(VerifyError::InvalidDelete("a delete session holds exactly one transaction"));
    }
    let Some(first) = txs.first() else { return Ok(false) };
    let marker = delete_marker(first);
    if let Some(deleted) = &marker {
        if deleted != header.id.as_str() {
            return Err(VerifyError::InvalidDelete("delete marker names another CoValue"));
        }
    }
    if header.is_group_or_account() {
        return Err(VerifyError::NotDeletable);
    }
    // cojson accepts a delete-session transaction without a marker as an
    // ordinary transaction; only a marker triggers the permission check.
    if marker.is_none() {
        return Ok(false);
    }
    let Some(group) = header.owner_group() else {
        return Err(VerifyError::DeleteNotPermitted("CoValue is not owned by a group"));
    };
    if !deletes.author_is_admin(group, &session.author(), first.made_at) {
        return Err(VerifyError::DeleteNotPermitted("author is not an admin of the owner group"));
    }
    Ok(true)
}

/// Verifies a content message against the current state of its CoValue
/// (`None` if unknown) without changing anything.
pub fn verify_content(
    existing: Option<&CoValueState>,
    msg: &ContentMessage,
    headers: &dyn HeaderLookup,
    deletes: &dyn DeletePolicy,
) -> Result<ContentVerdict, ContentError> {
    let (header, new_header) = match existing {
        Some(state) => (state.header.clone(), None),
        None => {
            let raw = msg.header.as_ref().ok_or(ContentError::HeaderMissing)?;
            let h = Header::validate(&msg.id, raw)?;
            (h.clone(), Some(h))
        }
    };
    let mut verdict = ContentVerdict {
        id: msg.id.clone(),
        new_header,
        accepted: Vec::new(),
        gap: false,
        rejected: Vec::new(),
        skipped_deleted: Vec::new(),
    };
    let mut deleted = existing.is_some_and(|s| s.deleted);
    let empty = SessionHasher::new();

    for (session_key, entry) in &msg.new {
        let session = match SessionId::parse(session_key) {
            Ok(s) => s,
            Err(e) => {
                verdict.rejected.push((session_key.clone(), e.into()));
                continue;
            }
        };
        if deleted && !session.is_delete_session() {
            verdict.skipped_deleted.push(session_key.clone());
            continue;
        }
        let prior = existing.and_then(|s| s.sessions.get(&session)).map(|l| &l.hasher).unwrap_or(&empty);
        let count = prior.count();
        if entry.after > count {
            verdict.gap = true;
            continue;
        }
        // usize::try_from only fails on 16-bit targets; treat as "all known".
        let skip = usize::try_from(count - entry.after).unwrap_or(usize::MAX);
        let new_txs = entry.new_transactions.get(skip..).unwrap_or(&[]);
        if new_txs.is_empty() {
            continue;
        }
        match verify_session_batch(&header, &session, prior, new_txs, &entry.last_signature, headers, deletes) {
            Ok(vs) => {
                if vs.is_delete {
                    // cojson keeps only the delete session of a deleting message.
                    deleted = true;
                    verdict.accepted.retain(|a| a.session.is_delete_session());
                }
                verdict.accepted.push(vs);
            }
            Err(e) => verdict.rejected.push((session_key.clone(), e)),
        }
    }
    Ok(verdict)
}

/// Verifies `new_txs` as the continuation of a session whose committed hash
/// state is `prior`, signed with `last_signature`.
pub fn verify_session_batch(
    header: &Header,
    session: &SessionId,
    prior: &SessionHasher,
    new_txs: &[Value],
    last_signature: &str,
    headers: &dyn HeaderLookup,
    deletes: &dyn DeletePolicy,
) -> Result<VerifiedSession, VerifyError> {
    let count = prior.count();
    let canonical = new_txs
        .iter()
        .enumerate()
        .map(|(i, tx)| {
            canonical_transaction(tx).map_err(|error| VerifyError::Transaction { index: count + i as u64, error })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let is_delete =
        if session.is_delete_session() { check_delete(header, session, count, &canonical, deletes)? } else { false };
    let signer = resolve_signer(&session.author(), header, headers)?;
    let signature = Signature::parse(last_signature).map_err(VerifyError::SignatureEncoding)?;
    let mut hasher = prior.clone();
    for c in &canonical {
        hasher.update(&c.json);
    }
    if !hasher.verify(&signer, &signature) {
        return Err(VerifyError::BadSignature);
    }
    Ok(VerifiedSession {
        session: session.clone(),
        after: count,
        transactions: new_txs.to_vec(),
        canonical,
        hasher,
        signature,
        is_delete,
    })
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
