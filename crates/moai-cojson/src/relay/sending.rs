//! Sending a peer what it lacks, dependencies first (cojson's
//! `sendNewContent` for a peer in role "client").
//!
//! Only durable content is sent, and only durable state announced
//! ([`crate::durable`]).
//!
//! Before anything is sent, the whole dependency closure must be in memory:
//! a dependency that was evicted is loaded first (the answer is parked until
//! it arrives), so a peer always receives the account and group before the
//! map that needs them. Dependencies storage does not have are skipped, as
//! cojson skips unavailable ones.
//!
//! The closure is walked iteratively (explicit stack, post-order), so a long
//! chain of parent groups cannot exhaust the stack; cycles end at the first
//! revisit.
//!
//! The lazy path (docs/protocols/cojson.md §11.3): for a CoValue not in memory, a peer that says
//! it has the header is first compared with the stored known state (read
//! without transactions, kept as a shell). If it lacks nothing, it gets only
//! `known` (when one is due) and nothing is loaded; no content goes out, so
//! no dependency needs to go first. Otherwise the full path above runs.

use super::slot::{Job, Residence};
use super::{Relay, Slot};
use crate::content_pieces::{new_content_since, peer_lacks_no_content};
use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::message::{Outgoing, SyncMessage};
use std::collections::HashSet;

use super::PeerId;

/// The content pieces built for one peer's (optimistic) known state of a CoValue, reused for
/// the next peer at the same state: a fan-out to many subscribers that are all caught up builds
/// (and, through the shared [`Outgoing`], encodes) its content once.
pub(crate) struct ContentMemo {
    id: CoId,
    /// The peer state the pieces were built for (`None`: the peer knew nothing).
    from: Option<KnownState>,
    pieces: Vec<Outgoing>,
    /// Our known state when they were built.
    ours: KnownState,
}

/// Most CoValues the allocation-light "nothing to answer" walk looks at before it leaves the
/// answer to the full path.
const NOOP_WALK_LIMIT: usize = 64;

/// Outcome of the lazy path of an answer.
enum Lazy {
    /// Answered (or nothing was due) from the stored known state.
    Answered,
    /// The stored known state is being read; the answer is parked on it.
    WaitForKnownState,
    /// The peer lacks something, or the lazy path does not apply (in memory,
    /// loading, absent, or the peer lacks the header): the full path.
    FullPath,
}

impl Relay {
    /// `id` and its dependencies in sending order (dependencies first), all
    /// in memory; or the first CoValue that must be loaded before (loads are
    /// requested for every unresolved one at once).
    fn dependency_order(&mut self, id: &CoId) -> Result<Vec<CoId>, CoId> {
        let mut order = Vec::new();
        let mut visited: HashSet<CoId> = HashSet::new();
        let mut missing: Option<CoId> = None;
        let mut to_load = Vec::new();
        let mut stack: Vec<(CoId, bool)> = vec![(id.clone(), false)];
        while let Some((node, expanded)) = stack.pop() {
            if expanded {
                order.push(node);
                continue;
            }
            if !visited.insert(node.clone()) {
                continue;
            }
            match self.slots.get(&node).map(|s| &s.residence) {
                // A dependency whose creation is not durable yet cannot be sent: what needs it
                // waits (its `Persisted` wakes the answer).
                Some(Residence::InMemory(r)) if node != *id && !r.durable.header => {
                    missing.get_or_insert(node);
                }
                Some(Residence::InMemory(r)) => {
                    stack.push((node.clone(), true));
                    for dep in r.deps.iter().rev() {
                        if !visited.contains(dep) {
                            stack.push((dep.clone(), false));
                        }
                    }
                }
                Some(Residence::Absent) => {}
                Some(Residence::Loading) | Some(Residence::LoadingKnown) => {
                    missing.get_or_insert(node);
                }
                None | Some(Residence::Unknown) | Some(Residence::Shell(_)) => {
                    to_load.push(node.clone());
                    missing.get_or_insert(node);
                }
            }
        }
        for node in &to_load {
            self.request_load(node);
        }
        match missing {
            Some(m) => Err(m),
            None => Ok(order),
        }
    }

    /// Answers a peer about `id`: content it lacks (dependencies first), or
    /// a `known` when `force_known` (a `load`) or when it was never told.
    /// An unknown CoValue answers a `load` with `known {header:false}`.
    pub(super) fn answer(&mut self, peer: PeerId, id: CoId, force_known: bool) {
        if !self.answer_settled(peer, &id, force_known) {
            self.answer_full(peer, id, force_known);
        }
    }

    /// [`Self::answer`] without the "nothing to answer" shortcut.
    pub(super) fn answer_full(&mut self, peer: PeerId, id: CoId, force_known: bool) {
        match self.answer_from_stored_known_state(peer, &id, force_known) {
            Lazy::Answered => return,
            Lazy::WaitForKnownState => {
                self.park(&id.clone(), Job::Answer { peer, id, force_known });
                return;
            }
            Lazy::FullPath => {}
        }
        let order = match self.dependency_order(&id) {
            Ok(order) => order,
            Err(wait_on) => {
                self.park(&wait_on, Job::Answer { peer, id, force_known });
                return;
            }
        };
        if self.slots.get(&id).and_then(Slot::resident).is_none() {
            if force_known {
                self.send_known(peer, KnownState::empty(id.clone()), false);
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.told_known.insert(id);
                }
            }
            return;
        }
        for node in order {
            let force = force_known && node == id;
            self.send_one(peer, &node, force);
        }
    }

    /// The answer when `id` is in memory and every dependency the full path would send first is
    /// settled for this peer (in memory, told, lacking no content; or absent from storage): the
    /// full path would then send nothing for the dependencies, so this sends what it would send
    /// for `id` alone, without building the dependency order. The case of every fan-out and
    /// every ack. Returns false (having done nothing) when the full path is needed.
    pub(super) fn answer_settled(&mut self, peer: PeerId, id: &CoId, force_known: bool) -> bool {
        if !self.dependencies_settled(peer, id) {
            return false;
        }
        self.send_one(peer, id, force_known);
        true
    }

    /// See [`Self::answer_settled`]. Walks the closure like `dependency_order`, allocation-light;
    /// `false` only means "take the full path".
    fn dependencies_settled(&self, peer: PeerId, id: &CoId) -> bool {
        let Some(p) = self.peers.get(&peer) else { return false };
        let Some(Residence::InMemory(root)) = self.slots.get(id).map(|s| &s.residence) else { return false };
        if root.deps.is_empty() {
            return true;
        }
        let mut stack: Vec<&CoId> = root.deps.iter().collect();
        let mut visited: Vec<&CoId> = vec![id];
        while let Some(node) = stack.pop() {
            if visited.contains(&node) {
                continue;
            }
            if visited.len() >= NOOP_WALK_LIMIT {
                return false;
            }
            visited.push(node);
            match self.slots.get(node).map(|s| &s.residence) {
                Some(Residence::InMemory(r)) => {
                    if !p.told_known.contains(node) {
                        return false;
                    }
                    match p.known.get(node) {
                        Some(k) if peer_lacks_no_content(&r.state, k.optimistic(), Some(&r.durable)) => {}
                        _ => return false,
                    }
                    stack.extend(r.deps.iter());
                }
                // A dependency storage does not have is skipped by the full path too.
                Some(Residence::Absent) => {}
                _ => return false,
            }
        }
        true
    }

    /// The lazy path: answers from the stored known state when `id` is not in
    /// memory and the peer (which says it has the header) lacks nothing.
    fn answer_from_stored_known_state(&mut self, peer: PeerId, id: &CoId, force_known: bool) -> Lazy {
        let Some(p) = self.peers.get(&peer) else { return Lazy::Answered };
        let Some(theirs) = p.known.get(id).map(|k| k.optimistic()) else { return Lazy::FullPath };
        if !theirs.header {
            // It lacks the header of anything stored: only a full load helps.
            return Lazy::FullPath;
        }
        let stored = match self.slots.get(id).map(|s| &s.residence) {
            None | Some(Residence::Unknown) => {
                self.request_known_load(id);
                return Lazy::WaitForKnownState;
            }
            Some(Residence::LoadingKnown) => return Lazy::WaitForKnownState,
            Some(Residence::Shell(stored)) => stored,
            Some(Residence::InMemory(_)) | Some(Residence::Loading) | Some(Residence::Absent) => return Lazy::FullPath,
        };
        if !stored.peer_has_all(theirs) {
            return Lazy::FullPath;
        }
        let told = p.told_known.contains(id);
        if force_known || !told {
            let state = stored.clone();
            self.send_known(peer, state, false);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.told_known.insert(id.clone());
        }
        Lazy::Answered
    }

    /// One CoValue's part of `sendNewContent` (no dependency recursion).
    fn send_one(&mut self, peer: PeerId, id: &CoId, force_known: bool) {
        let Some(r) = self.slots.get(id).and_then(Slot::resident) else { return };
        let Some(p) = self.peers.get(&peer) else { return };
        let optimistic = p.known.get(id).map(|k| k.optimistic());
        let told = p.told_known.contains(id);
        if !optimistic.is_some_and(|k| peer_lacks_no_content(&r.state, k, Some(&r.durable))) {
            let memo = match self.content_memo.take() {
                Some(m) if m.id == *id && m.from.as_ref() == optimistic => m,
                _ => ContentMemo {
                    id: id.clone(),
                    from: optimistic.cloned(),
                    pieces: new_content_since(&r.state, optimistic, Some(&r.durable), self.config.piece_limit_bytes)
                        .into_iter()
                        .map(|piece| Outgoing::new(SyncMessage::Content(piece)))
                        .collect(),
                    ours: r.durable.known_state(id),
                },
            };
            if !memo.pieces.is_empty() {
                for piece in &memo.pieces {
                    self.send_shared(peer, piece.clone());
                }
                if let Some(k) = self.peer_known(peer, id) {
                    k.combine_optimistic(&memo.ours);
                }
                self.content_memo = Some(memo);
                self.mark_told(peer, id, told);
                return;
            }
            self.content_memo = Some(memo);
        }
        if force_known || !told {
            let Some(r) = self.slots.get(id).and_then(Slot::resident) else { return };
            // What we hold durably: a peer must never count on us for more.
            let mut state = r.durable.known_state(id);
            if r.state.deleted {
                if let Some(k) = self.peers.get(&peer).and_then(|p| p.known.get(id)) {
                    state.merge_sessions(&k.confirmed.sessions);
                }
            }
            self.send_known(peer, state, false);
        }
        self.mark_told(peer, id, told);
    }

    fn mark_told(&mut self, peer: PeerId, id: &CoId, already: bool) {
        if !already {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.told_known.insert(id.clone());
            }
        }
    }
}
