//! What one moai instance tells the others about a document they all serve (docs/cluster.md).
//!
//! Every message is a `(kind, payload)` pair on the document's topic. An update is published
//! only after its journal append committed, so a receiver applies it and shows it to its own
//! sockets without storing it again. Messages can be lost (Redis down, a stream trimmed past a
//! slow reader); the periodic [`STATE`] exchange repairs any difference, and a resync from
//! storage covers the rest.

use std::collections::HashMap;
use std::ops::Range;

use yrs::block::ClientID;
use yrs::{IdSet, Snapshot};

/// A v1 update, durable on its sender's storage (which all instances share).
pub const UPDATE: u8 = b'u';
/// An awareness update about the sender's own clients (states and removals).
pub const AWARENESS: u8 = b'a';
/// The sender's snapshot of the document (state vector and delete set, yrs' `Snapshot` v1):
/// "this is what I have". A receiver with more answers with an [`UPDATE`] carrying what the
/// sender lacks; a receiver that lacks something answers with its own `STATE`.
pub const STATE: u8 = b's';
/// "Announce your clients' presence": sent after a resync, when this instance may have lost
/// track of the others' presence (they may have expired it too).
pub const ASK_PRESENCE: u8 = b'p';
/// A Hocuspocus stateless message (its UTF-8 payload) for the document's Hocuspocus
/// connections on the other instances.
pub const STATELESS: u8 = b'x';

/// How two snapshots of one document differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Difference {
    /// `ours` has structs or deletions `theirs` lacks.
    pub we_have_more: bool,
    /// `theirs` has structs or deletions `ours` lacks.
    pub they_have_more: bool,
}

pub(crate) fn compare(ours: &Snapshot, theirs: &Snapshot) -> Difference {
    let ahead = |a: &Snapshot, b: &Snapshot| a.state_map.iter().any(|(client, clock)| *clock > b.state_map.get(client));
    Difference {
        we_have_more: ahead(ours, theirs) || !covers(&theirs.delete_set, &ours.delete_set),
        they_have_more: ahead(theirs, ours) || !covers(&ours.delete_set, &theirs.delete_set),
    }
}

/// Whether every deleted range of `inner` is also deleted in `outer`.
pub(crate) fn covers(outer: &IdSet, inner: &IdSet) -> bool {
    let mut by_client: HashMap<ClientID, Vec<Range<u32>>> = HashMap::new();
    for (client, ranges) in outer.iter() {
        let mut merged: Vec<Range<u32>> = ranges.iter().cloned().collect();
        merged.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u32>> = Vec::with_capacity(merged.len());
        for r in merged {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        by_client.insert(*client, out);
    }
    inner.iter().all(|(client, ranges)| {
        let outer = by_client.get(client).map(Vec::as_slice).unwrap_or(&[]);
        ranges.iter().filter(|r| r.start < r.end).all(|r| {
            // The merged range that starts at or before r.start must reach r.end.
            let i = outer.partition_point(|o| o.start <= r.start);
            i > 0 && outer[i - 1].end >= r.end
        })
    })
}

#[cfg(test)]
mod tests {
    use yrs::{Doc, ReadTxn, Text, Transact};

    use super::*;

    fn snapshot(doc: &Doc) -> Snapshot {
        doc.transact().snapshot()
    }

    #[test]
    fn snapshots_compare_by_structs_and_by_deletions() {
        let a = Doc::with_client_id(1);
        let t = a.get_or_insert_text("t");
        t.insert(&mut a.transact_mut(), 0, "hello world");
        let b = Doc::with_client_id(2);
        let update = a.transact().encode_state_as_update_v1(&Default::default());
        b.transact_mut().apply_update(yrs::Update::decode_v1(&update).unwrap()).unwrap();
        assert_eq!(compare(&snapshot(&a), &snapshot(&b)), Difference::default());

        // A deletion changes no state vector, and is still seen.
        t.remove_range(&mut a.transact_mut(), 0, 6);
        assert_eq!(compare(&snapshot(&a), &snapshot(&b)), Difference { we_have_more: true, they_have_more: false });
        assert_eq!(compare(&snapshot(&b), &snapshot(&a)), Difference { we_have_more: false, they_have_more: true });

        // Both sides ahead.
        let tb = b.get_or_insert_text("t");
        tb.insert(&mut b.transact_mut(), 0, "x");
        assert_eq!(compare(&snapshot(&a), &snapshot(&b)), Difference { we_have_more: true, they_have_more: true });
    }

    use yrs::updates::decoder::Decode;

    #[test]
    fn deleted_ranges_are_covered_across_fragments() {
        let mut outer = IdSet::default();
        outer.insert(yrs::ID::new(ClientID::new(1), 0), 5);
        outer.insert(yrs::ID::new(ClientID::new(1), 5), 5);
        let mut inner = IdSet::default();
        inner.insert(yrs::ID::new(ClientID::new(1), 2), 7);
        assert!(covers(&outer, &inner));
        inner.insert(yrs::ID::new(ClientID::new(1), 12), 1);
        assert!(!covers(&outer, &inner));
        let mut other_client = IdSet::default();
        other_client.insert(yrs::ID::new(ClientID::new(2), 0), 1);
        assert!(!covers(&outer, &other_client));
        assert!(covers(&outer, &IdSet::default()));
    }
}
