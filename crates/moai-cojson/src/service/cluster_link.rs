//! The relay task's link to the other instances (cluster; docs/cluster.md): one bus topic per
//! CoValue this instance holds, joined before the CoValue is read from storage (so a change
//! committed after the read is announced to us) and left when it is evicted.
//!
//! What crosses is a CoValue's durable known state, as a cojson `known` message: the relay
//! decides what to do with it (`relay/cluster.rs`); this file only carries it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moai_cluster::{Bus, BusEvent, Inbox, Joiner, Membership};
use serde_json::Map;

use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::message::{KnownMessage, SyncMessage};
use crate::relay::Event;

/// A CoValue's durable known state, as announced by the instance that wrote it.
const KNOWN: u8 = b'k';

pub(crate) struct ClusterLink {
    pub inbox: Inbox,
    joiner: Joiner,
    members: HashMap<CoId, Membership>,
    /// How often the known states of subscribed CoValues are announced again.
    pub exchange: Duration,
}

fn topic(id: &CoId) -> String {
    format!("c:{}", id.as_str())
}

impl ClusterLink {
    pub(crate) fn new(bus: &Bus, exchange: Duration) -> Self {
        let inbox = bus.inbox();
        let joiner = inbox.joiner();
        ClusterLink { inbox, joiner, members: HashMap::new(), exchange }
    }

    /// What a storage read of `id` must do first: join its topic, unless this instance has.
    pub(crate) fn join_before_read(&self, id: &CoId) -> Option<PendingJoin> {
        (!self.members.contains_key(id)).then(|| PendingJoin { joiner: self.joiner.clone(), id: id.clone() })
    }

    pub(crate) fn joined(&mut self, id: CoId, membership: Membership) {
        self.members.insert(id, membership);
    }

    pub(crate) fn leave(&mut self, id: &CoId) {
        self.members.remove(id);
    }

    pub(crate) fn announce(&self, id: &CoId, known: KnownState) {
        if let Some(m) = self.members.get(id) {
            let msg = KnownMessage { state: known, is_correction: false, as_dependency_of: None, extra: Map::new() };
            m.publish(KNOWN, Bytes::from(SyncMessage::Known(msg).to_json()));
        }
    }

    /// What the relay should hear about an event of the bus, if anything.
    pub(crate) fn event(topic: &Arc<str>, event: BusEvent) -> Option<Event> {
        let id = CoId::parse(topic.strip_prefix("c:")?).ok()?;
        match event {
            BusEvent::Message { kind: KNOWN, payload, .. } => {
                let text = std::str::from_utf8(&payload).ok()?;
                match SyncMessage::from_json(text).ok()? {
                    SyncMessage::Known(k) if k.state.id == id => {
                        Some(Event::ChangedElsewhere { id, known: Some(k.state) })
                    }
                    _ => None,
                }
            }
            BusEvent::Message { .. } => None,
            BusEvent::Resync => Some(Event::ChangedElsewhere { id, known: None }),
            // CoJSON has no presence to remove.
            BusEvent::InstanceGone(_) => None,
        }
    }
}

/// A join to perform in a storage read task, before the read.
pub(crate) struct PendingJoin {
    joiner: Joiner,
    id: CoId,
}

impl PendingJoin {
    pub(crate) async fn join(self) -> (CoId, Membership) {
        let membership = self.joiner.join(&topic(&self.id)).await;
        (self.id, membership)
    }
}
