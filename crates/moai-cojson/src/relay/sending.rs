//! Sending a peer what it lacks, dependencies first (cojson's
//! `sendNewContent` for a peer in role "client").
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

use super::slot::{Job, Residence};
use super::{Relay, Slot};
use crate::content_pieces::new_content_since;
use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::message::SyncMessage;
use std::collections::HashSet;

use super::PeerId;

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
                Some(Residence::InMemory(r)) => {
                    stack.push((node.clone(), true));
                    for dep in r.deps.iter().rev() {
                        if !visited.contains(dep) {
                            stack.push((dep.clone(), false));
                        }
                    }
                }
                Some(Residence::Absent) => {}
                Some(Residence::Loading) => {
                    missing.get_or_insert(node);
                }
                None | Some(Residence::Unknown) => {
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

    /// One CoValue's part of `sendNewContent` (no dependency recursion).
    fn send_one(&mut self, peer: PeerId, id: &CoId, force_known: bool) {
        let Some(r) = self.slots.get(id).and_then(Slot::resident) else { return };
        let Some(p) = self.peers.get(&peer) else { return };
        let optimistic = p.known.get(id).map(|k| k.optimistic());
        let pieces = new_content_since(&r.state, optimistic, self.config.piece_limit_bytes);
        let ours = r.state.known_state();
        let told = p.told_known.contains(id);
        if !pieces.is_empty() {
            for piece in pieces {
                self.send(peer, SyncMessage::Content(piece));
            }
            if let Some(k) = self.peer_known(peer, id) {
                k.combine_optimistic(&ours);
            }
        } else if force_known || !told {
            let mut state = ours;
            if r.state.deleted {
                if let Some(k) = p.known.get(id) {
                    state.merge_sessions(&k.confirmed.sessions);
                }
            }
            self.send_known(peer, state, false);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.told_known.insert(id.clone());
        }
    }
}
