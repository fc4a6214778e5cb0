//! Scenario tests of the relay state machine: two or more peers, real
//! signed content, a simulated storage driver.

use crate::ids::{CoId, SessionId};
use crate::known_state::KnownState;
use crate::message::{KnownMessage, ReconcileMessage, SyncMessage};
use crate::persistence::StoredKnown;
use crate::relay::{CloseReason, Diagnostic, Event, NotEvictable, PeerId, Relay, RelayConfig};
use crate::test_support::*;
use crate::verify::VerifyError;
use serde_json::{json, Map, Value};

fn relay() -> RelayHarness {
    RelayHarness::new(Relay::default())
}

fn sid(s: &str) -> SessionId {
    SessionId::parse(s).unwrap()
}

/// Alice (peer 1) uploads her account, group and map; all persisted.
fn uploaded() -> (RelayHarness, World, PeerId) {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let (acc, grp, map) = (w.account_upload(), w.group_upload(), w.map_upload());
    d.msg(a, acc);
    d.msg(a, grp);
    d.msg(a, map);
    d.persist_all();
    d.take(a);
    (d, w, a)
}

#[test]
fn upload_is_acked_only_after_persisted_and_load_gets_dependencies_first() {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let (acc, grp, map) = (w.account_upload(), w.group_upload(), w.map_upload());
    d.msg(a, acc);
    d.msg(a, grp);
    d.msg(a, map);
    // Three writes, in dependency order, nothing acked yet.
    let written: Vec<CoId> = d.persists.iter().map(|p| p.id.clone()).collect();
    assert_eq!(written, vec![w.alice.account.clone(), w.group.clone(), w.map.clone()]);
    assert!(d.persists.iter().all(|p| p.header.is_some()));
    assert!(d.take(a).is_empty(), "no ack before durability");

    d.persist_all();
    let acks = d.take(a);
    assert_eq!(
        acks.iter().map(kind).collect::<Vec<_>>(),
        vec![("known", w.alice.account.to_string()), ("known", w.group.to_string()), ("known", w.map.to_string())]
    );
    let map_ack = known_of(&acks[2]);
    assert!(map_ack.header);
    assert_eq!(map_ack.count(&sid(&w.map_writer.session)), 1);

    // Bob loads the map knowing nothing: account, group, then map, each with its header.
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    let got = d.take(b);
    assert_eq!(
        got.iter().map(kind).collect::<Vec<_>>(),
        vec![
            ("content", w.alice.account.to_string()),
            ("content", w.group.to_string()),
            ("content", w.map.to_string())
        ]
    );
    for m in &got {
        let c = as_content(m);
        assert!(c.header.is_some());
        assert_eq!(c.new.len(), 1);
    }
    // Content is forwarded exactly as received.
    let map_content = as_content(&got[2]);
    assert_eq!(map_content.header.as_ref(), Some(&w.map_header));
    assert_eq!(map_content.new[0].0, w.map_writer.session);
    // Loading (and receiving dependencies) subscribes.
    for id in [&w.alice.account, &w.group, &w.map] {
        assert!(d.relay.is_subscribed(b, id));
    }
    // Alice receives nothing from Bob's load.
    assert!(d.take(a).is_empty());
}

#[test]
fn live_edit_is_forwarded_and_acked_once_it_is_durable() {
    let (mut d, mut w, a) = uploaded();
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    d.take(b);

    let edit = w.map_edit("n", 2000);
    d.msg(a, edit);
    // Nothing leaves before the write is durable: not Alice's ack, not Bob's copy (a crash now
    // must not leave Bob with content the relay forgot).
    assert!(d.take(a).is_empty());
    assert!(d.take(b).is_empty());
    assert_eq!(d.unpersisted.len(), 1);
    // A load meanwhile is told only the durable state.
    let c2 = d.connect(3);
    d.msg(c2, load(&w.map, Some(d.relay.known_state(&w.map).unwrap())));
    let told: Vec<_> = d.take(c2).into_iter().filter(|m| kind(m) == ("known", w.map.to_string())).collect();
    assert_eq!(told.len(), 1);
    assert_eq!(known_of(&told[0]).count(&sid(&w.map_writer.session)), 1, "not the write in flight");
    d.persist_all();
    // Forwarded to Bob: only the new transaction, no header, no deps.
    let fwd = d.take(b);
    assert_eq!(fwd.len(), 1);
    let c = as_content(&fwd[0]);
    assert!(c.header.is_none());
    assert_eq!(c.new[0].1.after, 1);
    assert_eq!(c.new[0].1.new_transactions.len(), 1);
    let ack = d.take(a);
    assert_eq!(ack.len(), 1);
    assert_eq!(known_of(&ack[0]).count(&sid(&w.map_writer.session)), 2);
    // Bob's ack of the forwarded content produces nothing more.
    d.msg(
        b,
        SyncMessage::Known(KnownMessage {
            state: d.relay.known_state(&w.map).unwrap(),
            is_correction: false,
            as_dependency_of: None,
            extra: Map::new(),
        }),
    );
    assert!(d.take(b).is_empty());
    // The store holds both transactions.
    assert_eq!(d.store[&w.map].sessions[0].transactions.len(), 2);
}

#[test]
fn fan_out_to_peers_at_the_same_state_shares_one_message_and_acks_cost_nothing() {
    let (mut d, mut w, a) = uploaded();
    let (b, c, e) = (d.connect(2), d.connect(3), d.connect(4));
    for p in [b, c, e] {
        d.msg(p, load(&w.map, None));
        d.take(p);
    }
    // Eve reports a session the relay does not have: another known state, so the content she
    // gets is built for her (equal, not shared).
    let mut other = d.relay.known_state(&w.map).unwrap();
    other.sessions.insert(sid("co_zOther_session_zX"), 5);
    d.msg(
        e,
        SyncMessage::Known(KnownMessage {
            state: other,
            is_correction: false,
            as_dependency_of: None,
            extra: Map::new(),
        }),
    );
    assert!(d.take(e).is_empty());
    d.shared.clear();

    let edit = w.map_edit("n", 2000);
    d.msg(a, edit);
    d.persist_all();
    let to = |d: &RelayHarness, p: PeerId| {
        d.shared.iter().filter(|(q, _)| *q == p).map(|(_, m)| m.clone()).collect::<Vec<_>>()
    };
    let (fb, fc, fe) = (to(&d, b), to(&d, c), to(&d, e));
    assert_eq!((fb.len(), fc.len(), fe.len()), (1, 1, 1));
    assert!(crate::message::Outgoing::ptr_eq(&fb[0], &fc[0]), "same state, same message");
    assert!(!crate::message::Outgoing::ptr_eq(&fb[0], &fe[0]));
    assert_eq!(fb[0], fe[0]);
    assert_eq!(as_content(&fb[0]).new[0].1.after, 1);
    assert_eq!(fb[0].json(), fc[0].json());
    // Their acks produce nothing.
    d.take(b);
    d.take(c);
    for p in [b, c] {
        d.msg(
            p,
            SyncMessage::Known(KnownMessage {
                state: d.relay.known_state(&w.map).unwrap(),
                is_correction: false,
                as_dependency_of: None,
                extra: Map::new(),
            }),
        );
        assert!(d.take(p).is_empty());
    }
}

#[test]
fn acks_wait_for_every_earlier_write_even_if_completed_out_of_order() {
    let (mut d, mut w, a) = uploaded();
    let (e1, e2) = (w.map_edit("x", 3000), w.map_edit("y", 3001));
    d.msg(a, e1);
    d.msg(a, e2);
    let tokens = std::mem::take(&mut d.unpersisted);
    assert_eq!(tokens.len(), 2);
    // The second write completes first: neither ack may go out yet.
    d.run(Event::Persisted(tokens[1]));
    assert!(d.take(a).is_empty());
    d.run(Event::Persisted(tokens[0]));
    let acks = d.take(a);
    assert_eq!(acks.len(), 2);
    // Both report the durable state, which now includes both edits.
    for ack in &acks {
        assert_eq!(known_of(ack).count(&sid(&w.map_writer.session)), 3);
    }
}

#[test]
fn forged_signature_is_rejected_for_the_sender_only_and_changes_nothing() {
    let (mut d, mut w, a) = uploaded();
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    d.take(b);
    let before = d.relay.known_state(&w.map).unwrap();
    let persists_before = d.persists.len();

    // A transaction altered after signing.
    let honest_writer = w.map_writer.clone();
    let SyncMessage::Content(mut forged) = w.map_edit("evil", 4000) else { unreachable!() };
    forged.new[0].1.new_transactions[0]["changes"] =
        Value::String(json!([{"op":"set","key":"evil","value":666}]).to_string());
    d.msg(a, SyncMessage::Content(forged));

    let reply = d.take(a);
    assert_eq!(reply.len(), 1, "{reply:?}");
    assert_eq!(known_of(&reply[0]), &before, "the reply reports the unchanged state");
    assert!(d.take(b).is_empty(), "nothing forwarded");
    assert_eq!(d.relay.known_state(&w.map).unwrap(), before);
    assert_eq!(d.persists.len(), persists_before, "nothing written");
    assert!(d
        .diagnostics
        .iter()
        .any(|x| matches!(x, Diagnostic::RejectedSession { error: VerifyError::BadSignature, .. })));

    // Like cojson, the CoValue is now errored for that connection: ignored.
    w.map_writer = honest_writer;
    let honest = w.map_edit("good", 4001);
    d.msg(a, honest.clone());
    assert!(d.take(a).is_empty());
    assert_eq!(d.relay.known_state(&w.map).unwrap(), before);

    // The same honest edit from a fresh connection is accepted: no poisoning.
    let c = d.connect(3);
    d.msg(c, honest);
    assert_eq!(d.relay.known_state(&w.map).unwrap().count(&sid(&w.map_writer.session)), 2);
    d.persist_all();
    assert_eq!(d.take(b).len(), 1, "forwarded to Bob");
}

#[test]
fn header_that_does_not_hash_to_the_id_is_dropped_silently() {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let SyncMessage::Content(mut c) = w.account_upload() else { unreachable!() };
    c.header.as_mut().unwrap()["uniqueness"] = json!("zTampered");
    let id = c.id.clone();
    d.msg(a, SyncMessage::Content(c));
    assert!(d.take(a).is_empty(), "cojson answers nothing to an invalid header");
    assert!(d.persists.is_empty());
    assert!(d.diagnostics.iter().any(|x| matches!(x, Diagnostic::InvalidHeader { .. })));
    // The CoValue stays unknown.
    d.msg(a, load(&id, None));
    let reply = d.take(a);
    assert_eq!(known_of(&reply[0]), &KnownState::empty(id));
}

#[test]
fn gap_is_answered_with_a_correction_and_valid_sessions_still_apply() {
    let (mut d, w, a) = uploaded();
    // A second session of Alice's that is fine, plus a gap in the first one.
    let mut second = w.alice.account_session("Map2");
    let ok = second.append(vec![set("k", json!(1), 5000)]);
    let mut gap_writer = w.map_writer.clone();
    gap_writer.append(vec![set("skipped", json!(1), 5001)]);
    let (session, mut gap) = gap_writer.append(vec![set("after-gap", json!(1), 5002)]);
    gap.after = 2; // we only have 1
    d.msg(a, content(None, &w.map, vec![(session.clone(), gap), ok]));
    assert!(d.take(a).is_empty(), "the correction is an ack too: waits for durability");
    d.persist_all();
    let reply = d.take(a);
    assert_eq!(reply.len(), 1);
    let SyncMessage::Known(k) = &reply[0] else { panic!("{reply:?}") };
    assert!(k.is_correction);
    assert_eq!(k.state.count(&sid(&session)), 1);
    assert_eq!(k.state.count(&sid(&second.session)), 1);
}

#[test]
fn content_for_an_unknown_covalue_without_header_asks_for_the_header() {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let s = w.map_writer.append(vec![set("x", json!(1), 1)]);
    d.msg(a, content(None, &w.map, vec![s]));
    let reply = d.take(a);
    assert_eq!(reply.len(), 1);
    let SyncMessage::Known(k) = &reply[0] else { panic!() };
    assert!(k.is_correction);
    assert_eq!(k.state, KnownState::empty(w.map.clone()));
    // Storage was consulted first (it might have been evicted).
    assert_eq!(d.loads, vec![w.map.clone()]);
}

#[test]
fn content_with_unknown_dependencies_is_parked_until_they_arrive() {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let (acc, grp, map) = (w.account_upload(), w.group_upload(), w.map_upload());
    // The map first: its group and author account are unknown.
    d.msg(a, map);
    let asked = d.take(a);
    let mut kinds = asked.iter().map(kind).collect::<Vec<_>>();
    kinds.sort();
    let mut expected = vec![("load", w.alice.account.to_string()), ("load", w.group.to_string())];
    expected.sort();
    assert_eq!(kinds, expected);
    for m in &asked {
        let SyncMessage::Load(s, _) = m else { panic!() };
        assert!(!s.header && s.sessions.is_empty());
    }
    assert!(d.persists.is_empty(), "nothing stored while parked");
    assert!(d.relay.known_state(&w.map).is_none());

    // The client answers the loads with content; the map is then released.
    d.msg(a, acc);
    assert!(d.relay.known_state(&w.map).is_none(), "still waiting for the group");
    d.msg(a, grp);
    let map_state = d.relay.known_state(&w.map).expect("released");
    assert_eq!(map_state.count(&sid(&w.map_writer.session)), 1);
    d.persist_all();
    let acks = d.take(a);
    assert!(acks.iter().any(|m| kind(m) == ("known", w.map.to_string())));
    assert_eq!(acks.len(), 3);
}

#[test]
fn a_dependency_the_sender_does_not_have_stops_the_wait() {
    // The cojson vector map: owner group co_zAAAA… exists nowhere.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cojson-vectors.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let v = &v["deterministic"];
    let account = CoId::parse(v["account"]["id"].as_str().unwrap()).unwrap();
    let group = CoId::parse("co_zAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
    let map_msg = SyncMessage::from_value(&v["contentMessage"]).unwrap();
    let account_msg = {
        // The vector account has no transactions: header only.
        let mut c = Map::new();
        c.insert("action".into(), "content".into());
        c.insert("id".into(), account.as_str().into());
        c.insert("header".into(), v["account"]["header"].clone());
        c.insert("priority".into(), 0.into());
        c.insert("new".into(), json!({}));
        SyncMessage::from_value(&Value::Object(c)).unwrap()
    };

    let mut d = relay();
    let a = d.connect(1);
    d.msg(a, map_msg.clone());
    assert_eq!(d.take(a).len(), 2, "asked for the account and the group");
    d.msg(a, account_msg);
    d.persist_all();
    d.take(a);
    // The client does not have the group either.
    let not_found = |id: &CoId| {
        SyncMessage::Known(KnownMessage {
            state: KnownState::empty(id.clone()),
            is_correction: false,
            as_dependency_of: None,
            extra: Map::new(),
        })
    };
    d.msg(a, not_found(&group));
    let map_id = CoId::parse("co_z5rocg8RW7QBwyCTr5qKwiZUSyv").unwrap();
    let state = d.relay.known_state(&map_id).expect("released without its group");
    assert_eq!(state.count(&sid(v["sessionID"].as_str().unwrap())), 4);
    d.persist_all();
    assert!(d.take(a).iter().any(|m| kind(m) == ("known", map_id.to_string())));
}

#[test]
fn an_author_account_nobody_has_rejects_its_sessions() {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let grp = w.group_upload();
    d.msg(a, grp);
    let asked = d.take(a);
    assert_eq!(asked.iter().map(kind).collect::<Vec<_>>(), vec![("load", w.alice.account.to_string())]);
    d.msg(
        a,
        SyncMessage::Known(KnownMessage {
            state: KnownState::empty(w.alice.account.clone()),
            is_correction: false,
            as_dependency_of: None,
            extra: Map::new(),
        }),
    );
    assert!(d
        .diagnostics
        .iter()
        .any(|x| matches!(x, Diagnostic::RejectedSession { error: VerifyError::UnknownAccount(_), .. })));
    // The header alone is valid and kept; the session is not.
    let state = d.relay.known_state(&w.group).unwrap();
    assert!(state.sessions.is_empty());
}

#[test]
fn disconnect_drops_subscriptions_and_allows_eviction_and_reload() {
    let (mut d, w, a) = uploaded();
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    d.take(b);
    assert!(d.relay.is_subscribed(b, &w.map));
    assert_eq!(d.relay.evict(&w.map), Err(NotEvictable::Subscribed));
    d.run(Event::PeerDisconnected(b));
    assert!(!d.relay.is_subscribed(b, &w.map));
    assert_eq!(d.relay.evict(&w.map), Err(NotEvictable::Subscribed), "Alice still is");
    d.run(Event::PeerDisconnected(a));
    let mut evictable = d.relay.evictable();
    evictable.sort();
    let mut all = vec![w.alice.account.clone(), w.group.clone(), w.map.clone()];
    all.sort();
    assert_eq!(evictable, all);
    for id in &all {
        d.relay.evict(id).unwrap();
    }
    assert_eq!(d.relay.resident_count(), 0);

    // A new peer loads the map: everything comes back from storage, deps first.
    d.loads.clear();
    let c = d.connect(3);
    d.msg(c, load(&w.map, None));
    let got = d.take(c);
    assert_eq!(
        got.iter().map(kind).collect::<Vec<_>>(),
        vec![
            ("content", w.alice.account.to_string()),
            ("content", w.group.to_string()),
            ("content", w.map.to_string())
        ]
    );
    assert_eq!(d.loads.len(), 3);
}

#[test]
fn load_answers_known_when_up_to_date_and_not_found_for_unknown() {
    let (mut d, w, a) = uploaded();
    let ours = d.relay.known_state(&w.map).unwrap();
    d.msg(a, load(&w.map, Some(ours.clone())));
    let reply = d.take(a);
    assert_eq!(reply.len(), 1);
    assert_eq!(known_of(&reply[0]), &ours);
    let unknown = CoId::parse("co_zNoSuchThing").unwrap();
    d.msg(a, load(&unknown, None));
    assert_eq!(known_of(&d.take(a)[0]), &KnownState::empty(unknown));
}

#[test]
fn load_waits_for_storage_and_answers_every_request() {
    let (mut d, w, _) = uploaded();
    for id in [w.alice.account.clone(), w.group.clone(), w.map.clone()] {
        d.relay.evict(&id).unwrap_err(); // Alice is subscribed
    }
    d.run(Event::PeerDisconnected(PeerId(1)));
    for id in [&w.alice.account, &w.group, &w.map] {
        d.relay.evict(id).unwrap();
    }
    d.hold_loads = true;
    let b = d.connect(2);
    let c = d.connect(3);
    d.msg(b, load(&w.map, None));
    d.msg(c, load(&w.map, None));
    assert!(d.take(b).is_empty() && d.take(c).is_empty());
    assert_eq!(d.held_loads.len(), 1, "one storage read for two peers");
    d.hold_loads = false;
    d.release_loads();
    assert_eq!(d.take(b).len(), 3);
    assert_eq!(d.take(c).len(), 3);
}

#[test]
fn correction_from_a_peer_resends_everything_it_says_it_lacks() {
    let (mut d, w, a) = uploaded();
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    d.take(b);
    // Bob lost everything about the map.
    d.msg(
        b,
        SyncMessage::Known(KnownMessage {
            state: KnownState::empty(w.map.clone()),
            is_correction: true,
            as_dependency_of: None,
            extra: Map::new(),
        }),
    );
    let got = d.take(b);
    assert_eq!(got.iter().map(kind).collect::<Vec<_>>(), vec![("content", w.map.to_string())]);
    assert!(as_content(&got[0]).header.is_some());
    assert!(d.take(a).is_empty());
}

#[test]
fn duplicate_content_is_acked_without_a_write_or_forwarding() {
    let (mut d, mut w, a) = uploaded();
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    d.take(b);
    let edit = w.map_edit("z", 6000);
    d.msg(a, edit.clone());
    d.persist_all();
    d.take(a);
    d.take(b);
    let writes = d.persists.len();
    d.msg(a, edit);
    assert_eq!(d.persists.len(), writes);
    assert_eq!(d.take(a).len(), 1, "every content is acked");
    assert!(d.take(b).is_empty());
}

#[test]
fn large_sessions_are_sent_in_signed_pieces_that_verify_elsewhere() {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let (acc, grp) = (w.account_upload(), w.group_upload());
    d.msg(a, acc);
    d.msg(a, grp);
    // Map with 6 × 60 KB transactions, uploaded one per message.
    let big = "x".repeat(60_000);
    let mut first = true;
    for i in 0..6u64 {
        let s = w.map_writer.append(vec![set("blob", json!(big), 10_000 + i)]);
        let header = if first { Some(w.map_header.clone()) } else { None };
        first = false;
        d.msg(a, content(header.as_ref(), &w.map, vec![s]));
    }
    d.persist_all();
    // Checkpoints were stored with the writes.
    assert!(!d.store[&w.map].sessions[0].checkpoints.is_empty());

    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    let got = d.take(b);
    let map_pieces: Vec<_> = got.iter().map(as_content).filter(|c| c.id == w.map).collect();
    assert!(map_pieces.len() > 1, "split");
    let session = sid(&w.map_writer.session);
    assert_eq!(map_pieces[0].expect_content_until.as_ref().and_then(|e| e.get(&session)), Some(&6));
    assert!(map_pieces[1..].iter().all(|p| p.expect_content_until.is_none() && p.header.is_none()));
    for p in &map_pieces {
        let payload: usize =
            p.new.iter().flat_map(|(_, e)| &e.new_transactions).map(|t| t["changes"].as_str().unwrap().len()).sum();
        assert!(payload <= 2 * 61_000, "piece of {payload} bytes");
    }
    // Every piece is independently valid: a fresh relay accepts them all in order.
    let mut other = relay();
    let p = other.connect(9);
    for m in got {
        other.msg(p, m);
    }
    assert_eq!(other.relay.known_state(&w.map).unwrap().count(&session), 6);
    assert!(
        other.diagnostics.iter().all(|x| !matches!(x, Diagnostic::RejectedSession { .. })),
        "{:?}",
        other.diagnostics
    );
}

#[test]
fn reconcile_loads_what_differs_and_acks_once_settled() {
    let (mut d, mut w, a) = uploaded();
    let same = crate::relay::reconcile::sessions_hash(&d.relay.known_state(&w.group).unwrap().sessions);
    let unknown = CoId::parse("co_zUnknownToServer").unwrap();
    let batch = |values: Vec<(CoId, String)>| {
        SyncMessage::Reconcile(ReconcileMessage { id: "b1".into(), values, extra: Map::new() })
    };
    d.msg(
        a,
        batch(vec![
            (w.group.clone(), same),
            (w.map.clone(), "shortHash_zDifferent".into()),
            (unknown.clone(), "shortHash_zX".into()),
        ]),
    );
    let sent = d.take(a);
    assert_eq!(
        sent.iter().map(kind).collect::<Vec<_>>(),
        vec![("load", w.map.to_string()), ("load", unknown.to_string())]
    );
    let SyncMessage::Load(s, _) = &sent[0] else { panic!() };
    assert_eq!(Some(s), d.relay.known_state(&w.map).as_ref(), "load carries our state");
    // Settled by the client's answers: content for the map, known for the other.
    let edit = w.map_edit("r", 7000);
    d.msg(a, edit);
    assert!(d.take(a).iter().all(|m| kind(m).0 != "reconcile-ack"));
    d.msg(
        a,
        SyncMessage::Known(KnownMessage {
            state: KnownState::empty(unknown),
            is_correction: false,
            as_dependency_of: None,
            extra: Map::new(),
        }),
    );
    let out = d.take(a);
    assert!(out.iter().any(|m| matches!(m, SyncMessage::ReconcileAck(id) if id == "b1")), "{out:?}");
    // An empty batch is acked at once.
    d.msg(a, SyncMessage::Reconcile(ReconcileMessage { id: "b2".into(), values: vec![], extra: Map::new() }));
    assert!(matches!(&d.take(a)[..], [SyncMessage::ReconcileAck(id)] if id == "b2"));
}

#[test]
fn failed_write_closes_the_peers_of_that_covalue_and_reloads_from_storage() {
    let (mut d, mut w, a) = uploaded();
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    d.take(b);
    let edit = w.map_edit("lost", 8000);
    d.msg(a, edit);
    let token = d.unpersisted.pop().unwrap();
    // The driver's store applied the write eagerly; undo it to model a failure.
    d.store.get_mut(&w.map).unwrap().sessions[0].transactions.pop();
    d.run(Event::PersistFailed(token));
    let mut closed: Vec<_> = d.closed.iter().map(|(p, _)| *p).collect();
    closed.sort();
    assert_eq!(closed, vec![a, b]);
    assert!(d.closed.iter().all(|(_, r)| *r == CloseReason::StorageFailure(w.map.clone())));
    assert!(d.take(a).iter().all(|m| kind(m).0 != "known"), "never acked");
    // Memory no longer claims the lost write: the next reader gets storage's truth.
    d.run(Event::PeerDisconnected(a));
    d.run(Event::PeerDisconnected(b));
    let c = d.connect(3);
    d.msg(c, load(&w.map, Some(KnownState { id: w.map.clone(), header: true, sessions: Default::default() })));
    let got = d.take(c);
    let map = got.iter().map(as_content).find(|m| m.id == w.map).unwrap();
    assert_eq!(map.new[0].1.new_transactions.len(), 1);
}

#[test]
fn parked_content_is_bounded_per_peer() {
    let mut d = RelayHarness::new(Relay::new(RelayConfig { max_parked_content_per_peer: 2, ..RelayConfig::default() }));
    let a = d.connect(1);
    for i in 0..3 {
        let mut w = World::new();
        w.map_header["uniqueness"] = json!(format!("zU{i}"));
        w.map = crate::crypto::id_for_header(&w.map_header);
        let m = w.map_upload();
        d.msg(a, m);
    }
    assert_eq!(d.closed, vec![(a, CloseReason::TooMuchParkedContent)]);
    // A closing peer is ignored until the driver reports the disconnect.
    let w = World::new();
    d.msg(a, load(&w.map, None));
    assert!(d.take(a).iter().all(|m| kind(m).0 != "known"));
}

#[test]
fn hostile_messages_do_not_panic_or_leak_into_state() {
    let (mut d, w, a) = uploaded();
    let session = w.map_writer.session.clone();
    let huge = 9_007_199_254_740_992u64;
    let entry = |after: u64, txs: Vec<Value>, sig: &str| crate::message::SessionNewContent {
        after,
        new_transactions: txs,
        last_signature: sig.into(),
        extra: Map::new(),
    };
    let before = d.relay.known_state(&w.map).unwrap();
    let cases = vec![
        content(None, &w.map, vec![(session.clone(), entry(huge, vec![json!({})], "signature_z1"))]),
        content(None, &w.map, vec![(session.clone(), entry(0, vec![json!(null)], "x"))]),
        content(None, &w.map, vec![("not a session".into(), entry(0, vec![], "x"))]),
        content(Some(&json!({"type":1})), &w.map, vec![]),
        load(
            &w.map,
            Some(KnownState {
                id: w.map.clone(),
                header: true,
                sessions: [(sid(&session), huge)].into_iter().collect(),
            }),
        ),
    ];
    let c = d.connect(5);
    for m in cases {
        d.msg(c, m);
    }
    d.msg(c, SyncMessage::Done(w.map.clone()));
    d.run(Event::Persisted(crate::persistence::PersistToken(999_999)));
    d.run(Event::Loaded { id: w.map.clone(), stored: None });
    d.run(Event::Message(PeerId(77), load(&w.map, None)));
    assert_eq!(d.relay.known_state(&w.map).unwrap(), before);
    let _ = a;
}

#[test]
fn parked_dependency_cycles_do_not_deadlock() {
    // Two groups, each naming the other as parent, written by a bare agent.
    let me = Identity::from_seed(7);
    let header =
        |u: &str| json!({"type":"comap","ruleset":{"type":"group","initialAdmin":me.agent},"meta":null,"uniqueness":u});
    let (h1, h2) = (header("zG1"), header("zG2"));
    let (g1, g2) = (crate::crypto::id_for_header(&h1), crate::crypto::id_for_header(&h2));
    let mut w1 = me.agent_session("One");
    let mut w2 = me.agent_session("Two");
    let c1 = content(Some(&h1), &g1, vec![w1.append(vec![set(&format!("parent_{g2}"), json!("extend"), 1)])]);
    let c2 = content(Some(&h2), &g2, vec![w2.append(vec![set(&format!("parent_{g1}"), json!("extend"), 2)])]);
    let mut d = relay();
    let a = d.connect(1);
    d.msg(a, c1);
    assert_eq!(d.take(a).iter().map(kind).collect::<Vec<_>>(), vec![("load", g2.to_string())]);
    assert!(d.relay.known_state(&g1).is_none(), "g1 waits for g2");
    d.msg(a, c2);
    assert!(d.relay.known_state(&g1).is_some() && d.relay.known_state(&g2).is_some());
    d.persist_all();
    assert_eq!(d.take(a).iter().filter(|m| kind(m).0 == "known").count(), 2);
}

#[test]
fn disconnect_drops_parked_content() {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let m = w.map_upload();
    d.msg(a, m);
    assert!(!d.relay.evictable().contains(&w.map), "busy while its content is parked");
    assert!(!d.relay.evictable().contains(&w.alice.account), "the parked content waits on it");
    d.run(Event::PeerDisconnected(a));
    let evictable = d.relay.evictable();
    for id in [&w.map, &w.group, &w.alice.account] {
        assert!(evictable.contains(id), "{id} still held");
    }
    // The parked map never got stored.
    assert!(d.persists.is_empty());
}

// ---------- lazy `load`: answers from the stored known state ----------

/// `uploaded()`, then Alice leaves and everything is evicted: storage holds account, group and
/// map, memory nothing. Returns the map's known state as stored.
fn stored_only() -> (RelayHarness, World, KnownState) {
    let (mut d, w, a) = uploaded();
    let map_state = d.relay.known_state(&w.map).unwrap();
    d.run(Event::PeerDisconnected(a));
    for id in [&w.alice.account, &w.group, &w.map] {
        d.relay.evict(id).unwrap();
    }
    assert_eq!(d.relay.resident_count(), 0);
    d.loads.clear();
    d.known_loads.clear();
    (d, w, map_state)
}

#[test]
fn a_peer_that_has_everything_gets_known_without_a_full_load() {
    let (mut d, w, stored) = stored_only();
    let b = d.connect(2);
    d.msg(b, load(&w.map, Some(stored.clone())));
    let reply = d.take(b);
    assert_eq!(reply.len(), 1, "{reply:?}");
    assert_eq!(known_of(&reply[0]), &stored, "the stored known state");
    assert!(d.loads.is_empty(), "no full load: {:?}", d.loads);
    assert_eq!(d.known_loads, vec![vec![w.map.clone()]], "one known-state read");
    assert_eq!(d.relay.resident_count(), 0, "nothing loaded into memory");
    assert!(d.relay.is_subscribed(b, &w.map), "the load subscribes");

    // A peer that is ahead of us also lacks nothing: `known`, and it uploads what we lack.
    let mut ahead = stored.clone();
    ahead.raise(&sid(&w.map_writer.session), 5);
    let c = d.connect(3);
    d.msg(c, load(&w.map, Some(ahead)));
    assert_eq!(known_of(&d.take(c)[0]), &stored);
    assert_eq!(d.known_loads.len(), 1, "answered from the shell: no second read");
    assert!(d.loads.is_empty());

    // A `known` repeating what it has: nothing more to say (it was told already).
    d.msg(
        b,
        SyncMessage::Known(KnownMessage {
            state: stored.clone(),
            is_correction: false,
            as_dependency_of: None,
            extra: Map::new(),
        }),
    );
    assert!(d.take(b).is_empty());
    assert!(d.loads.is_empty());

    // Once nobody is subscribed, the shell is evictable like anything else.
    assert_eq!(d.relay.evict(&w.map), Err(NotEvictable::Subscribed));
    d.run(Event::PeerDisconnected(b));
    d.run(Event::PeerDisconnected(c));
    assert!(d.relay.evictable().contains(&w.map));
    d.relay.evict(&w.map).unwrap();
}

#[test]
fn a_peer_that_lacks_a_session_triggers_a_full_load_and_gets_content_dependencies_first() {
    let (mut d, mut w, a) = uploaded();
    let edit = w.map_edit("second", 2000);
    d.msg(a, edit);
    d.persist_all();
    d.run(Event::PeerDisconnected(a));
    for id in [&w.alice.account, &w.group, &w.map] {
        d.relay.evict(id).unwrap();
    }
    d.loads.clear();

    // Bob has the header and the first transaction only.
    let mut bobs = KnownState::empty(w.map.clone());
    bobs.header = true;
    bobs.raise(&sid(&w.map_writer.session), 1);
    let b = d.connect(2);
    d.msg(b, load(&w.map, Some(bobs)));
    assert_eq!(d.known_loads, vec![vec![w.map.clone()]], "the cheap read came first");
    assert!(d.loads.contains(&w.map), "then the full load");
    let got = d.take(b);
    assert_eq!(
        got.iter().map(kind).collect::<Vec<_>>(),
        vec![
            ("content", w.alice.account.to_string()),
            ("content", w.group.to_string()),
            ("content", w.map.to_string())
        ],
        "dependencies first, as on the full path"
    );
    let map = as_content(&got[2]);
    assert!(map.header.is_none(), "Bob has the header");
    assert_eq!(map.new[0].1.after, 1);
    assert_eq!(map.new[0].1.new_transactions, vec![set("second", json!(2000), 2000)]);
    assert!(d.relay.is_subscribed(b, &w.map));
}

#[test]
fn a_load_without_header_skips_the_known_state_read() {
    let (mut d, w, _) = stored_only();
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    assert!(d.known_loads.is_empty(), "it lacks the header of anything stored");
    assert_eq!(d.take(b).len(), 3);
    // Unknown to storage with header:true (the client created it offline): not found, cheaply.
    let offline = CoId::parse("co_zOfflineCreated").unwrap();
    let c = d.connect(3);
    d.msg(c, load(&offline, Some(KnownState { id: offline.clone(), header: true, sessions: Default::default() })));
    assert_eq!(known_of(&d.take(c)[0]), &KnownState::empty(offline.clone()));
    assert_eq!(d.known_loads.last(), Some(&vec![offline.clone()]));
    assert!(!d.loads.contains(&offline), "no full load for what storage does not have");
}

#[test]
fn a_subscribed_but_not_resident_covalue_still_forwards_new_content() {
    let (mut d, mut w, stored) = stored_only();
    // Bob reconnects as a client does: loads of everything it holds, all answered lazily.
    let b = d.connect(2);
    let has = |id: &CoId, session: &str| {
        let mut k = KnownState { id: id.clone(), header: true, sessions: Default::default() };
        k.raise(&sid(session), 1);
        k
    };
    d.msg(b, load(&w.alice.account, Some(has(&w.alice.account, &w.account_writer.session))));
    d.msg(b, load(&w.group, Some(has(&w.group, &w.group_writer.session))));
    d.msg(b, load(&w.map, Some(stored.clone())));
    assert_eq!(d.take(b).iter().filter(|m| kind(m).0 == "known").count(), 3);
    // Carol only loaded the map.
    let c = d.connect(4);
    d.msg(c, load(&w.map, Some(stored)));
    d.take(c);
    assert!(d.loads.is_empty());
    assert_eq!(d.relay.resident_count(), 0);

    // Alice comes back (loads answered lazily too) and edits the map: the upload loads it
    // whole, applies, forwards.
    let a = d.connect(3);
    d.msg(a, load(&w.alice.account, Some(has(&w.alice.account, &w.account_writer.session))));
    d.msg(a, load(&w.group, Some(has(&w.group, &w.group_writer.session))));
    d.msg(a, load(&w.map, Some(has(&w.map, &w.map_writer.session))));
    d.take(a);
    assert!(d.loads.is_empty());
    let edit = w.map_edit("later", 3000);
    d.msg(a, edit);
    assert!(d.loads.contains(&w.map), "the upload path loads the CoValue whole");
    d.persist_all();
    let fwd = d.take(b);
    assert_eq!(fwd.iter().map(kind).collect::<Vec<_>>(), vec![("content", w.map.to_string())], "{fwd:?}");
    let m = as_content(&fwd[0]);
    assert!(m.header.is_none());
    assert_eq!((m.new[0].1.after, m.new[0].1.new_transactions.len()), (1, 1));
    // Carol never said what she has of the account and group: they go first, as on any
    // content sent to a client that did not report them.
    let fwd = d.take(c);
    assert_eq!(
        fwd.iter().map(kind).collect::<Vec<_>>(),
        vec![
            ("content", w.alice.account.to_string()),
            ("content", w.group.to_string()),
            ("content", w.map.to_string())
        ]
    );
    assert_eq!(as_content(&fwd[2]).new[0].1.after, 1);
    // Alice's ack came with the same durability (it was the forwarding's trigger too).
    let ack = d.take(a);
    assert_eq!(ack.len(), 1);
    assert_eq!(known_of(&ack[0]).count(&sid(&w.map_writer.session)), 2);
}

#[test]
fn loads_of_one_cycle_share_one_known_state_read_and_waiters_are_answered_together() {
    let (mut d, w, stored) = stored_only();
    // Several peers' loads arrive while the read is in flight: they wait on it, no second read.
    let peers: Vec<PeerId> = (10..20).map(|n| d.connect(n)).collect();
    let mut group_state = KnownState::empty(w.group.clone());
    group_state.header = true;
    group_state.raise(&sid(&w.group_writer.session), 1);
    // Hold the answers: model a storage read in flight.
    let mut held = Vec::new();
    for &p in &peers {
        for msg in [load(&w.map, Some(stored.clone())), load(&w.group, Some(group_state.clone()))] {
            for action in d.relay.handle(Event::Message(p, msg)) {
                match action {
                    crate::relay::Action::LoadKnown(ids) => held.extend(ids),
                    other => panic!("nothing but the read before it lands: {other:?}"),
                }
            }
        }
    }
    assert_eq!(held, vec![w.map.clone(), w.group.clone()], "one read per CoValue");
    assert!(d.relay.evict(&w.map).is_err(), "busy while the read is in flight");
    let answers = held.iter().map(|id| (id.clone(), d.store[id].stored_known(id))).collect();
    d.run(Event::KnownLoaded(answers));
    for &p in &peers {
        let got = d.take(p);
        let mut kinds = got.iter().map(kind).collect::<Vec<_>>();
        kinds.sort();
        let mut expected = vec![("known", w.map.to_string()), ("known", w.group.to_string())];
        expected.sort();
        assert_eq!(kinds, expected);
    }
    assert!(d.loads.is_empty());
}

#[test]
fn a_deleted_or_unreadable_stored_known_state_falls_back_to_a_full_load() {
    let (mut d, w, stored) = stored_only();
    // Unreadable: the answer comes from a full load.
    let b = d.connect(2);
    let mut actions = d.relay.handle(Event::Message(b, load(&w.map, Some(stored.clone()))));
    assert!(matches!(&actions[..], [crate::relay::Action::LoadKnown(ids)] if ids == &vec![w.map.clone()]));
    actions = d.relay.handle(Event::KnownLoaded(vec![(w.map.clone(), StoredKnown::Unreadable)]));
    assert_eq!(actions, vec![crate::relay::Action::Load(w.map.clone())]);
    let stored_map = d.store[&w.map].clone();
    d.run(Event::Loaded { id: w.map.clone(), stored: Some(stored_map) });
    let got = d.take(b);
    assert_eq!(got.iter().filter(|m| kind(m) == ("known", w.map.to_string())).count(), 1, "{got:?}");

    // Deleted: full load as well (which sessions survive is decided on the whole CoValue).
    let (mut d, w, stored) = stored_only();
    d.store.get_mut(&w.group).unwrap().deleted = true;
    let _ = stored;
    let mut group_state = KnownState::empty(w.group.clone());
    group_state.header = true;
    group_state.raise(&sid(&w.group_writer.session), 1);
    let c = d.connect(3);
    d.msg(c, load(&w.group, Some(group_state)));
    assert_eq!(d.known_loads, vec![vec![w.group.clone()]]);
    assert!(d.loads.contains(&w.group));
    assert!(!d.take(c).is_empty(), "answered");
}

#[test]
fn reconcile_of_covalues_not_in_memory_compares_stored_known_states() {
    let (mut d, w, stored) = stored_only();
    let a = d.connect(1);
    let same = crate::relay::reconcile::sessions_hash(&stored.sessions);
    let unknown = CoId::parse("co_zUnknownToServer").unwrap();
    d.msg(
        a,
        SyncMessage::Reconcile(ReconcileMessage {
            id: "b1".into(),
            values: vec![
                (w.map.clone(), same),
                (w.group.clone(), "shortHash_zDifferent".into()),
                (unknown.clone(), "shortHash_zX".into()),
            ],
            extra: Map::new(),
        }),
    );
    let sent = d.take(a);
    assert_eq!(
        sent.iter().map(kind).collect::<Vec<_>>(),
        vec![("load", w.group.to_string()), ("load", unknown.to_string())]
    );
    let SyncMessage::Load(s, _) = &sent[0] else { panic!() };
    assert!(s.header && s.count(&sid(&w.group_writer.session)) == 1, "load carries the stored state: {s:?}");
    assert!(d.loads.is_empty(), "no full load: {:?}", d.loads);
    assert_eq!(d.known_loads.len(), 1, "one read for the whole batch");
    // The client has exactly that: known settles it, still without loading anything.
    d.msg(
        a,
        SyncMessage::Known(KnownMessage {
            state: s.clone(),
            is_correction: false,
            as_dependency_of: None,
            extra: Map::new(),
        }),
    );
    d.msg(
        a,
        SyncMessage::Known(KnownMessage {
            state: KnownState::empty(unknown),
            is_correction: false,
            as_dependency_of: None,
            extra: Map::new(),
        }),
    );
    let out = d.take(a);
    assert!(matches!(&out[..], [SyncMessage::ReconcileAck(id)] if id == "b1"), "{out:?}");
    assert!(d.loads.is_empty());
}

#[test]
fn covalues_per_peer_are_bounded() {
    let mut d = RelayHarness::new(Relay::new(RelayConfig { max_covalues_per_peer: 3, ..RelayConfig::default() }));
    let a = d.connect(1);
    let b = d.connect(2);
    for i in 0..3 {
        d.msg(a, load(&CoId::parse(&format!("co_zUnknown{i}")).unwrap(), None));
    }
    assert!(d.closed.is_empty(), "three are allowed");
    // A fourth new id closes the peer and is not looked up.
    let reads = |d: &RelayHarness| d.loads.len() + d.known_loads.iter().map(Vec::len).sum::<usize>();
    let before = reads(&d);
    d.msg(a, load(&CoId::parse("co_zUnknown3").unwrap(), None));
    assert_eq!(d.closed, vec![(a, CloseReason::TooManyCoValues)]);
    assert_eq!(reads(&d), before, "no storage read for the refused id");
    // Another peer has its own budget.
    d.msg(b, load(&CoId::parse("co_zUnknown3").unwrap(), None));
    assert_eq!(d.closed.len(), 1);
}

#[test]
fn parked_content_is_bounded_per_peer_in_bytes() {
    let uploads: Vec<_> = (0..3)
        .map(|i| {
            let mut w = World::new();
            w.map_header["uniqueness"] = json!(format!("zB{i}"));
            w.map = crate::crypto::id_for_header(&w.map_header);
            w.map_upload()
        })
        .collect();
    let size = |m: &SyncMessage| match m {
        SyncMessage::Content(c) => c.approx_bytes(),
        _ => unreachable!(),
    };
    // Room for two of them in bytes, and plenty in count.
    let budget = size(&uploads[0]) + size(&uploads[1]) + size(&uploads[2]) / 2;
    let config =
        RelayConfig { max_parked_content_per_peer: 1000, max_parked_bytes_per_peer: budget, ..RelayConfig::default() };
    let mut d = RelayHarness::new(Relay::new(config));
    let a = d.connect(1);
    for m in uploads {
        d.msg(a, m);
    }
    assert_eq!(d.closed, vec![(a, CloseReason::TooMuchParkedContent)]);
}

/// Content is forwarded only up to what is durable, in write order: with two writes in flight,
/// the second completing first sends nothing; the first sends exactly its own part, signed
/// where that part ends (so it verifies on the receiver), and the second the rest.
#[test]
fn forwarding_stops_at_the_durable_count_even_when_writes_complete_out_of_order() {
    let (mut d, mut w, a) = uploaded();
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    d.take(b);
    let first = w.map_edit("one", 2000);
    let second = w.map_edit("two", 2001);
    let signature_of = |m: &SyncMessage| as_content(m).new[0].1.last_signature.clone();
    let (sig1, sig2) = (signature_of(&first), signature_of(&second));
    d.msg(a, first);
    d.msg(a, second);
    let tokens = std::mem::take(&mut d.unpersisted);
    assert_eq!(tokens.len(), 2);
    d.run(Event::Persisted(tokens[1]));
    assert!(d.take(b).is_empty(), "the later write alone makes nothing durable");
    assert!(d.take(a).is_empty(), "nor acks anything");
    d.run(Event::Persisted(tokens[0]));
    let fwd = d.take(b);
    assert_eq!(fwd.len(), 1, "{fwd:?}");
    let c = as_content(&fwd[0]);
    assert_eq!((c.new[0].1.after, c.new[0].1.new_transactions.len()), (1, 2), "both, now both are durable");
    assert_eq!(c.new[0].1.last_signature, sig2);

    // One at a time: the first write's completion forwards exactly its transaction, with the
    // signature that was valid at its end.
    let third = w.map_edit("three", 2002);
    let fourth = w.map_edit("four", 2003);
    let sig3 = signature_of(&third);
    d.msg(a, third);
    d.msg(a, fourth);
    let tokens = std::mem::take(&mut d.unpersisted);
    d.run(Event::Persisted(tokens[0]));
    let fwd = d.take(b);
    let c = as_content(&fwd[0]);
    assert_eq!((c.new[0].1.after, c.new[0].1.new_transactions.len()), (3, 1));
    assert_eq!(c.new[0].1.last_signature, sig3);
    assert_ne!(sig1, sig3);
    d.run(Event::Persisted(tokens[1]));
    let c = as_content(&d.take(b)[0]).clone();
    assert_eq!((c.new[0].1.after, c.new[0].1.new_transactions.len()), (4, 1));
}

/// A CoValue whose creation is not durable is not sent, and neither is what depends on it:
/// a subscriber of a new map gets nothing while its group's write is in flight, then all of it,
/// dependencies first.
#[test]
fn content_waits_for_its_dependencies_to_be_durable() {
    let mut d = relay();
    let mut w = World::new();
    let a = d.connect(1);
    let acc = w.account_upload();
    d.msg(a, acc);
    d.persist_all();
    d.take(a);
    // Bob asks for the map before it exists: subscribed, told it is unknown.
    let b = d.connect(2);
    d.msg(b, load(&w.map, None));
    d.take(b);
    let (grp, map) = (w.group_upload(), w.map_upload());
    d.msg(a, grp);
    d.msg(a, map);
    let tokens = std::mem::take(&mut d.unpersisted);
    assert_eq!(tokens.len(), 2);
    d.run(Event::Persisted(tokens[1])); // the map's write
    assert!(d.take(b).is_empty(), "the map waits for its group to be durable");
    d.run(Event::Persisted(tokens[0])); // the group's write
    let got: Vec<_> = d.take(b).iter().map(kind).collect();
    let want = [&w.alice.account, &w.group, &w.map].map(|id| ("content", id.to_string())).to_vec();
    assert_eq!(got, want, "dependencies first (Bob never reported the account either)");
}

/// Two instances sharing storage (cluster): A announces what became durable; B, behind, reads
/// the CoValue back and sends its own subscriber what it lacks.
#[test]
fn another_instances_durable_change_reaches_this_instances_subscribers_through_storage() {
    let clustered = RelayConfig { announce_durable: true, ..RelayConfig::default() };
    let mut a = RelayHarness::new(Relay::new(clustered.clone()));
    let mut w = World::new();
    let alice = a.connect(1);
    let (acc, grp, map) = (w.account_upload(), w.group_upload(), w.map_upload());
    a.msg(alice, acc);
    a.msg(alice, grp);
    a.msg(alice, map);
    assert!(a.announced.is_empty(), "nothing is announced before it is durable");
    a.persist_all();
    let map_known = a.announced.iter().rev().find(|(id, _)| *id == w.map).expect("announced").1.clone();
    assert_eq!(map_known.count(&sid(&w.map_writer.session)), 1);

    // B shares A's storage; Bob on B loads the map.
    let mut b = RelayHarness::new(Relay::new(clustered));
    b.store = a.store.clone();
    let bob = b.connect(2);
    b.msg(bob, load(&w.map, None));
    assert_eq!(b.take(bob).len(), 3);

    // Alice edits on A; once durable, A announces it.
    a.take(alice);
    a.announced.clear();
    let edit = w.map_edit("n", 2000);
    a.msg(alice, edit);
    a.persist_all();
    let (_, known) = a.announced.iter().find(|(id, _)| *id == w.map).cloned().expect("announced");
    b.store = a.store.clone();
    b.run(Event::ChangedElsewhere { id: w.map.clone(), known: Some(known.clone()) });
    assert_eq!(b.refreshes, vec![w.map.clone()]);
    let got = b.take(bob);
    assert_eq!(got.len(), 1, "{got:?}");
    let c = as_content(&got[0]);
    assert!(c.header.is_none());
    assert_eq!((c.new[0].1.after, c.new[0].1.new_transactions.len()), (1, 1));
    assert!(b.announced.is_empty(), "another instance's change is not announced again");

    // The same announcement again (or an older one): nothing to read.
    b.run(Event::ChangedElsewhere { id: w.map.clone(), known: Some(known) });
    assert_eq!(b.refreshes.len(), 1);
    // A lost announcement is repaired by the periodic exchange: B announces what it has.
    assert!(b.relay.announcements().iter().any(|(id, k)| *id == w.map && k.count(&sid(&w.map_writer.session)) == 2));
}

/// An announcement that arrives while the CoValue is still being read from storage is not
/// lost: the read may predate the change, so it is read again once it lands.
#[test]
fn a_change_announced_during_a_load_is_read_again_after_it() {
    let clustered = RelayConfig { announce_durable: true, ..RelayConfig::default() };
    let (a, w, _) = uploaded();
    let mut b = RelayHarness::new(Relay::new(clustered));
    b.store = a.store.clone();
    b.hold_loads = true;
    let bob = b.connect(2);
    b.msg(bob, load(&w.map, None));
    assert!(b.held_loads.contains(&w.map));
    b.run(Event::ChangedElsewhere { id: w.map.clone(), known: None });
    assert!(b.refreshes.is_empty(), "not before the load lands");
    b.hold_loads = false;
    b.release_loads();
    assert!(b.refreshes.contains(&w.map), "read again after the load");
}
