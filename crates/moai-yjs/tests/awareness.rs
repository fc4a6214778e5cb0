//! Presence behaviour, checked against a model of the JS client's awareness rules
//! (`y-protocols/awareness.js` applyAwarenessUpdate), since JS peers decide what users see.

mod support;

use std::collections::HashMap;

use moai_yjs::{Action, AwarenessEntry, AwarenessUpdate, ConnId, Message, Room};

/// What a JS peer holds: meta clock per client (kept forever, also after removal) and states.
#[derive(Default)]
struct JsPeer {
    clock: HashMap<u64, u64>,
    states: HashMap<u64, String>,
}

impl JsPeer {
    fn apply(&mut self, update: &AwarenessUpdate) {
        for e in &update.entries {
            let curr = self.clock.get(&e.client_id).copied().unwrap_or(0);
            let has = self.states.contains_key(&e.client_id);
            if curr < e.clock || (curr == e.clock && e.state.is_none() && has) {
                match &e.state {
                    Some(s) => {
                        self.states.insert(e.client_id, s.clone());
                    }
                    None => {
                        self.states.remove(&e.client_id);
                    }
                }
                self.clock.insert(e.client_id, e.clock);
            }
        }
    }
}

fn aw_frame(entries: &[(u64, u64, Option<&str>)]) -> Vec<u8> {
    let update = AwarenessUpdate {
        entries: entries
            .iter()
            .map(|&(client_id, clock, s)| AwarenessEntry { client_id, clock, state: s.map(str::to_owned) })
            .collect(),
    };
    Message::Awareness(&update.encode()).encode()
}

/// The awareness updates among `actions`, with their recipients' exclusion.
fn broadcasts(actions: &[Action]) -> Vec<(Option<ConnId>, AwarenessUpdate)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Broadcast { except, frame } => match Message::decode(frame).unwrap() {
                Message::Awareness(bytes) => Some((*except, AwarenessUpdate::decode(bytes).unwrap())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn sends(actions: &[Action], to: ConnId) -> Vec<AwarenessUpdate> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { conn, frame } if *conn == to => match Message::decode(frame).unwrap() {
                Message::Awareness(bytes) => Some(AwarenessUpdate::decode(bytes).unwrap()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

const A: ConnId = ConnId(1);
const B: ConnId = ConnId(2);
const A2: ConnId = ConnId(3);

#[test]
fn add_update_and_explicit_null_are_broadcast_to_everyone_including_sender() {
    let mut room = Room::new("d");
    room.connect(A).unwrap();
    room.connect(B).unwrap();
    let acts = room.receive(A, &aw_frame(&[(7, 1, Some(r#"{"user":"ann"}"#))])).unwrap();
    let b = broadcasts(&acts);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].0, None, "awareness echo must include the sender");
    assert_eq!(room.awareness().state(7), Some(r#"{"user":"ann"}"#));

    // Renewal with the same state but a newer clock is still broadcast (peers' 30 s timeout).
    let acts = room.receive(A, &aw_frame(&[(7, 2, Some(r#"{"user":"ann"}"#))])).unwrap();
    assert_eq!(broadcasts(&acts).len(), 1);
    // Stale or equal clocks are dropped: this is what peers relaying our broadcast send back.
    assert!(room.receive(B, &aw_frame(&[(7, 2, Some(r#"{"user":"ann"}"#))])).unwrap().is_empty());
    assert!(room.receive(A, &aw_frame(&[(7, 1, Some(r#"{"old":1}"#))])).unwrap().is_empty());

    // The client leaves explicitly (null at the same clock is accepted, as in JS).
    let acts = room.receive(A, &aw_frame(&[(7, 2, None)])).unwrap();
    assert_eq!(broadcasts(&acts)[0].1.entries, vec![AwarenessEntry { client_id: 7, clock: 2, state: None }]);
    assert_eq!(room.awareness().present_count(), 0);
}

#[test]
fn new_connection_gets_all_states_and_query_awareness_is_answered() {
    let mut room = Room::new("d");
    room.connect(A).unwrap();
    room.receive(A, &aw_frame(&[(7, 1, Some("{}")), (8, 3, Some(r#"{"x":1}"#))])).unwrap();
    let acts = room.connect(B).unwrap();
    assert_eq!(acts.len(), 2, "step1 and one awareness frame: {acts:?}");
    let all = sends(&acts, B);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].entries.len(), 2);

    let acts = room.receive(B, &[0x03]).unwrap();
    assert_eq!(sends(&acts, B)[0].entries.len(), 2);
    // Unknown client at clock 0 is rejected, exactly as JS peers would.
    assert!(room.receive(B, &aw_frame(&[(9, 0, Some("{}"))])).unwrap().is_empty());
}

#[test]
fn disconnect_removes_the_clients_that_connection_introduced() {
    let mut room = Room::new("d");
    room.connect(A).unwrap();
    room.connect(B).unwrap();
    room.receive(A, &aw_frame(&[(7, 4, Some(r#"{"a":1}"#))])).unwrap();
    room.receive(B, &aw_frame(&[(8, 1, Some(r#"{"b":1}"#))])).unwrap();
    // B relays A's client (JS clients re-send everything they apply): must not steal it.
    room.receive(B, &aw_frame(&[(7, 4, Some(r#"{"a":1}"#))])).unwrap();

    let mut peer = JsPeer::default();
    peer.apply(&room.awareness().all_states().unwrap());
    assert_eq!(peer.states.len(), 2);

    let acts = room.disconnect(A);
    let b = broadcasts(&acts);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].0, Some(A));
    assert_eq!(b[0].1.entries, vec![AwarenessEntry { client_id: 7, clock: 4, state: None }]);
    peer.apply(&b[0].1);
    assert!(!peer.states.contains_key(&7), "JS peer must accept the removal");
    assert!(peer.states.contains_key(&8));
    assert_eq!(room.awareness().state(8), Some(r#"{"b":1}"#));
    assert!(room.disconnect(A).is_empty(), "disconnect is idempotent");
}

#[test]
fn rejoining_client_is_visible_to_peers_at_once() {
    let mut room = Room::new("d");
    room.connect(A).unwrap();
    room.connect(B).unwrap();
    let mut peer_b = JsPeer::default();
    let state = r#"{"user":"ann"}"#;
    for (_, u) in broadcasts(&room.receive(A, &aw_frame(&[(7, 5, Some(state))])).unwrap()) {
        peer_b.apply(&u);
    }
    for (_, u) in broadcasts(&room.disconnect(A)) {
        peer_b.apply(&u);
    }
    assert!(!peer_b.states.contains_key(&7));

    // Same client reconnects on a new socket and re-sends its state with its *old* clock.
    room.connect(A2).unwrap();
    let acts = room.receive(A2, &aw_frame(&[(7, 5, Some(state))])).unwrap();
    let b = broadcasts(&acts);
    assert_eq!(b.len(), 1, "server must accept the returning client at once: {acts:?}");
    assert_eq!(b[0].0, None);
    for (_, u) in &b {
        peer_b.apply(u);
    }
    assert_eq!(peer_b.states.get(&7).map(String::as_str), Some(state), "peer must show it again");

    // The returning client adopts the bumped clock from our echo; its next renewal is accepted.
    let mut returning = JsPeer { clock: HashMap::from([(7, 5)]), states: HashMap::from([(7, state.into())]) };
    returning.apply(&b[0].1);
    let next = returning.clock[&7] + 1;
    let acts = room.receive(A2, &aw_frame(&[(7, next, Some(state))])).unwrap();
    assert_eq!(broadcasts(&acts).len(), 1);

    // And the new socket now owns it: closing it removes the client again.
    assert_eq!(broadcasts(&room.disconnect(A2))[0].1.entries[0].client_id, 7);
}

#[test]
fn stale_relay_after_removal_does_not_resurrect_a_ghost() {
    let mut room = Room::new("d");
    room.connect(A).unwrap();
    room.connect(B).unwrap();
    room.receive(A, &aw_frame(&[(7, 5, Some("{}"))])).unwrap();
    room.disconnect(A);
    // B had received clock 5 just before the removal and relays it afterwards.
    assert!(room.receive(B, &aw_frame(&[(7, 5, Some("{}"))])).unwrap().is_empty());
    assert_eq!(room.awareness().state(7), None);
    // A relayed null for a removed client changes nothing either.
    assert!(room.receive(B, &aw_frame(&[(7, 5, None)])).unwrap().is_empty());
}

#[test]
fn client_that_reconnects_before_its_old_socket_is_noticed_dead_is_not_removed() {
    let mut room = Room::new("d");
    room.connect(A).unwrap();
    room.receive(A, &aw_frame(&[(7, 5, Some("{}"))])).unwrap();
    room.connect(A2).unwrap();
    // Renewal through the new socket (newer clock) moves ownership.
    room.receive(A2, &aw_frame(&[(7, 6, Some("{}"))])).unwrap();
    assert!(room.disconnect(A).is_empty(), "old socket's close must not remove a live client");
    assert!(room.awareness().state(7).is_some());
}

#[test]
fn keepalive_is_an_empty_awareness_update() {
    assert_eq!(moai_yjs::KEEPALIVE_FRAME, [0x01, 0x01, 0x00]);
    let Message::Awareness(bytes) = Message::decode(&moai_yjs::KEEPALIVE_FRAME).unwrap() else { panic!() };
    assert!(AwarenessUpdate::decode(bytes).unwrap().is_empty());
}

#[test]
fn awareness_update_round_trips_and_null_is_detected() {
    let u = AwarenessUpdate {
        entries: vec![
            AwarenessEntry { client_id: 1, clock: 1 << 40, state: Some(r#"{"n":"é"}"#.into()) },
            AwarenessEntry { client_id: u32::MAX as u64, clock: 0, state: None },
        ],
    };
    assert_eq!(AwarenessUpdate::decode(&u.encode()).unwrap(), u);
    // JSON `null` with whitespace is still null.
    let mut raw = vec![0x01, 0x01, 0x01, 0x06];
    raw.extend_from_slice(b" null ");
    assert_eq!(AwarenessUpdate::decode(&raw).unwrap().entries[0].state, None);
    // Huge count with no entries behind it is an error, not an allocation.
    assert!(AwarenessUpdate::decode(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
}

fn closes(actions: &[Action]) -> Vec<(ConnId, u16, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Close { conn, code, reason } => Some((*conn, *code, reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn one_connection_cannot_flood_presence() {
    let mut room = Room::new("d");
    room.connect(A).unwrap();
    room.connect(B).unwrap();
    // 64 client ids from one socket are accepted (a reconnect race owns a few; 64 is generous).
    let many: Vec<(u64, u64, Option<&str>)> = (1..=64).map(|id| (id, 1, Some("{}"))).collect();
    let acts = room.receive(A, &aw_frame(&many)).unwrap();
    assert!(closes(&acts).is_empty());
    assert_eq!(room.awareness().present_count(), 64);
    // A 65th is refused, the connection closed, and nothing of the frame applied.
    let acts = room.receive(A, &aw_frame(&[(1, 2, Some(r#"{"x":1}"#)), (65, 1, Some("{}"))])).unwrap();
    let c = closes(&acts);
    assert_eq!((c.len(), c[0].0, c[0].1), (1, A, 1008), "{c:?}");
    assert_eq!(room.awareness().state(1), Some("{}"), "the frame was refused whole");
    assert_eq!(room.awareness().present_count(), 64);

    // Relaying other clients' states (as every y-websocket client does) owns nothing and
    // never counts against the relaying socket.
    let relay: Vec<(u64, u64, Option<&str>)> = (1..=64).map(|id| (id, 1, Some("{}"))).collect();
    assert!(closes(&room.receive(B, &aw_frame(&relay)).unwrap()).is_empty());

    // One state over 64 KiB is refused.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(64 * 1024));
    let acts = room.receive(B, &aw_frame(&[(900, 1, Some(&big))])).unwrap();
    let c = closes(&acts);
    assert_eq!((c[0].0, c[0].1), (B, 1008), "{c:?}");
    assert_eq!(room.awareness().state(900), None);
}

#[test]
fn tombstones_are_bounded_and_forgetting_one_spares_a_returned_client() {
    let mut t = moai_yjs::AwarenessTracker::new(2).with_limits(1000, 1024);
    t.add_connection(A);
    let set = |id, clock| AwarenessUpdate {
        entries: vec![AwarenessEntry { client_id: id, clock, state: Some("{}".into()) }],
    };
    let del = |id, clock| AwarenessUpdate { entries: vec![AwarenessEntry { client_id: id, clock, state: None }] };
    t.apply(A, &set(1, 1)).unwrap();
    t.apply(A, &del(1, 1)).unwrap(); // tombstone for 1
    t.apply(A, &set(1, 2)).unwrap(); // 1 comes back
    t.apply(A, &set(2, 1)).unwrap();
    t.apply(A, &del(2, 1)).unwrap();
    t.apply(A, &set(3, 1)).unwrap();
    t.apply(A, &del(3, 1)).unwrap(); // third tombstone: the oldest (1's) is dropped
    assert_eq!(t.state(1), Some("{}"), "a client that came back is not forgotten with its old tombstone");
    // A stale relay of 2 (still tombstoned) does not resurrect it.
    assert!(t.apply(A, &set(2, 1)).unwrap().is_none());
}
