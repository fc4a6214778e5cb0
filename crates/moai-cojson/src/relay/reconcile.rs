//! `reconcile` / `reconcile-ack` (docs/protocols/cojson.md §11.7, cojson's `handleReconcile`).
//!
//! A client with local storage periodically lists, in batches, every
//! CoValue it stores with a short hash of its session counts. For each
//! entry we compare with our own known state (when the CoValue is not in
//! memory, the stored known state, read without its transactions):
//! * unknown to us → `load {header:false}` (the client then uploads it);
//! * different hash → `load` with our known state (the client sends what we
//!   lack, or tells us what it has);
//! * same → nothing.
//!
//! `reconcile-ack` goes out once every entry is compared and every CoValue
//! we sent a `load` for has been settled by a `known` or `content` from that
//! peer. (cojson only starts tracking settlements after the last entry is
//! compared and can miss an early one; we count them from the start.)

use super::peer::ReconcileBatch;
use super::slot::{Job, Residence};
use super::{PeerId, Relay};
use crate::crypto::short_hash;
use crate::ids::CoId;
use crate::known_state::{KnownState, SessionCounts};
use crate::message::SyncMessage;
use serde_json::{Map, Number, Value};

/// `shortHash(sessions)` as the client computes it.
pub fn sessions_hash(sessions: &SessionCounts) -> String {
    let obj: Map<String, Value> =
        sessions.iter().map(|(s, c)| (s.as_str().to_string(), Value::Number(Number::from(*c)))).collect();
    short_hash(&Value::Object(obj)).to_z_string()
}

impl Relay {
    pub(super) fn on_reconcile(&mut self, peer: PeerId, batch: String, values: Vec<(CoId, String)>) {
        if values.is_empty() {
            self.send(peer, SyncMessage::ReconcileAck(batch));
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else { return };
        p.reconcile.insert(batch.clone(), ReconcileBatch { unresolved: values.len(), pending: Default::default() });
        for (id, hash) in values {
            self.reconcile_entry(peer, batch.clone(), id, hash);
        }
    }

    pub(super) fn reconcile_entry(&mut self, peer: PeerId, batch: String, id: CoId, hash: String) {
        let errored = self.peers.get(&peer).is_none_or(|p| p.errored.contains(&id));
        // What to send: nothing (errored, or same hash), or a `load`.
        let load = if errored {
            None
        } else {
            match self.slots.get(&id).map(|s| &s.residence) {
                // What we hold durably: the client keeps offering what we might still lose.
                Some(Residence::InMemory(r)) => {
                    let state = r.durable.known_state(&id);
                    (sessions_hash(&state.sessions) != hash).then_some(state)
                }
                Some(Residence::Shell(state)) => (sessions_hash(&state.sessions) != hash).then(|| state.clone()),
                Some(Residence::Absent) => Some(KnownState::empty(id.clone())),
                Some(Residence::Unknown) | None => {
                    self.request_known_load(&id);
                    self.park(&id, Job::Reconcile { peer, batch, id: id.clone(), hash });
                    return;
                }
                Some(Residence::Loading) | Some(Residence::LoadingKnown) => {
                    self.park(&id, Job::Reconcile { peer, batch, id: id.clone(), hash });
                    return;
                }
            }
        };
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let Some(b) = p.reconcile.get_mut(&batch) else { return };
        b.unresolved = b.unresolved.saturating_sub(1);
        if let Some(state) = load {
            b.pending.insert(id.clone());
            p.told_known.insert(id.clone());
            self.send(peer, SyncMessage::Load(state, Map::new()));
        }
        self.maybe_ack_batch(peer, &batch);
    }

    /// A `known` or `content` about `id` arrived from `peer`.
    pub(super) fn reconcile_settled(&mut self, peer: PeerId, id: &CoId) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if p.reconcile.is_empty() {
            return;
        }
        let mut touched: Vec<String> =
            p.reconcile.iter_mut().filter_map(|(k, b)| b.pending.remove(id).then(|| k.clone())).collect();
        touched.sort();
        for batch in touched {
            self.maybe_ack_batch(peer, &batch);
        }
    }

    fn maybe_ack_batch(&mut self, peer: PeerId, batch: &str) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let done = p.reconcile.get(batch).is_some_and(|b| b.unresolved == 0 && b.pending.is_empty());
        if done {
            p.reconcile.remove(batch);
            self.send(peer, SyncMessage::ReconcileAck(batch.to_string()));
        }
    }
}
