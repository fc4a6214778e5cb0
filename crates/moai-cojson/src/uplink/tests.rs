//! The uplink between two real sans-IO relays (each with its in-memory store), with clients on
//! both: what one server's clients write reaches the other's, through fetches, live edits,
//! link drops, and an upstream that lost its data.

use super::*;
use crate::relay::{Event as RelayEvent, PeerId, Relay};
use crate::test_support::{kind, load, RelayHarness, World};

/// The link's own peer number on both relays.
const LINK: PeerId = PeerId(100);

struct Pair {
    local: RelayHarness,
    upstream: RelayHarness,
    uplink: Uplink,
    fetched: Vec<(FetchId, Fetched)>,
    /// Messages the link passed on, per destination (for volume assertions).
    passed: Vec<(Side, SyncMessage)>,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            local: RelayHarness::new(Relay::default()),
            upstream: RelayHarness::new(Relay::default()),
            uplink: Uplink::new(UplinkConfig::default()),
            fetched: Vec::new(),
            passed: Vec::new(),
        }
    }

    fn relay(&mut self, side: Side) -> &mut RelayHarness {
        match side {
            Side::Local => &mut self.local,
            Side::Upstream => &mut self.upstream,
        }
    }

    /// Runs an uplink event and everything it causes, persisting writes at once, until quiet.
    fn run(&mut self, event: Event) {
        let mut events = vec![event];
        loop {
            for event in std::mem::take(&mut events) {
                for action in self.uplink.handle(event) {
                    match action {
                        Action::Send(side, msg) => {
                            self.passed.push((side, msg.clone()));
                            if self.uplink.is_connected() {
                                self.relay(side).msg(LINK, msg);
                            }
                        }
                        Action::Fetched(f, outcome) => self.fetched.push((f, outcome)),
                    }
                }
            }
            for side in [Side::Local, Side::Upstream] {
                self.relay(side).persist_all();
                for msg in self.relay(side).take(LINK) {
                    events.push(Event::Message(side, msg));
                }
            }
            if events.is_empty() {
                return;
            }
        }
    }

    fn connect(&mut self) {
        self.local.run(RelayEvent::PeerConnected(LINK));
        self.upstream.run(RelayEvent::PeerConnected(LINK));
        self.run(Event::Connected);
    }

    fn disconnect(&mut self) {
        self.run(Event::Disconnected);
        self.local.run(RelayEvent::PeerDisconnected(LINK));
        self.upstream.run(RelayEvent::PeerDisconnected(LINK));
        self.local.take(LINK);
        self.upstream.take(LINK);
    }

    /// A client of `side` uploads messages (acked, durable) and the link carries what follows.
    fn client_writes(&mut self, side: Side, client: PeerId, msgs: Vec<SyncMessage>) {
        for msg in msgs {
            self.relay(side).msg(client, msg);
            self.relay(side).persist_all();
        }
        self.relay(side).take(client);
        let mut events = Vec::new();
        for msg in self.relay(side).take(LINK) {
            events.push(Event::Message(side, msg));
        }
        for e in events {
            self.run(e);
        }
    }

    /// Transactions each server holds of `id`, per session.
    fn stored(&self, side: Side, id: &CoId) -> Option<Vec<(String, usize)>> {
        let h = match side {
            Side::Local => &self.local,
            Side::Upstream => &self.upstream,
        };
        h.store.get(id).map(|s| {
            let mut v: Vec<_> = s.sessions.iter().map(|s| (s.session.to_string(), s.transactions.len())).collect();
            v.sort();
            v
        })
    }
}

/// Alice (a client of upstream) made an account, group and map there.
fn upstream_with_world() -> (Pair, World, PeerId) {
    let mut pair = Pair::new();
    let mut w = World::new();
    let alice = pair.upstream.connect(1);
    let msgs = vec![w.account_upload(), w.group_upload(), w.map_upload()];
    pair.client_writes(Side::Upstream, alice, msgs);
    (pair, w, alice)
}

#[test]
fn a_fetch_brings_a_map_and_its_dependencies_from_upstream() {
    let (mut pair, w, _) = upstream_with_world();
    pair.connect();
    pair.run(Event::Fetch(7, w.map.clone()));
    assert_eq!(pair.fetched, vec![(7, Fetched::Found)]);
    for id in [&w.alice.account, &w.group, &w.map] {
        assert_eq!(pair.stored(Side::Local, id), pair.stored(Side::Upstream, id), "{id} copied, verified and stored");
    }
    // A client of the local server loads it from there.
    let bob = pair.local.connect(2);
    pair.local.msg(bob, load(&w.map, None));
    let got: Vec<_> = pair.local.take(bob).iter().map(kind).collect();
    assert!(got.contains(&("content", w.map.to_string())), "{got:?}");
    // Asking again is answered at once from what the link saw.
    pair.run(Event::Fetch(8, w.map.clone()));
    assert_eq!(pair.fetched.last(), Some(&(8, Fetched::Found)));
}

#[test]
fn a_fetch_of_what_neither_server_has_is_not_found_and_offline_without_a_link() {
    let mut pair = Pair::new();
    let missing = CoId::parse("co_zNothingHere").unwrap();
    pair.run(Event::Fetch(1, missing.clone()));
    assert_eq!(pair.fetched, vec![(1, Fetched::Offline)]);
    pair.connect();
    pair.run(Event::Fetch(2, missing.clone()));
    assert_eq!(pair.fetched.last(), Some(&(2, Fetched::NotFound)));
    assert!(pair.stored(Side::Local, &missing).is_none());
}

#[test]
fn live_edits_cross_both_ways_once_followed() {
    let (mut pair, mut w, alice) = upstream_with_world();
    pair.connect();
    pair.run(Event::Fetch(1, w.map.clone()));
    // Upstream's client edits: the local server gets it.
    let edit = w.map_edit("from-upstream", 2000);
    pair.client_writes(Side::Upstream, alice, vec![edit]);
    assert_eq!(pair.stored(Side::Local, &w.map), pair.stored(Side::Upstream, &w.map));
    // A local client (the same account, another session of its writer) edits: upstream gets it.
    let bob = pair.local.connect(2);
    let edit = w.map_edit("from-local", 2001);
    pair.client_writes(Side::Local, bob, vec![edit]);
    assert_eq!(pair.stored(Side::Local, &w.map), pair.stored(Side::Upstream, &w.map));
    let count: usize = pair.stored(Side::Upstream, &w.map).unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(count, 3, "the upload and both edits, each once");
}

#[test]
fn after_a_drop_both_sides_catch_up_and_only_what_is_new_crosses() {
    let (mut pair, mut w, alice) = upstream_with_world();
    pair.connect();
    pair.run(Event::Fetch(1, w.map.clone()));
    pair.disconnect();
    // While the link is down, upstream's client writes; nothing passes.
    let edit = w.map_edit("while-down", 3000);
    pair.client_writes(Side::Upstream, alice, vec![edit]);
    assert_ne!(pair.stored(Side::Local, &w.map), pair.stored(Side::Upstream, &w.map));
    pair.passed.clear();
    pair.connect();
    assert_eq!(pair.stored(Side::Local, &w.map), pair.stored(Side::Upstream, &w.map));
    // The kick started from upstream's last state: the account and group, unchanged, crossed
    // as states only, and the map's content carried only the new transaction.
    let contents: Vec<&SyncMessage> =
        pair.passed.iter().filter(|(_, m)| matches!(m, SyncMessage::Content(_))).map(|(_, m)| m).collect();
    assert_eq!(contents.len(), 1, "{:?}", pair.passed.iter().map(|(s, m)| (s, kind(m))).collect::<Vec<_>>());
    let SyncMessage::Content(c) = contents[0] else { unreachable!() };
    assert_eq!(c.id, w.map);
    assert_eq!(c.new.iter().map(|(_, s)| s.new_transactions.len()).sum::<usize>(), 1);
    assert!(c.header.is_none());
}

#[test]
fn an_upstream_that_lost_its_data_gets_everything_again() {
    let (mut pair, w, _) = upstream_with_world();
    pair.connect();
    pair.run(Event::Fetch(1, w.map.clone()));
    pair.disconnect();
    // Upstream comes back empty (restored from nothing): the link's idea of it is stale.
    pair.upstream = RelayHarness::new(Relay::default());
    pair.connect();
    for id in [&w.alice.account, &w.group, &w.map] {
        assert_eq!(pair.stored(Side::Upstream, id), pair.stored(Side::Local, id), "{id} pushed again");
        assert!(pair.stored(Side::Upstream, id).is_some());
    }
}

#[test]
fn followed_local_content_reaches_an_upstream_that_never_had_it() {
    // The server's own account lives locally; following it pushes it upstream (so clients
    // there can add the account to their groups).
    let mut pair = Pair::new();
    let mut w = World::new();
    let me = pair.local.connect(1);
    let msgs = vec![w.account_upload(), w.group_upload(), w.map_upload()];
    pair.client_writes(Side::Local, me, msgs);
    pair.run(Event::Follow(w.map.clone()));
    assert!(pair.stored(Side::Upstream, &w.map).is_none(), "nothing passes without a link");
    pair.connect();
    for id in [&w.alice.account, &w.group, &w.map] {
        assert_eq!(pair.stored(Side::Upstream, id), pair.stored(Side::Local, id), "{id}");
    }
    assert!(pair.uplink.follows(&w.group) && pair.uplink.follows(&w.alice.account), "dependencies are followed");
}

#[test]
fn the_followed_set_is_bounded() {
    let mut pair = Pair::new();
    pair.uplink = Uplink::new(UplinkConfig { max_followed: 2 });
    for n in 0..5 {
        pair.run(Event::Follow(CoId::parse(&format!("co_zId{n}")).unwrap()));
    }
    assert_eq!(pair.uplink.followed_count(), 2);
}

#[test]
fn pending_fetches_are_bounded() {
    let mut pair = Pair::new();
    pair.connect();
    // Upstream never answers these (the link is up, but the messages go nowhere here).
    pair.uplink.handle(Event::Disconnected);
    pair.uplink.handle(Event::Connected);
    let mut answered = Vec::new();
    for n in 0..(MAX_PENDING_FETCHES as u64 + 3) {
        for action in pair.uplink.handle(Event::Fetch(n, CoId::parse(&format!("co_zF{n}")).unwrap())) {
            if let Action::Fetched(f, outcome) = action {
                answered.push((f, outcome));
            }
        }
    }
    assert_eq!(answered, vec![(0, Fetched::Offline), (1, Fetched::Offline), (2, Fetched::Offline)]);
}

#[test]
fn what_a_fetch_did_not_find_is_not_followed_afterwards() {
    // Any caller of the agent API may ask for any id: ids that name nothing must not pile up
    // (each followed CoValue is kicked on every link, and costs upstream a subscription).
    let mut pair = Pair::new();
    pair.connect();
    for n in 0..50u64 {
        pair.run(Event::Fetch(n, CoId::parse(&format!("co_zNothing{n}")).unwrap()));
    }
    assert_eq!(pair.fetched.len(), 50);
    assert!(pair.fetched.iter().all(|(_, outcome)| *outcome == Fetched::NotFound));
    assert_eq!(pair.uplink.followed_count(), 0);
    // Nor what a fetch was asked for while the link was down.
    pair.disconnect();
    pair.run(Event::Fetch(99, CoId::parse("co_zNothingOffline").unwrap()));
    assert_eq!(pair.fetched.last(), Some(&(99, Fetched::Offline)));
    assert_eq!(pair.uplink.followed_count(), 0);
}

#[test]
fn a_fetch_beyond_the_followed_bound_is_served_but_not_kept() {
    let (mut pair, w, _) = upstream_with_world();
    pair.uplink = Uplink::new(UplinkConfig { max_followed: 0 });
    pair.connect();
    pair.run(Event::Fetch(1, w.map.clone()));
    assert_eq!(pair.fetched, vec![(1, Fetched::Found)]);
    assert_eq!(pair.stored(Side::Local, &w.map), pair.stored(Side::Upstream, &w.map), "brought all the same");
    assert_eq!(pair.uplink.followed_count(), 0);
}

#[test]
fn what_a_fetch_found_is_kept_within_the_bound_and_an_explicit_follow_keeps_it_too() {
    let (mut pair, w, _) = upstream_with_world();
    pair.connect();
    pair.run(Event::Fetch(1, w.map.clone()));
    assert!(pair.uplink.follows(&w.map));
    pair.run(Event::Follow(w.map.clone()));
    // Kept across links and a later fetch that finds it at once.
    pair.disconnect();
    pair.connect();
    pair.run(Event::Fetch(2, w.map.clone()));
    assert_eq!(pair.fetched.last(), Some(&(2, Fetched::Found)));
    assert!(pair.uplink.follows(&w.map));
}
