//! The debounce table of webhooks: which documents and CoValues changed, and when each is due.
//! Pure state (time is an input), so the rules are tested without a clock or a network.
//!
//! Rules (Hocuspocus' webhook extension is the model: a debounced `change`, a `create`):
//! - a change is sent `debounce` after the *last* change of that id, but never later than
//!   `max_wait` after the *first* unsent one, so a document edited without pause still reports;
//! - changes of one id while its delivery is in flight fold into the next delivery;
//! - `created` sticks until delivered: a burst that created the id is one `created` event;
//! - the table holds at most `capacity` ids; a change for a new id beyond that is dropped and
//!   counted (memory stays bounded whatever the write rate; the id is reported on its next
//!   change once there is room).

use std::collections::HashMap;
use std::time::Duration;

use moai_storage::ChangeKind;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub kind: ChangeKind,
    pub id: String,
}

#[derive(Debug)]
struct Entry {
    first: Instant,
    last: Instant,
    changes: u64,
    created: bool,
    /// A delivery of this id is in flight (changes meanwhile wait for the next one).
    in_flight: bool,
    /// Its next attempt may not start before this (retry backoff).
    not_before: Option<Instant>,
    attempts: u32,
}

/// One delivery to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Due {
    pub key: Key,
    pub created: bool,
    pub changes: u64,
    pub attempt: u32,
}

pub(crate) struct Pending {
    entries: HashMap<Key, Entry>,
    debounce: Duration,
    max_wait: Duration,
    capacity: usize,
    pub dropped: u64,
}

impl Pending {
    pub(crate) fn new(debounce: Duration, max_wait: Duration, capacity: usize) -> Self {
        Pending { entries: HashMap::new(), debounce, max_wait: max_wait.max(debounce), capacity, dropped: 0 }
    }

    pub(crate) fn changed(&mut self, key: Key, created: bool, now: Instant) {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.dropped += 1;
            return;
        }
        let e = self.entries.entry(key).or_insert(Entry {
            first: now,
            last: now,
            changes: 0,
            created: false,
            in_flight: false,
            not_before: None,
            attempts: 0,
        });
        if e.changes == 0 {
            e.first = now;
        }
        e.last = now;
        e.changes += 1;
        e.created |= created;
    }

    fn due_at(&self, e: &Entry) -> Option<Instant> {
        if e.in_flight || e.changes == 0 {
            return None;
        }
        let at = (e.last + self.debounce).min(e.first + self.max_wait);
        Some(e.not_before.map_or(at, |nb| at.max(nb)))
    }

    /// Deliveries due at `now` (marked in flight), at most `limit`.
    pub(crate) fn take_due(&mut self, now: Instant, limit: usize) -> Vec<Due> {
        let mut due: Vec<(Instant, Key)> = self
            .entries
            .iter()
            .filter_map(|(k, e)| self.due_at(e).filter(|at| *at <= now).map(|at| (at, k.clone())))
            .collect();
        due.sort_by_key(|(at, _)| *at);
        due.truncate(limit);
        due.into_iter()
            .filter_map(|(_, key)| {
                let e = self.entries.get_mut(&key)?;
                e.in_flight = true;
                e.attempts += 1;
                Some(Due { key, created: e.created, changes: e.changes, attempt: e.attempts })
            })
            .collect()
    }

    /// When the next delivery is due (to sleep until then).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| self.due_at(e)).min()
    }

    /// The delivery of `due` succeeded, or failed for good: what it reported is done. Changes
    /// made meanwhile stay for the next delivery.
    pub(crate) fn finished(&mut self, due: &Due) {
        let Some(e) = self.entries.get_mut(&due.key) else { return };
        e.in_flight = false;
        e.attempts = 0;
        e.not_before = None;
        e.changes = e.changes.saturating_sub(due.changes);
        if due.created {
            e.created = false;
        }
        if e.changes == 0 {
            self.entries.remove(&due.key);
        } else {
            e.first = e.last;
        }
    }

    /// The delivery failed and will be retried after `pause` (with whatever changed meanwhile).
    pub(crate) fn retry(&mut self, due: &Due, pause: Duration, now: Instant) {
        if let Some(e) = self.entries.get_mut(&due.key) {
            e.in_flight = false;
            e.not_before = Some(now + pause);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> Key {
        Key { kind: ChangeKind::YjsDocument, id: id.into() }
    }

    const D: Duration = Duration::from_millis(100);

    #[test]
    fn a_burst_is_one_delivery_after_the_last_change_and_created_sticks() {
        let t0 = Instant::now();
        let mut p = Pending::new(D, Duration::from_secs(10), 10);
        p.changed(key("a"), true, t0);
        p.changed(key("a"), false, t0 + Duration::from_millis(50));
        assert!(p.take_due(t0 + Duration::from_millis(120), 10).is_empty(), "debounced from the last change");
        assert_eq!(p.next_due(), Some(t0 + Duration::from_millis(150)));
        let due = p.take_due(t0 + Duration::from_millis(150), 10);
        assert_eq!(due, vec![Due { key: key("a"), created: true, changes: 2, attempt: 1 }]);
        p.finished(&due[0]);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn continuous_edits_still_report_after_max_wait() {
        let t0 = Instant::now();
        let mut p = Pending::new(D, Duration::from_millis(300), 10);
        for i in 0..10 {
            p.changed(key("a"), false, t0 + Duration::from_millis(50 * i));
        }
        let due = p.take_due(t0 + Duration::from_millis(300), 10);
        assert_eq!(due.len(), 1, "max wait reached although changes keep coming");
    }

    #[test]
    fn changes_during_a_delivery_and_retries_wait_for_the_next_one() {
        let t0 = Instant::now();
        let mut p = Pending::new(D, Duration::from_secs(1), 10);
        p.changed(key("a"), true, t0);
        let first = p.take_due(t0 + D, 10);
        p.changed(key("a"), false, t0 + D + Duration::from_millis(1));
        assert!(p.take_due(t0 + Duration::from_secs(5), 10).is_empty(), "one in flight at a time");
        // Fails: retried after the pause, still `created`, now with both changes.
        p.retry(&first[0], Duration::from_secs(2), t0 + D);
        assert!(p.take_due(t0 + Duration::from_secs(1), 10).is_empty());
        let again = p.take_due(t0 + D + Duration::from_secs(2), 10);
        assert_eq!(again, vec![Due { key: key("a"), created: true, changes: 2, attempt: 2 }]);
        p.finished(&again[0]);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut p = Pending::new(D, D, 2);
        for id in ["a", "b", "c"] {
            p.changed(key(id), false, t0);
        }
        assert_eq!((p.len(), p.dropped), (2, 1));
        p.changed(key("a"), false, t0);
        assert_eq!(p.dropped, 1, "known ids still fold in");
    }
}
