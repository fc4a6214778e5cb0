//! What the relay remembers about one connected peer.
//!
//! Mirrors cojson's `PeerState` for a peer in role "client" with
//! `deletePeerStateOnClose`: everything here is dropped on disconnect.
//! * `known`: per CoValue, what the peer told us it has (`confirmed`) and
//!   what it will have once our in-flight content arrives (`optimistic`).
//!   Holding an entry *is* the subscription: there is no unsubscribe.
//! * `told_known`: CoValues we already sent a `known` (or content) about, so
//!   a state report is sent at most once when nothing else is to be said.
//! * `errored`: CoValues this peer sent content for that failed
//!   verification. Like cojson, every later message about them from this
//!   connection is ignored.
//! * `requested`/`not_found`: dependencies we asked this peer for with
//!   `load`, and those it answered it does not have.

use crate::ids::CoId;
use crate::known_state::KnownState;
use std::collections::{HashMap, HashSet};

/// The peer's known state of one CoValue (cojson's `PeerKnownState`).
#[derive(Debug, Clone)]
pub(crate) struct PeerKnown {
    pub confirmed: KnownState,
    pub optimistic: Option<KnownState>,
}

impl PeerKnown {
    pub fn new(id: CoId) -> Self {
        PeerKnown { confirmed: KnownState::empty(id), optimistic: None }
    }

    /// `set`: replace (used by `load` and corrections); drops optimism.
    pub fn set(&mut self, state: KnownState) {
        self.confirmed = state;
        self.optimistic = None;
    }

    /// `combineWith`: what the peer reports only ever adds.
    pub fn combine(&mut self, state: &KnownState) {
        self.confirmed.merge(state);
        if let Some(o) = &mut self.optimistic {
            o.merge(state);
        }
    }

    /// `combineOptimisticWith`: what we just sent.
    pub fn combine_optimistic(&mut self, state: &KnownState) {
        self.optimistic.get_or_insert_with(|| self.confirmed.clone()).merge(state);
    }

    pub fn optimistic(&self) -> &KnownState {
        self.optimistic.as_ref().unwrap_or(&self.confirmed)
    }
}

/// Progress of one `reconcile` batch from this peer.
#[derive(Debug, Default)]
pub(crate) struct ReconcileBatch {
    /// Entries whose comparison is still waiting on storage.
    pub unresolved: usize,
    /// CoValues we sent a `load` for; settled by the peer's next `known` or
    /// `content` about them.
    pub pending: HashSet<CoId>,
}

#[derive(Debug, Default)]
pub(crate) struct PeerState {
    pub known: HashMap<CoId, PeerKnown>,
    pub told_known: HashSet<CoId>,
    pub errored: HashSet<CoId>,
    pub requested: HashSet<CoId>,
    pub not_found: HashSet<CoId>,
    pub reconcile: HashMap<String, ReconcileBatch>,
    /// CoValues holding jobs of this peer (content waiting on dependencies,
    /// answers waiting on storage), so a disconnect can drop them.
    pub parked_on: HashSet<CoId>,
    /// Content messages of this peer currently parked (bounded).
    pub parked_content: usize,
    /// Bytes of the content messages currently parked ([`crate::message::ContentMessage::approx_bytes`]).
    pub parked_bytes: usize,
    /// CoValues with an ack for this peer waiting on durability.
    pub awaiting_ack: HashSet<CoId>,
    /// A `Close` was emitted: ignore everything until the disconnect.
    pub closing: bool,
}
