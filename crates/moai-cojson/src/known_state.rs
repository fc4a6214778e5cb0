//! "Known state": what a node has of one CoValue — whether it holds the header
//! and how many transactions per session.
//!
//! It is the currency of the whole protocol (`load`, `known`, acks,
//! corrections), and the relay keeps one per (peer, CoValue). The operations
//! here mirror cojson's `knownState.ts`, which is what peers assume:
//! merging takes the per-session maximum, and "what does the peer lack" is
//! every session where we are ahead.

use crate::ids::{CoId, SessionId};
use std::collections::BTreeMap;

/// Per-session transaction counts.
pub type SessionCounts = BTreeMap<SessionId, u64>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownState {
    pub id: CoId,
    pub header: bool,
    pub sessions: SessionCounts,
}

/// A range of one session that a peer lacks: transactions `from..to`
/// (`from` is what the peer has, `to` what we have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionGap {
    pub session: SessionId,
    pub from: u64,
    pub to: u64,
}

/// What we would have to send a peer to bring it up to our state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Missing {
    pub header: bool,
    pub sessions: Vec<SessionGap>,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        !self.header && self.sessions.is_empty()
    }
}

impl KnownState {
    /// `emptyKnownState`: no header, no sessions ("I have nothing").
    pub fn empty(id: CoId) -> Self {
        KnownState { id, header: false, sessions: SessionCounts::new() }
    }

    /// Count for a session; absent means 0.
    pub fn count(&self, session: &SessionId) -> u64 {
        self.sessions.get(session).copied().unwrap_or(0)
    }

    /// `combineKnownStates`: header is or-ed, each session takes the max.
    /// Monotone, so merging stale or duplicated reports is harmless.
    pub fn merge(&mut self, other: &KnownState) {
        self.header |= other.header;
        self.merge_sessions(&other.sessions);
    }

    pub fn merge_sessions(&mut self, other: &SessionCounts) {
        for (session, &count) in other {
            self.raise(session, count);
        }
    }

    /// Raises one session's count (never lowers it).
    pub fn raise(&mut self, session: &SessionId, count: u64) {
        // Look up first: the common case (a session we already count) clones nothing.
        match self.sessions.get_mut(session) {
            Some(entry) => {
                if count > *entry {
                    *entry = count;
                }
            }
            None => {
                self.sessions.insert(session.clone(), count);
            }
        }
    }

    /// What `peer` lacks relative to `self`: the header if we have it and the
    /// peer does not, and every session where our count is higher.
    pub fn missing_in(&self, peer: &KnownState) -> Missing {
        Missing {
            header: self.header && !peer.header,
            sessions: self
                .sessions
                .iter()
                .filter_map(|(session, &ours)| {
                    let theirs = peer.count(session);
                    (ours > theirs).then(|| SessionGap { session: session.clone(), from: theirs, to: ours })
                })
                .collect(),
        }
    }

    /// `isKnownStateSubsetOf(self.sessions, other.sessions)`.
    pub fn sessions_subset_of(&self, other: &KnownState) -> bool {
        self.sessions.iter().all(|(s, &c)| c <= other.count(s))
    }

    /// `peerHasAllContent`: the peer has our header (if we have one) and at
    /// least our count in every session. Used to answer a `load` from stored
    /// known state without loading the CoValue.
    pub fn peer_has_all(&self, peer: &KnownState) -> bool {
        self.missing_in(peer).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> SessionId {
        SessionId::parse(&format!("co_zA_session_z{s}")).unwrap()
    }

    fn ks(header: bool, sessions: &[(&str, u64)]) -> KnownState {
        KnownState {
            id: CoId::parse("co_zX").unwrap(),
            header,
            sessions: sessions.iter().map(|(s, c)| (sid(s), *c)).collect(),
        }
    }

    #[test]
    fn merge_takes_max_and_ors_header() {
        let mut a = ks(false, &[("a", 3), ("b", 1)]);
        a.merge(&ks(true, &[("a", 2), ("b", 4), ("c", 1)]));
        assert_eq!(a, ks(true, &[("a", 3), ("b", 4), ("c", 1)]));
        // Merging never un-learns the header.
        a.merge(&ks(false, &[]));
        assert!(a.header);
    }

    #[test]
    fn missing_lists_sessions_where_we_are_ahead() {
        let ours = ks(true, &[("a", 3), ("b", 1), ("c", 2)]);
        let peer = ks(false, &[("a", 1), ("b", 5)]);
        let missing = ours.missing_in(&peer);
        assert!(missing.header);
        assert_eq!(
            missing.sessions,
            vec![SessionGap { session: sid("a"), from: 1, to: 3 }, SessionGap { session: sid("c"), from: 0, to: 2 }]
        );
        assert!(!ours.peer_has_all(&peer));
    }

    #[test]
    fn peer_has_all_ignores_sessions_the_peer_has_extra() {
        let ours = ks(true, &[("a", 2)]);
        assert!(ours.peer_has_all(&ks(true, &[("a", 2), ("z", 9)])));
        assert!(!ours.peer_has_all(&ks(false, &[("a", 2)])));
        // Without a header of our own, a headerless peer lacks nothing.
        assert!(ks(false, &[]).peer_has_all(&ks(false, &[])));
    }

    #[test]
    fn raise_never_lowers() {
        let mut a = ks(true, &[("a", 3)]);
        a.raise(&sid("a"), 2);
        a.raise(&sid("b"), 1);
        assert_eq!(a, ks(true, &[("a", 3), ("b", 1)]));
        assert_eq!(a.count(&sid("zz")), 0);
    }
}
