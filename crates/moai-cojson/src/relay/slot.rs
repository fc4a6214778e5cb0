//! What the relay holds per CoValue: where it is (unknown, its stored known
//! state being read or held as a shell, being loaded, absent from storage, in
//! memory), the work waiting on it, and — for a CoValue in memory — the
//! durability bookkeeping that gates acks.
//!
//! Durability: every write the relay hands to the driver gets a token that
//! joins this CoValue's FIFO `pending`. Completions may arrive in any order;
//! a write counts as durable only once every earlier write of the same
//! CoValue is too, and only then is its range merged into `durable`. An ack
//! waits for the newest write that existed when its content was processed
//! and reports `durable`, so a peer is never told we hold something that a
//! crash could still lose. Content is sent to peers only up to `durable` too
//! (see [`crate::durable`]).

use crate::covalue::CoValueState;
use crate::durable::Durable;
use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::message::ContentMessage;
use crate::persistence::PersistToken;
use std::collections::{BTreeSet, VecDeque};

use super::PeerId;

/// Work that could not finish because a CoValue was not resolved yet; it is
/// re-run from the start when that CoValue's situation changes.
#[derive(Debug, Clone)]
pub(crate) enum Job {
    /// Answer `load`/`known`: send what the peer lacks, dependencies first
    /// (or only `known`, from the stored known state, if it lacks nothing).
    Answer { peer: PeerId, id: CoId, force_known: bool },
    /// Incoming content waiting for its CoValue or its dependencies.
    Content { peer: PeerId, msg: ContentMessage },
    /// One entry of a `reconcile` batch waiting for our known state.
    Reconcile { peer: PeerId, batch: String, id: CoId, hash: String },
}

impl Job {
    pub fn peer(&self) -> PeerId {
        match self {
            Job::Answer { peer, .. } | Job::Content { peer, .. } | Job::Reconcile { peer, .. } => *peer,
        }
    }
}

/// An ack (or correction) for a peer, held until `after` is durable.
#[derive(Debug, Clone)]
pub(crate) struct PendingAck {
    pub after: PersistToken,
    pub peer: PeerId,
    pub correction: bool,
}

#[derive(Debug)]
pub(crate) struct Resident {
    pub state: CoValueState,
    /// Cached dependencies (`covalue_dependencies`), kept up to date on apply.
    pub deps: BTreeSet<CoId>,
    /// What storage is known to hold: all that acks report and peers are sent.
    pub durable: Durable,
    /// Writes in flight, oldest first: (token, completed, what it writes).
    pub pending: VecDeque<(PersistToken, bool, Durable)>,
    pub acks: Vec<PendingAck>,
}

impl Resident {
    /// A CoValue as storage holds it: all of it durable, nothing in flight.
    pub fn stored(state: CoValueState) -> Self {
        let deps = crate::dependencies::covalue_dependencies(&state);
        let durable = Durable::all_of(&state);
        Resident { state, deps, durable, pending: VecDeque::new(), acks: Vec::new() }
    }

    pub fn newest_pending(&self) -> Option<PersistToken> {
        self.pending.back().map(|(t, _, _)| *t)
    }

    /// Marks `token` done and advances `durable` over the completed prefix.
    /// Returns the acks that may now be sent.
    pub fn complete(&mut self, token: PersistToken) -> Vec<PendingAck> {
        if let Some(entry) = self.pending.iter_mut().find(|(t, _, _)| *t == token) {
            entry.1 = true;
        }
        while self.pending.front().is_some_and(|(_, done, _)| *done) {
            if let Some((_, _, written)) = self.pending.pop_front() {
                self.durable.merge(&written);
            }
        }
        let oldest = self.pending.front().map(|(t, _, _)| *t);
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.acks.drain(..).partition(|a| oldest.is_none_or(|oldest| a.after < oldest));
        self.acks = waiting;
        ready
    }
}

#[derive(Debug)]
pub(crate) enum Residence {
    /// Never looked up, or evicted: storage must be asked.
    Unknown,
    /// A `LoadKnown` (known state only) is in flight.
    LoadingKnown,
    /// Not in memory, but what storage holds of it is known (header + these counts): a
    /// `load` from a peer that has all of it is answered from this alone. Exact while the
    /// slot stays a shell, because every write of a CoValue needs it in memory first.
    Shell(KnownState),
    /// A `Load` is in flight.
    Loading,
    /// Storage does not have it and no peer has provided it yet.
    Absent,
    InMemory(Box<Resident>),
}

/// Whether the CoValue must be read back from storage because another instance changed it
/// (cluster; `cluster.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Refresh {
    #[default]
    Idle,
    /// A refresh read is in flight.
    InFlight,
    /// In flight, and another change was announced since it started.
    InFlightAgain,
    /// Wanted once this CoValue's own writes are durable.
    AfterPending,
    /// Wanted once the load in flight has landed.
    AfterLoad,
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub residence: Residence,
    pub refresh: Refresh,
    pub waiters: Vec<Job>,
    /// Dependencies that parked content of this CoValue waits for; used to
    /// detect dependency cycles between parked CoValues.
    pub pending_deps: BTreeSet<CoId>,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            residence: Residence::Unknown,
            refresh: Refresh::Idle,
            waiters: Vec::new(),
            pending_deps: BTreeSet::new(),
        }
    }
}

impl Slot {
    pub fn resident(&self) -> Option<&Resident> {
        match &self.residence {
            Residence::InMemory(r) => Some(r),
            _ => None,
        }
    }

    pub fn resident_mut(&mut self) -> Option<&mut Resident> {
        match &mut self.residence {
            Residence::InMemory(r) => Some(r),
            _ => None,
        }
    }
}
