//! Which CoValues leave memory, and when.
//!
//! The relay says what *may* be evicted (no subscriber, nothing pending, nothing waiting); the
//! policy here is "idle for a whole tick": a CoValue is evicted when it was evictable at the
//! previous tick and still is. That approximates an idle timeout without the relay having to
//! report every touch, and keeps a CoValue that a peer loads, drops and reloads within a tick
//! from bouncing through storage. Evicted CoValues reload on demand.

use std::collections::HashSet;

use crate::ids::CoId;
use crate::relay::Relay;

#[derive(Default)]
pub(crate) struct Eviction {
    candidates: HashSet<CoId>,
}

impl Eviction {
    /// Evicts the CoValues idle since the previous tick; returns them.
    pub(crate) fn tick(&mut self, relay: &mut Relay) -> Vec<CoId> {
        let mut now: HashSet<CoId> = relay.evictable().into_iter().collect();
        let idle: Vec<CoId> = now.intersection(&self.candidates).cloned().collect();
        let mut evicted = Vec::new();
        for id in idle {
            if relay.evict(&id).is_ok() {
                now.remove(&id);
                evicted.push(id);
            }
        }
        // What became evictable during this tick gets one more tick of grace.
        self.candidates = now;
        evicted
    }
}
