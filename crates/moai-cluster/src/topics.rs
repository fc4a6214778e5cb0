//! The topics this instance has joined: per topic, where its stream has been read up to, the
//! queue to its owner (bounded in bytes), and the instances heard from on it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::bus::BusEvent;
use crate::stream_reply::StreamId;
use crate::InstanceId;

pub(crate) struct TopicEntry {
    /// Which join this is: a topic joined again (a document reloaded) replaces the entry, and
    /// only the newest join's drop removes it.
    pub join_id: u64,
    /// The Redis stream key.
    pub key: Vec<u8>,
    /// Read up to here. `None`: unknown (joined while Redis was unreachable, or the link was
    /// lost); the reader resolves it to the stream's end and asks the owner to resync.
    pub cursor: Option<StreamId>,
    /// Entries ever added to the stream when it was read up to `cursor` (gap detection:
    /// [`crate::stream_reply::StreamInfo::has_gap_after`]).
    pub added_at_cursor: u64,
    pub sink: Sink,
    /// Bytes of messages in the sink's queue (the owner subtracts what it takes; shared by
    /// every topic of an [`crate::Inbox`]).
    pub queued: Arc<AtomicUsize>,
    /// A message was dropped or missed: the owner must resync, told once its queue has room.
    pub resync_pending: bool,
    /// Instances that published on this topic (told when one of them is gone).
    pub peers: HashSet<InstanceId>,
}

/// Where a topic's events go: its own queue ([`crate::Topic`]) or an inbox shared by many
/// topics, tagged with the topic's name ([`crate::Inbox`]).
pub(crate) enum Sink {
    Own(mpsc::UnboundedSender<BusEvent>),
    Shared(mpsc::UnboundedSender<(Arc<str>, BusEvent)>, Arc<str>),
}

impl Sink {
    pub(crate) fn send(&self, event: BusEvent) -> bool {
        match self {
            Sink::Own(s) => s.send(event).is_ok(),
            Sink::Shared(s, name) => s.send((name.clone(), event)).is_ok(),
        }
    }
}

#[derive(Default)]
pub(crate) struct Topics {
    pub by_name: HashMap<String, TopicEntry>,
    /// Stream key → topic name, for reading replies.
    pub by_key: HashMap<Vec<u8>, String>,
    pub next_join: u64,
}

impl Topics {
    pub(crate) fn insert(&mut self, name: String, mut entry: TopicEntry) -> u64 {
        self.next_join += 1;
        entry.join_id = self.next_join;
        self.by_key.insert(entry.key.clone(), name.clone());
        self.by_name.insert(name, entry);
        self.next_join
    }

    pub(crate) fn remove(&mut self, name: &str, join_id: u64) {
        if self.by_name.get(name).is_some_and(|e| e.join_id == join_id) {
            if let Some(e) = self.by_name.remove(name) {
                self.by_key.remove(&e.key);
            }
        }
    }

    /// Asks every topic to resync (and forget what it read, when `forget_cursors`).
    pub(crate) fn resync_all(&mut self, forget_cursors: bool) {
        for e in self.by_name.values_mut() {
            e.resync_pending = true;
            if forget_cursors {
                e.cursor = None;
            }
        }
    }
}

impl TopicEntry {
    /// Hands a message to the owner unless its queue is over `budget` bytes; a dropped message
    /// makes the topic resync. Returns whether it was delivered.
    pub(crate) fn deliver(&mut self, event: BusEvent, bytes: usize, budget: usize) -> bool {
        let queued = self.queued.load(Ordering::Relaxed);
        if queued > 0 && queued + bytes > budget {
            self.resync_pending = true;
            return false;
        }
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        if !self.sink.send(event) {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Tells the owner to resync if one is pending and its queue has drained below half the
    /// budget. Returns whether it was told.
    pub(crate) fn flush_resync(&mut self, budget: usize) -> bool {
        if self.resync_pending && self.queued.load(Ordering::Relaxed) <= budget / 2 {
            self.resync_pending = false;
            return self.sink.send(BusEvent::Resync);
        }
        false
    }
}
