//! Other moai instances serving the same CoValues (cluster; docs/cluster.md).
//!
//! Every instance writes to the same storage and announces, once a write is durable, its new
//! known state of the CoValue ([`Action::Announce`]). An instance that holds the CoValue and
//! sees an announcement it is behind reads the CoValue back from storage
//! ([`Action::Refresh`]) and sends its own subscribers what they lack, exactly as after one of
//! its own writes. Storage is the source of truth: nothing crosses instances that is not
//! durable, and an announcement that is lost is repaired by the periodic exchange of known
//! states ([`Relay::announcements`]) or by a resync (a refresh without an announcement).
//!
//! A CoValue with local writes in flight is refreshed only once they are durable: its memory
//! must never be replaced while the relay still owes acks for it. If another instance appended
//! to one of its sessions meanwhile, storage refuses our append (its `after` no longer
//! matches) and the CoValue reloads, as after any failed write.

use super::slot::{Refresh, Residence, Resident, Slot};
use super::{Action, Diagnostic, Relay};
use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::persistence::{rebuild, StoredCoValue};

impl Relay {
    /// Another instance made `id` durable up to `known` (`None`: something may have been
    /// missed; compare with storage).
    pub(super) fn on_changed_elsewhere(&mut self, id: CoId, known: Option<KnownState>) {
        let subscribed = self.subscribers.get(&id).is_some_and(|s| !s.is_empty());
        let Some(slot) = self.slots.get_mut(&id) else { return };
        let behind = |ours: &KnownState| known.as_ref().is_none_or(|k| !k.missing_in(ours).is_empty());
        match &slot.residence {
            Residence::InMemory(r) => {
                if !behind(&r.durable.known_state(&id)) {
                    return;
                }
                if !r.pending.is_empty() {
                    slot.refresh = Refresh::AfterPending;
                    return;
                }
            }
            Residence::Shell(stored) => {
                if !behind(stored) {
                    return;
                }
                if !subscribed {
                    // Stale now; the next use reads it again.
                    slot.residence = Residence::Unknown;
                    return;
                }
            }
            Residence::Absent => {
                if !subscribed {
                    slot.residence = Residence::Unknown;
                    return;
                }
            }
            // The read in flight may have started before the change committed.
            Residence::Loading | Residence::LoadingKnown => {
                slot.refresh = Refresh::AfterLoad;
                return;
            }
            Residence::Unknown => return,
        }
        self.start_refresh(&id);
    }

    fn start_refresh(&mut self, id: &CoId) {
        let Some(slot) = self.slots.get_mut(id) else { return };
        match slot.refresh {
            Refresh::InFlight | Refresh::InFlightAgain => slot.refresh = Refresh::InFlightAgain,
            _ => {
                slot.refresh = Refresh::InFlight;
                self.out.push(Action::Refresh(id.clone()));
            }
        }
    }

    /// The answer to [`Action::Refresh`]: what storage holds of `id` now.
    pub(super) fn on_refreshed(&mut self, id: CoId, stored: Option<StoredCoValue>) {
        let Some(slot) = self.slots.get_mut(&id) else { return };
        let again = matches!(slot.refresh, Refresh::InFlightAgain);
        slot.refresh = Refresh::Idle;
        if slot.resident().is_some_and(|r| !r.pending.is_empty()) {
            // Our own writes went out meanwhile: refresh once they are durable.
            slot.refresh = Refresh::AfterPending;
            return;
        }
        let state = match stored.map(|s| rebuild(&id, s)) {
            None => None,
            Some(Ok(state)) => Some(state),
            Some(Err(error)) => {
                self.diagnostic(Diagnostic::StorageCorrupt { id: id.clone(), error });
                None
            }
        };
        if let Some(state) = state {
            let Some(slot) = self.slots.get_mut(&id) else { return };
            slot.residence = Residence::InMemory(Box::new(Resident::stored(state)));
            self.content_memo = None;
            // As after one of our own writes: every subscriber gets what it lacks.
            self.answer_subscribers(&id);
            self.wake(&id);
        }
        if again {
            self.start_refresh(&id);
        }
    }

    /// Called when a slot's pending writes or its load finished: a refresh that had to wait
    /// starts now.
    pub(super) fn refresh_if_waiting(&mut self, id: &CoId) {
        let Some(slot) = self.slots.get(id) else { return };
        let due = match slot.refresh {
            Refresh::AfterPending => slot.resident().is_none_or(|r| r.pending.is_empty()),
            Refresh::AfterLoad => !matches!(slot.residence, Residence::Loading | Residence::LoadingKnown),
            _ => false,
        };
        if due {
            if let Some(slot) = self.slots.get_mut(id) {
                slot.refresh = Refresh::Idle;
            }
            self.on_changed_elsewhere(id.clone(), None);
        }
    }

    /// Tells the other instances what is now durable of `id` (only in a cluster).
    pub(super) fn announce(&mut self, id: &CoId) {
        if !self.config.announce_durable {
            return;
        }
        if let Some(r) = self.slots.get(id).and_then(Slot::resident) {
            self.out.push(Action::Announce { id: id.clone(), known: r.durable.known_state(id) });
        }
    }

    /// The durable known states of the CoValues in memory that peers here are subscribed to:
    /// what this instance tells the others periodically, so that an announcement the bus lost
    /// is repaired.
    pub fn announcements(&self) -> Vec<(CoId, KnownState)> {
        self.slots
            .iter()
            .filter(|(id, _)| self.subscribers.get(*id).is_some_and(|s| !s.is_empty()))
            .filter_map(|(id, slot)| slot.resident().map(|r| (id.clone(), r.durable.known_state(id))))
            .collect()
    }
}
