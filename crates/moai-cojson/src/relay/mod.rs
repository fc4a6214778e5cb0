//! The relay state machine: moai as a cojson sync *server* for unmodified
//! cojson 0.20.19 clients (docs/protocols/cojson.md §11, the reference server's behaviour towards
//! peers in role "client").
//!
//! Sans-IO: [`Relay::handle`] takes one [`Event`] and returns the
//! [`Action`]s the driver must perform. No sockets, clocks, tasks or storage
//! live here, so every scenario can be replayed deterministically.
//!
//! ## The driver's contract
//! * Feed every decoded message of a peer in order, between `PeerConnected`
//!   and `PeerDisconnected`. Perform `Send`s for one peer in order.
//! * `Load(id)`: read the CoValue and answer `Loaded { id, stored }` exactly
//!   once (`None` if storage does not have it).
//! * `LoadKnown(ids)`: read only the stored known states (header + session
//!   counts, no transactions) and answer each id exactly once in a
//!   `KnownLoaded` (one event may answer many ids, in any grouping). Ids of
//!   several `LoadKnown`s may share one storage read. At most one read (full
//!   or known-state) of a CoValue is in flight at a time.
//! * `Persist(req)`: write it atomically and answer `Persisted(token)` only
//!   once it is durable, or `PersistFailed(token)`. Refuse an append whose
//!   `after` is not the stored count. Writes of one CoValue may complete in
//!   any order; the relay orders the acks itself.
//! * `Close(peer, _)`: close the connection, then report `PeerDisconnected`.
//! * Memory: [`Relay::evictable`] lists CoValues nobody needs in memory;
//!   [`Relay::evict`] drops one. It is reloaded on demand.
//!
//! ## What the relay guarantees
//! * Nothing is stored or forwarded before verification
//!   ([`crate::verify`]); a rejected session changes nothing.
//! * An ack (`known` after `content`) is sent only after every write of that
//!   CoValue issued so far is durable, and reports the durable state.
//! * New content is forwarded to every other subscribed peer, dependencies
//!   first, as soon as it is durable (on `Persisted`), and never beyond what
//!   is durable: no peer is sent, or told we have, anything a crash could
//!   still lose ([`crate::durable`]). A dependency whose creation is not
//!   durable yet holds back what depends on it.
//! * A `load` (or `known`) about a CoValue that is not in memory, from a peer
//!   that says it has the header, is first compared with the *stored known
//!   state* (`LoadKnown`): if the peer lacks nothing, the answer is `known`
//!   without loading the CoValue (docs/protocols/cojson.md §11.3, what makes reconnect storms
//!   cheap); otherwise the CoValue is loaded whole and answered as usual.
//!   The peer is subscribed either way, and content arriving later loads the
//!   CoValue whole before it is applied and forwarded.
//!
//! The handlers live in `content.rs` (incoming content), `sending.rs`
//! (answers and dependency-first sending) and `reconcile.rs`.

mod cluster;
mod content;
mod peer;
mod reconcile;
mod sending;
mod slot;

use crate::content_pieces::PIECE_LIMIT_BYTES;
use crate::covalue::CoValueState;
use crate::group_roles::{self, CoValueLookup};
use crate::header::Header;
use crate::header::HeaderError;
use crate::ids::CoId;
use crate::ids::SessionAuthor;
use crate::known_state::KnownState;
use crate::message::{KnownMessage, Outgoing, SyncMessage};
use crate::persistence::{rebuild, PersistRequest, PersistToken, StoredCoValue, StoredError, StoredKnown};
use crate::verify::{DeletePolicy, HeaderLookup, VerifyError};
use peer::{PeerKnown, PeerState};
use serde_json::Map;
use slot::{Job, Residence, Resident, Slot};
use std::collections::{BTreeSet, HashMap, VecDeque};

/// A connection, numbered by the driver. Never reuse a number while the
/// relay still knows it (i.e. before `PeerDisconnected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

#[derive(Debug, Clone)]
pub enum Event {
    PeerConnected(PeerId),
    Message(PeerId, SyncMessage),
    PeerDisconnected(PeerId),
    /// The answer to [`Action::Load`].
    Loaded {
        id: CoId,
        stored: Option<StoredCoValue>,
    },
    /// Answers to [`Action::LoadKnown`]: per CoValue, what storage holds of it.
    KnownLoaded(Vec<(CoId, StoredKnown)>),
    /// Another instance made this CoValue durable up to `known` (cluster); `None`: something
    /// may have been missed, compare with storage.
    ChangedElsewhere {
        id: CoId,
        known: Option<KnownState>,
    },
    /// The answer to [`Action::Refresh`].
    Refreshed {
        id: CoId,
        stored: Option<StoredCoValue>,
    },
    /// The write with this token is durable.
    Persisted(PersistToken),
    /// The write with this token failed (nothing of it is stored).
    PersistFailed(PersistToken),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer has too much content waiting for dependencies it never sends.
    TooMuchParkedContent,
    /// The peer loaded or synced more CoValues than one connection may hold.
    TooManyCoValues,
    /// A write of a CoValue this peer synced failed; reconnecting resyncs
    /// it against what storage really holds.
    StorageFailure(CoId),
}

/// Things worth a log line or a metric; never needed for correctness.
#[derive(Debug, Clone, PartialEq)]
pub enum Diagnostic {
    /// cojson answers nothing to an invalid header; neither do we.
    InvalidHeader { peer: PeerId, id: CoId, error: HeaderError },
    /// A session failed verification; the CoValue is now errored for the peer.
    RejectedSession { peer: PeerId, id: CoId, session: String, error: VerifyError },
    /// A message about a CoValue that is errored for this peer was ignored.
    IgnoredErrored { peer: PeerId, id: CoId },
    /// A message or answer for a peer the relay does not know.
    UnknownPeer(PeerId),
    /// `Loaded` without a matching `Load`, or `Persisted` for an unknown token.
    Unexpected(&'static str),
    /// Stored data could not be rebuilt; treated as absent.
    StorageCorrupt { id: CoId, error: StoredError },
}

#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // actions are consumed at once
pub enum Action {
    /// Send this message to the peer. The same `Outgoing` may go to many peers (content
    /// fanned out to peers at the same known state is built once), so it is encoded once.
    Send(PeerId, Outgoing),
    Load(CoId),
    /// Read the stored known states of these CoValues (no transactions);
    /// answer with [`Event::KnownLoaded`]. At most one per `handle` call.
    LoadKnown(Vec<CoId>),
    Persist(PersistRequest),
    Close(PeerId, CloseReason),
    Diagnostic(Diagnostic),
    /// Tell the other instances that this much of the CoValue is durable (cluster only).
    Announce {
        id: CoId,
        known: KnownState,
    },
    /// Read the whole CoValue again (another instance changed it) and answer
    /// [`Event::Refreshed`] exactly once.
    Refresh(CoId),
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Payload limit of one outgoing content piece (cojson: 100 KiB).
    pub piece_limit_bytes: usize,
    /// Content messages one peer may have waiting for dependencies before
    /// it is closed (cojson has no bound).
    pub max_parked_content_per_peer: usize,
    /// CoValues one peer may be subscribed to (every `load`, `known` or `content` about a new
    /// id subscribes; cojson has no bound). Each costs the relay a known-state entry and
    /// usually a storage read, so a peer over it is closed instead of growing memory.
    pub max_covalues_per_peer: usize,
    /// Bytes of content one peer may have waiting for dependencies (the count bound alone
    /// would allow 1024 messages of the frame limit each).
    pub max_parked_bytes_per_peer: usize,
    /// Other instances serve the same CoValues (cluster): announce every durable advance.
    pub announce_durable: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            piece_limit_bytes: PIECE_LIMIT_BYTES,
            max_parked_content_per_peer: 1024,
            max_covalues_per_peer: 20_000,
            max_parked_bytes_per_peer: 64 << 20,
            announce_durable: false,
        }
    }
}

/// Why [`Relay::evict`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotEvictable {
    #[error("not held by the relay")]
    NotHeld,
    #[error("a peer is subscribed")]
    Subscribed,
    #[error("writes or acks are pending")]
    Pending,
    #[error("work is waiting on it")]
    Busy,
}

pub struct Relay {
    config: RelayConfig,
    peers: HashMap<PeerId, PeerState>,
    slots: HashMap<CoId, Slot>,
    /// Reverse index of `PeerState::known`: who is subscribed to what.
    subscribers: HashMap<CoId, BTreeSet<PeerId>>,
    tokens: HashMap<PersistToken, CoId>,
    next_token: u64,
    ready: VecDeque<Job>,
    out: Vec<Action>,
    /// Known-state reads asked for during this `handle` call (one action).
    known_loads: Vec<CoId>,
    /// The content pieces last built for a peer (see `sending.rs`), reused for every other
    /// peer at the same known state of the same CoValue. Cleared whenever any CoValue's state
    /// may have changed: at the start of `handle`, on apply, on evict.
    content_memo: Option<sending::ContentMemo>,
}

/// Header lookup over the CoValues in memory (author accounts).
struct SlotHeaders<'a>(&'a HashMap<CoId, Slot>);

impl HeaderLookup for SlotHeaders<'_> {
    fn header(&self, id: &CoId) -> Option<&Header> {
        self.0.get(id)?.resident().map(|r| &r.state.header)
    }
}

/// The delete permission check over the groups in memory: the author must be admin of the
/// owner group at the delete's `madeAt` ([`group_roles`]). Owner groups (and their parents,
/// when the group arrived as content) are dependencies of the CoValue, so they are resident
/// by the time its content is verified; one that is not counts as giving no role.
struct SlotGroups<'a>(&'a HashMap<CoId, Slot>);

impl CoValueLookup for SlotGroups<'_> {
    fn state(&self, id: &CoId) -> Option<&CoValueState> {
        self.0.get(id)?.resident().map(|r| &r.state)
    }
}

impl DeletePolicy for SlotGroups<'_> {
    fn author_is_admin(&self, owner_group: &CoId, author: &SessionAuthor, made_at: u64) -> bool {
        group_roles::is_admin(self, owner_group, author.as_str(), made_at)
    }
}

impl Default for Relay {
    fn default() -> Self {
        Self::new(RelayConfig::default())
    }
}

impl Relay {
    pub fn new(config: RelayConfig) -> Self {
        Relay {
            config,
            peers: HashMap::new(),
            slots: HashMap::new(),
            subscribers: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 0,
            content_memo: None,
            ready: VecDeque::new(),
            out: Vec::new(),
            known_loads: Vec::new(),
        }
    }

    /// Processes one event; returns what the driver must do, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        self.content_memo = None;
        match event {
            Event::PeerConnected(peer) => {
                self.drop_peer(peer);
                self.peers.insert(peer, PeerState::default());
            }
            Event::PeerDisconnected(peer) => self.drop_peer(peer),
            Event::Message(peer, msg) => self.on_message(peer, msg),
            Event::Loaded { id, stored } => self.on_loaded(id, stored),
            Event::KnownLoaded(answers) => {
                for (id, stored) in answers {
                    self.on_known_loaded(id, stored);
                }
            }
            Event::Persisted(token) => self.on_persisted(token),
            Event::PersistFailed(token) => self.on_persist_failed(token),
            Event::ChangedElsewhere { id, known } => self.on_changed_elsewhere(id, known),
            Event::Refreshed { id, stored } => self.on_refreshed(id, stored),
        }
        // Work woken by this event runs now, iteratively (no recursion depth
        // an attacker could choose).
        while let Some(job) = self.ready.pop_front() {
            self.run_job(job);
        }
        if !self.known_loads.is_empty() {
            let ids = std::mem::take(&mut self.known_loads);
            self.out.push(Action::LoadKnown(ids));
        }
        std::mem::take(&mut self.out)
    }

    // ---------- inspection and memory ----------

    /// Our known state of a CoValue held in memory.
    pub fn known_state(&self, id: &CoId) -> Option<KnownState> {
        self.slots.get(id)?.resident().map(|r| r.state.known_state())
    }

    /// CoValues held in memory.
    pub fn resident_count(&self) -> usize {
        self.slots.values().filter(|s| s.resident().is_some()).count()
    }

    /// Whether `peer` is subscribed to `id`.
    pub fn is_subscribed(&self, peer: PeerId, id: &CoId) -> bool {
        self.subscribers.get(id).is_some_and(|s| s.contains(&peer))
    }

    fn evict_check(&self, id: &CoId, slot: &Slot) -> Result<(), NotEvictable> {
        if self.subscribers.get(id).is_some_and(|s| !s.is_empty()) {
            return Err(NotEvictable::Subscribed);
        }
        if !slot.waiters.is_empty() || !slot.pending_deps.is_empty() {
            return Err(NotEvictable::Busy);
        }
        match &slot.residence {
            Residence::InMemory(r) if !r.pending.is_empty() || !r.acks.is_empty() => Err(NotEvictable::Pending),
            Residence::Loading | Residence::LoadingKnown => Err(NotEvictable::Busy),
            _ => Ok(()),
        }
    }

    /// CoValues that could be evicted now: no subscriber, no pending write
    /// or ack, no work waiting. The driver picks which (e.g. by idle time).
    pub fn evictable(&self) -> Vec<CoId> {
        let mut ids: Vec<CoId> = self
            .slots
            .iter()
            .filter(|(id, slot)| self.evict_check(id, slot).is_ok())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Drops a CoValue from memory; the next use loads it from storage again.
    pub fn evict(&mut self, id: &CoId) -> Result<(), NotEvictable> {
        let slot = self.slots.get(id).ok_or(NotEvictable::NotHeld)?;
        self.evict_check(id, slot)?;
        self.slots.remove(id);
        self.subscribers.remove(id);
        self.content_memo = None;
        Ok(())
    }

    // ---------- plumbing shared by the handlers ----------

    fn send(&mut self, peer: PeerId, msg: SyncMessage) {
        self.send_shared(peer, Outgoing::new(msg));
    }

    fn send_shared(&mut self, peer: PeerId, msg: Outgoing) {
        if self.peers.get(&peer).is_some_and(|p| !p.closing) {
            self.out.push(Action::Send(peer, msg));
        }
    }

    fn send_known(&mut self, peer: PeerId, state: KnownState, is_correction: bool) {
        let msg = KnownMessage { state, is_correction, as_dependency_of: None, extra: Map::new() };
        self.send(peer, SyncMessage::Known(msg));
    }

    fn diagnostic(&mut self, d: Diagnostic) {
        self.out.push(Action::Diagnostic(d));
    }

    fn close(&mut self, peer: PeerId, reason: CloseReason) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if !p.closing {
                p.closing = true;
                self.out.push(Action::Close(peer, reason));
            }
        }
    }

    /// The peer's known-state entry for `id`, creating it (= subscribing). None, and the peer
    /// closed, when it is at `max_covalues_per_peer`.
    fn peer_known(&mut self, peer: PeerId, id: &CoId) -> Option<&mut PeerKnown> {
        let p = self.peers.get(&peer)?;
        if p.closing {
            return None;
        }
        if !p.known.contains_key(id) {
            if p.known.len() >= self.config.max_covalues_per_peer {
                self.close(peer, CloseReason::TooManyCoValues);
                return None;
            }
            self.subscribers.entry(id.clone()).or_default().insert(peer);
            self.peers.get_mut(&peer)?.known.insert(id.clone(), PeerKnown::new(id.clone()));
        }
        self.peers.get_mut(&peer)?.known.get_mut(id)
    }

    /// Asks the driver for a whole CoValue unless it is already resolved or a
    /// read is in flight (a known-state read in flight is awaited first: its
    /// waiters run again when it lands and ask for the full load then).
    fn request_load(&mut self, id: &CoId) {
        let slot = self.slots.entry(id.clone()).or_default();
        if matches!(slot.residence, Residence::Unknown | Residence::Shell(_)) {
            slot.residence = Residence::Loading;
            self.out.push(Action::Load(id.clone()));
        }
    }

    /// Asks the driver for the stored known state of a CoValue never looked
    /// up (or evicted). Callers park their job on `id`.
    fn request_known_load(&mut self, id: &CoId) {
        let slot = self.slots.entry(id.clone()).or_default();
        if matches!(slot.residence, Residence::Unknown) {
            slot.residence = Residence::LoadingKnown;
            self.known_loads.push(id.clone());
        }
    }

    /// Parks a job until `on` changes (loaded, provided, or declared absent).
    fn park(&mut self, on: &CoId, job: Job) {
        let peer = job.peer();
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if let Job::Content { msg, .. } = &job {
            let bytes = msg.approx_bytes();
            if p.parked_content >= self.config.max_parked_content_per_peer
                || p.parked_bytes + bytes > self.config.max_parked_bytes_per_peer
            {
                self.close(peer, CloseReason::TooMuchParkedContent);
                return;
            }
            p.parked_content += 1;
            p.parked_bytes += bytes;
        }
        p.parked_on.insert(on.clone());
        self.slots.entry(on.clone()).or_default().waiters.push(job);
    }

    /// Re-runs everything parked on `id`.
    fn wake(&mut self, id: &CoId) {
        let Some(slot) = self.slots.get_mut(id) else { return };
        for job in std::mem::take(&mut slot.waiters) {
            if let (Job::Content { msg, .. }, Some(p)) = (&job, self.peers.get_mut(&job.peer())) {
                p.parked_content = p.parked_content.saturating_sub(1);
                p.parked_bytes = p.parked_bytes.saturating_sub(msg.approx_bytes());
            }
            self.ready.push_back(job);
        }
    }

    fn run_job(&mut self, job: Job) {
        if self.peers.get(&job.peer()).is_none_or(|p| p.closing) {
            return;
        }
        match job {
            Job::Answer { peer, id, force_known } => self.answer(peer, id, force_known),
            Job::Content { peer, msg } => self.process_content(peer, msg),
            Job::Reconcile { peer, batch, id, hash } => self.reconcile_entry(peer, batch, id, hash),
        }
    }

    fn drop_peer(&mut self, peer: PeerId) {
        let Some(p) = self.peers.remove(&peer) else { return };
        for id in p.known.keys() {
            if let Some(subs) = self.subscribers.get_mut(id) {
                subs.remove(&peer);
                if subs.is_empty() {
                    self.subscribers.remove(id);
                }
            }
        }
        let mut abandoned = Vec::new();
        for id in p.parked_on.iter() {
            if let Some(slot) = self.slots.get_mut(id) {
                slot.waiters.retain(|j| match j {
                    Job::Content { peer: owner, msg } if *owner == peer => {
                        abandoned.push(msg.id.clone());
                        false
                    }
                    j => j.peer() != peer,
                });
            }
        }
        // Parked content of this peer no longer waits for anything. (If
        // another peer's content for the same CoValue is parked too, its
        // dependencies are recorded again when it re-runs; until then cycle
        // detection merely knows less.)
        for id in abandoned {
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.pending_deps.clear();
            }
        }
        for id in p.awaiting_ack.iter() {
            if let Some(r) = self.slots.get_mut(id).and_then(Slot::resident_mut) {
                r.acks.retain(|a| a.peer != peer);
            }
        }
    }

    fn on_message(&mut self, peer: PeerId, msg: SyncMessage) {
        let Some(p) = self.peers.get(&peer) else {
            self.diagnostic(Diagnostic::UnknownPeer(peer));
            return;
        };
        if p.closing {
            return;
        }
        let id = match &msg {
            SyncMessage::Load(s, _) => &s.id,
            SyncMessage::Known(k) => &k.state.id,
            SyncMessage::Content(c) => &c.id,
            SyncMessage::Done(_) => return,
            SyncMessage::Reconcile(r) => return self.on_reconcile(peer, r.id.clone(), r.values.clone()),
            // Only servers send acks; a client's is meaningless to us.
            SyncMessage::ReconcileAck(_) => return,
        };
        if p.errored.contains(id) {
            let id = id.clone();
            self.diagnostic(Diagnostic::IgnoredErrored { peer, id });
            return;
        }
        match msg {
            SyncMessage::Load(state, _) => {
                let id = state.id.clone();
                let Some(k) = self.peer_known(peer, &id) else { return };
                k.set(state);
                self.answer(peer, id, true);
            }
            SyncMessage::Known(k) => self.on_known(peer, k),
            SyncMessage::Content(c) => self.process_content(peer, c),
            _ => {}
        }
    }

    /// `handleKnownState` / `handleCorrection`.
    fn on_known(&mut self, peer: PeerId, k: KnownMessage) {
        let KnownMessage { state, is_correction, .. } = k;
        let header = state.header;
        let Some(entry) = self.peer_known(peer, &state.id) else { return };
        let id = if is_correction {
            let id = state.id.clone();
            entry.set(state);
            id
        } else {
            entry.combine(&state);
            state.id
        };
        // The peer's answer to a dependency request: it does not have it.
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.requested.remove(&id) && !header {
                p.not_found.insert(id.clone());
                self.wake(&id);
            }
        }
        // An ack of content the peer now has: usually nothing to answer, found out without
        // cloning anything.
        if !self.answer_settled(peer, &id, false) {
            self.answer_full(peer, id.clone(), false);
        }
        self.reconcile_settled(peer, &id);
    }

    fn on_loaded(&mut self, id: CoId, stored: Option<StoredCoValue>) {
        self.content_memo = None;
        let Some(slot) = self.slots.get_mut(&id).filter(|s| matches!(s.residence, Residence::Loading)) else {
            self.diagnostic(Diagnostic::Unexpected("Loaded without a pending Load"));
            return;
        };
        let mut corrupt = None;
        slot.residence = match stored.map(|s| rebuild(&id, s)) {
            None => Residence::Absent,
            Some(Ok(state)) => Residence::InMemory(Box::new(Resident::stored(state))),
            Some(Err(error)) => {
                corrupt = Some(error);
                Residence::Absent
            }
        };
        if let Some(error) = corrupt {
            self.diagnostic(Diagnostic::StorageCorrupt { id: id.clone(), error });
        }
        self.wake(&id);
        self.refresh_if_waiting(&id);
    }

    fn on_known_loaded(&mut self, id: CoId, stored: StoredKnown) {
        let Some(slot) = self.slots.get_mut(&id).filter(|s| matches!(s.residence, Residence::LoadingKnown)) else {
            self.diagnostic(Diagnostic::Unexpected("KnownLoaded without a pending LoadKnown"));
            return;
        };
        match stored {
            StoredKnown::Stored { mut state, deleted: false } => {
                state.id = id.clone();
                state.header = true;
                slot.residence = Residence::Shell(state);
            }
            StoredKnown::NotStored => slot.residence = Residence::Absent,
            // Deleted (which sessions it serves is decided on the whole
            // CoValue) or unreadable: load it whole. Waiters stay parked until
            // that answer, so they never ask for the known state again.
            StoredKnown::Stored { deleted: true, .. } | StoredKnown::Unreadable => {
                slot.residence = Residence::Unknown;
                self.request_load(&id);
                return;
            }
        }
        self.wake(&id);
        self.refresh_if_waiting(&id);
    }

    fn on_persisted(&mut self, token: PersistToken) {
        let Some(id) = self.tokens.remove(&token) else {
            self.diagnostic(Diagnostic::Unexpected("Persisted for an unknown token"));
            return;
        };
        let Some(r) = self.slots.get_mut(&id).and_then(Slot::resident_mut) else { return };
        let before = r.durable.clone();
        let ready = r.complete(token);
        let advanced = r.durable != before;
        for ack in ready {
            self.send_ack(ack.peer, &id, ack.correction);
        }
        if advanced {
            self.content_memo = None;
            // Now durable: forward it to every subscriber (the author lacks nothing, so it gets
            // nothing), and resume answers that waited for it as a dependency.
            self.answer_subscribers(&id);
            self.wake(&id);
            self.announce(&id);
        }
        self.refresh_if_waiting(&id);
    }

    /// Sends every subscriber of `id` what it lacks (after new content became durable here, or
    /// was read back from storage after another instance wrote it).
    fn answer_subscribers(&mut self, id: &CoId) {
        let subscribers: Vec<PeerId> =
            self.subscribers.get(id).map(|s| s.iter().copied().collect()).unwrap_or_default();
        for peer in subscribers {
            let skip = self.peers.get(&peer).is_none_or(|p| p.errored.contains(id) || p.closing);
            if !skip {
                self.answer(peer, id.clone(), false);
            }
        }
    }

    /// A failed write leaves memory ahead of storage. The CoValue is dropped
    /// from memory (it reloads from what storage really has) and every peer
    /// that synced it is closed, so it resyncs on reconnect; its later writes
    /// in flight are abandoned (storage refuses them: their `after` no
    /// longer matches).
    fn on_persist_failed(&mut self, token: PersistToken) {
        self.content_memo = None;
        let Some(id) = self.tokens.remove(&token) else {
            self.diagnostic(Diagnostic::Unexpected("PersistFailed for an unknown token"));
            return;
        };
        let Some(slot) = self.slots.get_mut(&id) else { return };
        let mut affected: BTreeSet<PeerId> = self.subscribers.get(&id).cloned().unwrap_or_default();
        if let Residence::InMemory(r) = &slot.residence {
            affected.extend(r.acks.iter().map(|a| a.peer));
            for (t, _, _) in &r.pending {
                self.tokens.remove(t);
            }
        }
        slot.residence = Residence::Unknown;
        for peer in affected {
            self.close(peer, CloseReason::StorageFailure(id.clone()));
        }
        self.wake(&id);
    }

    /// The reply to a content message: `known` with the durable state (a
    /// correction when the content had a gap). For a deleted CoValue, the
    /// union with the peer's own state, so old clients stop re-uploading
    /// sessions the delete discarded (`stopSyncingKnownStateMessage`).
    fn send_ack(&mut self, peer: PeerId, id: &CoId, correction: bool) {
        let Some(r) = self.slots.get(id).and_then(Slot::resident) else { return };
        let mut state = r.durable.known_state(id);
        if r.state.deleted {
            if let Some(k) = self.peers.get(&peer).and_then(|p| p.known.get(id)) {
                state.merge_sessions(&k.confirmed.sessions);
            }
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.awaiting_ack.remove(id);
        }
        self.send_known(peer, state, correction);
    }
}

#[cfg(test)]
mod tests;
