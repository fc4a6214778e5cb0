//! How much of a CoValue storage holds, with what it takes to send exactly that much: whether
//! the header is stored and, per session, the stored transaction count and the signature valid
//! at that count.
//!
//! Why: the relay never shows a peer content that a crash of the server could still lose
//! (docs/protocols/cojson.md §11.8). Content is applied in memory at once, but it is forwarded,
//! and our state announced, only up to what is durable; the rest follows when the write
//! completes. A peer can therefore never hold something it got from moai that moai forgot
//! after `kill -9`, even when the author never connects again.
//!
//! A session can only be cut where a signature is valid. Every durable count is the end of a
//! write, and every write ends where an incoming content message (which carries the signature
//! at its end) ended, so the signature for each durable count is known: it is recorded with the
//! write and kept here.

use std::collections::BTreeMap;

use crate::covalue::CoValueState;
use crate::crypto::Signature;
use crate::ids::{CoId, SessionId};
use crate::known_state::KnownState;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Durable {
    pub header: bool,
    /// Per session: the stored transaction count and the signature valid after it.
    pub sessions: BTreeMap<SessionId, (u64, Signature)>,
}

impl Durable {
    /// All of `state` (a CoValue read from storage is durable as a whole).
    pub fn all_of(state: &CoValueState) -> Durable {
        Durable {
            header: true,
            sessions: state.sessions.iter().map(|(s, log)| (s.clone(), (log.count(), log.last_signature))).collect(),
        }
    }

    /// Takes in a completed write: the header, and each session's higher count.
    pub fn merge(&mut self, written: &Durable) {
        self.header |= written.header;
        for (session, &(count, signature)) in &written.sessions {
            match self.sessions.get_mut(session) {
                Some(entry) if entry.0 >= count => {}
                Some(entry) => *entry = (count, signature),
                None => {
                    self.sessions.insert(session.clone(), (count, signature));
                }
            }
        }
    }

    /// As a known state (what acks and announcements report).
    pub fn known_state(&self, id: &CoId) -> KnownState {
        KnownState {
            id: id.clone(),
            header: self.header,
            sessions: self.sessions.iter().map(|(s, (count, _))| (s.clone(), *count)).collect(),
        }
    }
}
