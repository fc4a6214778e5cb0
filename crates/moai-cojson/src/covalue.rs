//! The verified in-memory state of one CoValue: its header and, per session,
//! the transactions (as received), the running hash, the last signature and
//! the checkpoint signatures that let it be sent in pieces.
//!
//! State only changes through [`CoValueState::apply`] with a verdict from
//! [`crate::verify`], so everything held here has been verified.

use crate::crypto::Signature;
use crate::header::Header;
use crate::ids::SessionId;
use crate::known_state::KnownState;
use crate::transaction_hash::SessionHasher;
use crate::verify::ContentVerdict;
use serde_json::Value;
use std::collections::BTreeMap;

/// Transaction payload after which the incoming signature is kept as a
/// checkpoint (`TRANSACTION_CONFIG.MAX_RECOMMENDED_TX_SIZE`).
pub const CHECKPOINT_BYTES: usize = 100 * 1024;

#[derive(Debug, Clone)]
pub struct SessionLog {
    pub transactions: Vec<Value>,
    pub hasher: SessionHasher,
    pub last_signature: Signature,
    /// `signatureAfter`: transaction count → signature valid at that count.
    /// Content may only be split at these counts (and at the end).
    pub signature_after: BTreeMap<u64, Signature>,
    pub bytes_since_checkpoint: usize,
}

impl SessionLog {
    pub fn count(&self) -> u64 {
        self.hasher.count()
    }
}

#[derive(Debug, Clone)]
pub struct CoValueState {
    pub header: Header,
    pub sessions: BTreeMap<SessionId, SessionLog>,
    pub deleted: bool,
}

/// What an [`CoValueState::apply`] actually committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub header_installed: bool,
    /// `(session, count before, count after)`.
    pub sessions: Vec<(SessionId, u64, u64)>,
    /// Sessions whose verdict no longer matched the state (stale verdict).
    pub stale: Vec<SessionId>,
    pub deleted_now: bool,
    /// Sessions dropped by that delete (their stored content is erased too).
    pub erased: Vec<SessionId>,
}

impl CoValueState {
    pub fn new(header: Header) -> Self {
        CoValueState { header, sessions: BTreeMap::new(), deleted: false }
    }

    pub fn known_state(&self) -> KnownState {
        KnownState {
            id: self.header.id.clone(),
            header: true,
            sessions: self.sessions.iter().map(|(s, l)| (s.clone(), l.count())).collect(),
        }
    }

    /// Commits a verdict into `slot`, creating the CoValue from the verdict's
    /// header if it was unknown. A verdict for a different CoValue, or a
    /// session whose count moved since verification, is not applied.
    pub fn apply(slot: &mut Option<CoValueState>, mut verdict: ContentVerdict) -> Applied {
        let mut applied = Applied::default();
        if slot.is_none() {
            match verdict.new_header.take() {
                Some(h) if h.id == verdict.id => {
                    *slot = Some(CoValueState::new(h));
                    applied.header_installed = true;
                }
                _ => return applied,
            }
        }
        let Some(state) = slot.as_mut() else { return applied };
        let rest = state.apply_verdict(verdict);
        applied.sessions = rest.sessions;
        applied.stale = rest.stale;
        applied.deleted_now = rest.deleted_now;
        applied.erased = rest.erased;
        applied
    }

    /// Commits a verdict into this (existing) CoValue; see [`Self::apply`].
    /// A verdict's header is ignored here: the CoValue already has one.
    pub fn apply_verdict(&mut self, verdict: ContentVerdict) -> Applied {
        let mut applied = Applied::default();
        let state = self;
        if state.header.id != verdict.id {
            return applied;
        }
        for vs in verdict.accepted {
            let current = state.sessions.get(&vs.session).map_or(0, SessionLog::count);
            if current != vs.after || (state.deleted && !vs.session.is_delete_session()) {
                applied.stale.push(vs.session);
                continue;
            }
            let payload: usize = vs.canonical.iter().map(|c| c.payload_len).sum();
            let new_count = vs.hasher.count();
            let log = state.sessions.entry(vs.session.clone()).or_insert_with(|| SessionLog {
                transactions: Vec::new(),
                hasher: SessionHasher::new(),
                last_signature: vs.signature,
                signature_after: BTreeMap::new(),
                bytes_since_checkpoint: 0,
            });
            log.transactions.extend(vs.transactions);
            log.hasher = vs.hasher;
            log.last_signature = vs.signature;
            log.bytes_since_checkpoint += payload;
            if log.bytes_since_checkpoint > CHECKPOINT_BYTES {
                log.signature_after.insert(new_count, vs.signature);
                log.bytes_since_checkpoint = 0;
            }
            applied.sessions.push((vs.session.clone(), current, new_count));
            if vs.is_delete {
                state.deleted = true;
                applied.deleted_now = true;
                applied.erased.extend(state.sessions.keys().filter(|s| !s.is_delete_session()).cloned());
                state.sessions.retain(|s, _| s.is_delete_session());
                applied.sessions.retain(|(s, _, _)| s.is_delete_session());
            }
        }
        applied
    }
}
