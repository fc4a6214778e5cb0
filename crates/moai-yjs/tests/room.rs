//! Room behaviour as a y-websocket client and the server edge observe it.

mod support;

use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::{GetString, ReadTxn, StateVector, Text, Transact};
use moai_yjs::{
    load_room, Action, ConnId, Message, Room, RoomError, SyncMessage, CLOSE_INVALID_PAYLOAD, CLOSE_PROTOCOL_ERROR,
    KEEPALIVE_FRAME,
};
use support::*;

#[test]
fn connect_sends_server_step1_then_nothing_else_when_nobody_is_present() {
    let mut room = Room::new("doc");
    let actions = room.connect(ConnId(1)).unwrap();
    // An empty doc's state vector is `00`: frame `00 00 01 00` (docs/protocols/yjs.md §2.5).
    assert_eq!(actions, vec![Action::Send { conn: ConnId(1), frame: vec![0, 0, 1, 0] }]);
}

#[test]
fn step1_from_client_is_answered_with_what_it_lacks() {
    let mut room = Room::new("doc");
    let mut driver = Driver::default();
    let mut clients = vec![Client::new(1), Client::new(2)];
    clients[0].insert(0, "hello");
    join(&mut room, &mut driver, &mut clients, 0);
    join(&mut room, &mut driver, &mut clients, 1);
    assert_eq!(clients[1].text(), "hello");
    assert_eq!(text_of(room.doc()), "hello");

    // A client that already has everything gets an empty update (`00 00`).
    let step1 = clients[1].step1_frame();
    let actions = room.receive(ConnId(2), &step1).unwrap();
    assert_eq!(actions, vec![Action::Send { conn: ConnId(2), frame: vec![0, 1, 2, 0, 0] }]);
}

#[test]
fn two_clients_converge_through_the_room() {
    let mut room = Room::new("doc");
    let mut driver = Driver::default();
    let mut clients = vec![Client::new(1), Client::new(2)];
    join(&mut room, &mut driver, &mut clients, 0);
    join(&mut room, &mut driver, &mut clients, 1);

    // Concurrent edits: both clients edit before seeing each other's change.
    let ua = clients[0].insert(0, "alpha ");
    let ub = clients[1].insert(0, "beta ");
    let acts = room.receive(ConnId(1), &update_frame(&ua)).unwrap();
    driver.run(&room, &mut clients, acts);
    let acts = room.receive(ConnId(2), &update_frame(&ub)).unwrap();
    driver.run(&room, &mut clients, acts);
    for i in 0..20 {
        let c = i % 2;
        let len = clients[c].text().chars().count() as u32;
        let u = clients[c].insert(len / 2, &format!("{i}"));
        let acts = room.receive(clients[c].conn, &update_frame(&u)).unwrap();
        driver.run(&room, &mut clients, acts);
    }

    let server = text_of(room.doc());
    assert_eq!(clients[0].text(), server);
    assert_eq!(clients[1].text(), server);
    assert!(server.contains("alpha") && server.contains("beta"), "{server}");
    assert_eq!(server.len(), "alpha beta ".len() + (0..20).map(|i: i32| i.to_string().len()).sum::<usize>());
}

#[test]
fn offline_edits_are_uploaded_through_the_server_step1() {
    // A client that edited while disconnected must not need to send step1 itself: the
    // server's SyncStep1 on connect makes it answer with its missing edits (docs/protocols/yjs.md §3.2).
    let mut room = Room::new("doc");
    let mut driver = Driver::default();
    let mut clients = vec![Client::new(1)];
    clients[0].insert(0, "offline edit");
    let acts = room.connect(ConnId(1)).unwrap();
    driver.run(&room, &mut clients, acts);
    let server_sv = clients[0].step1_received[0].clone();
    let acts = room.receive(ConnId(1), &clients[0].step2_for(&server_sv)).unwrap();
    driver.run(&room, &mut clients, acts);
    assert_eq!(text_of(room.doc()), "offline edit");
    assert_eq!(driver.journal.len(), 1);
}

#[test]
fn update_is_persisted_before_it_is_broadcast_and_not_echoed_to_sender() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    room.connect(ConnId(2)).unwrap();
    let client = Client::new(1);
    let update = client.insert(0, "x");
    let actions = room.receive(ConnId(1), &update_frame(&update)).unwrap();
    assert_eq!(actions.len(), 2, "{actions:?}");
    let Action::Persist { update: persisted } = &actions[0] else { panic!("first must be Persist: {actions:?}") };
    let Action::Broadcast { except, frame } = &actions[1] else { panic!("then Broadcast: {actions:?}") };
    assert_eq!(*except, Some(ConnId(1)));
    // The broadcast carries exactly what was persisted.
    assert_eq!(Message::decode(frame).unwrap(), Message::Sync(SyncMessage::Update(persisted)));
    assert_eq!(text_of(&load_journal(std::slice::from_ref(persisted))), "x");
}

#[test]
fn update_with_nothing_new_is_neither_persisted_nor_broadcast() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    let client = Client::new(1);
    let update = client.insert(0, "x");
    assert_eq!(room.receive(ConnId(1), &update_frame(&update)).unwrap().len(), 2);
    // The same update again (e.g. the JS client's own echo or a resync) changes nothing.
    assert_eq!(room.receive(ConnId(1), &update_frame(&update)).unwrap(), vec![]);
    // The empty update `00 00` as SyncStep2 too.
    assert_eq!(room.receive(ConnId(1), &[0, 1, 2, 0, 0]).unwrap(), vec![]);
    assert_eq!(room.stats().updates_applied, 1);
    assert_eq!(room.stats().updates_without_effect, 2);
}

/// A client's changes out of order: the later one skips the earlier (a gap in that client's
/// clock). It used to wait as pending; yrs mishandles such holes (docs/fuzzing.md), so it is not
/// applied and the sender gets our SyncStep1 instead; its SyncStep2 answer carries everything.
#[test]
fn an_out_of_order_update_is_asked_for_again_and_arrives_whole() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    let client = Client::new(1);
    let first = client.insert(0, "ab");
    let second = client.insert(2, "cd"); // depends on `first`

    let actions = room.receive(ConnId(1), &update_frame(&second)).unwrap();
    assert!(matches!(&actions[..], [Action::Send { frame, .. }] if frame[..2] == [0, 0]), "a SyncStep1: {actions:?}");
    assert!(!room.has_pending_updates());
    assert_eq!(text_of(room.doc()), "");

    let actions = room.receive(ConnId(1), &update_frame(&first)).unwrap();
    assert_eq!(text_of(room.doc()), "ab");
    let mut persisted: Vec<Vec<u8>> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Persist { update } => Some(update.clone()),
            _ => None,
        })
        .collect();
    // The client's answer to the SyncStep1 (everything after the empty state we had then).
    let both = moai_yjs::yrs::merge_updates_v1([first.as_slice(), second.as_slice()]).unwrap();
    let answer = room.receive(ConnId(1), &moai_yjs::protocol::sync_step2_frame(&both)).unwrap();
    assert_eq!(text_of(room.doc()), "abcd");
    persisted.extend(answer.iter().filter_map(|a| match a {
        Action::Persist { update } => Some(update.clone()),
        _ => None,
    }));
    // Storage matches memory.
    assert_eq!(text_of(&load_journal(&persisted)), "abcd");
}

#[test]
fn invalid_update_closes_with_1007_and_leaves_the_doc_unchanged() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    let client = Client::new(1);
    let good = client.insert(0, "keep");
    room.receive(ConnId(1), &update_frame(&good)).unwrap();
    let before = full_state(room.doc());

    let more = client.insert(4, " this and more");
    let garbage: Vec<Vec<u8>> = vec![
        vec![0xff, 0xff, 0xff],
        vec![0x01],                         // one client, then nothing
        more[..more.len() - 3].to_vec(),    // truncated valid update
        vec![0x01, 0x01, 0x05, 0x00, 0xff], // one block of an unknown kind
    ];
    for bad in garbage {
        let actions = room.receive(ConnId(1), &update_frame(&bad)).unwrap();
        assert!(
            matches!(actions.as_slice(), [Action::Close { conn: ConnId(1), code: CLOSE_INVALID_PAYLOAD, .. }]),
            "{bad:?} -> {actions:?}"
        );
        assert_eq!(full_state(room.doc()), before, "doc changed by {bad:?}");
    }
    assert_eq!(text_of(room.doc()), "keep");
}

#[test]
fn malformed_frames_close_with_1002_and_bad_step1_with_1007() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    let a = room.receive(ConnId(1), &[0x00, 0x07, 0x00]).unwrap(); // unknown sync subtype
    assert!(matches!(a.as_slice(), [Action::Close { code: CLOSE_PROTOCOL_ERROR, .. }]), "{a:?}");
    let a = room.receive(ConnId(1), &[0x00, 0x02, 0x09, 0x00]).unwrap(); // length past the end
    assert!(matches!(a.as_slice(), [Action::Close { code: CLOSE_PROTOCOL_ERROR, .. }]), "{a:?}");
    let a = room.receive(ConnId(1), &[0x00, 0x00, 0x02, 0x05, 0x80]).unwrap(); // bad state vector
    assert!(matches!(a.as_slice(), [Action::Close { code: CLOSE_INVALID_PAYLOAD, .. }]), "{a:?}");
    let a = room.receive(ConnId(1), &[0x01, 0x04, 0x01, 0x07, 0x01, b'{']).unwrap(); // bad JSON
    assert!(matches!(a.as_slice(), [Action::Close { code: CLOSE_INVALID_PAYLOAD, .. }]), "{a:?}");
}

#[test]
fn unknown_auth_and_keepalive_messages_are_ignored() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    assert_eq!(room.receive(ConnId(1), &[0x64, 0x01, 0x02]).unwrap(), vec![]);
    assert_eq!(room.receive(ConnId(1), &[0x02, 0x00, 0x00]).unwrap(), vec![]);
    assert_eq!(room.receive(ConnId(1), &KEEPALIVE_FRAME).unwrap(), vec![]);
    assert_eq!(room.stats().unknown_messages, 1);
}

#[test]
fn frames_from_unknown_connections_are_a_driver_error() {
    let mut room = Room::new("doc");
    assert!(matches!(room.receive(ConnId(9), &KEEPALIVE_FRAME), Err(RoomError::UnknownConnection(ConnId(9)))));
    room.connect(ConnId(9)).unwrap();
    room.disconnect(ConnId(9));
    assert!(room.receive(ConnId(9), &KEEPALIVE_FRAME).is_err());
}

#[test]
fn concatenated_messages_in_one_frame_are_all_handled() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    let client = Client::new(1);
    let mut frame = client.step1_frame();
    frame.extend_from_slice(&update_frame(&client.insert(0, "z")));
    let actions = room.receive(ConnId(1), &frame).unwrap();
    assert!(
        matches!(actions.as_slice(), [Action::Send { .. }, Action::Persist { .. }, Action::Broadcast { .. }]),
        "{actions:?}"
    );
}

#[test]
fn http_update_is_persisted_then_broadcast_to_everyone() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    let writer = Client::new(50);
    let actions = room.apply_http_update(&writer.insert(0, "from http")).unwrap();
    assert!(
        matches!(actions.as_slice(), [Action::Persist { .. }, Action::Broadcast { except: None, .. }]),
        "{actions:?}"
    );
    assert_eq!(text_of(room.doc()), "from http");

    let before = full_state(room.doc());
    match room.apply_http_update(&[0x03, 0x01]) {
        Err(RoomError::InvalidUpdate { actions, .. }) => assert!(actions.is_empty()),
        other => panic!("expected InvalidUpdate, got {other:?}"),
    }
    assert_eq!(full_state(room.doc()), before);
}

#[test]
fn busy_document_is_reported_not_deadlocked() {
    let mut room = Room::new("doc");
    room.connect(ConnId(1)).unwrap();
    let update = Client::new(1).insert(0, "x");
    let handle = room.doc().clone();
    let read = handle.transact();
    assert!(matches!(room.receive(ConnId(1), &update_frame(&update)), Err(RoomError::Busy)));
    drop(read);
    assert_eq!(room.receive(ConnId(1), &update_frame(&update)).unwrap().len(), 2);
}

#[test]
fn load_from_snapshot_and_journal_equals_the_live_state() {
    let mut room = Room::new("doc");
    let mut driver = Driver::default();
    let mut clients = vec![Client::new(1), Client::new(2)];
    join(&mut room, &mut driver, &mut clients, 0);
    join(&mut room, &mut driver, &mut clients, 1);
    let mut snapshot = None;
    for i in 0..30u32 {
        let c = (i % 2) as usize;
        let len = clients[c].text().chars().count() as u32;
        let u = clients[c].insert((i * 7) % (len + 1), &format!("<{i}>"));
        let acts = room.receive(clients[c].conn, &update_frame(&u)).unwrap();
        driver.run(&room, &mut clients, acts);
        if i == 12 {
            // Compaction: snapshot, then only later journal entries are kept.
            snapshot = Some((room.encode_state_as_update().unwrap(), driver.journal.len()));
        }
    }
    let (snapshot, cut) = snapshot.unwrap();
    let tail: Vec<&[u8]> = driver.journal[cut..].iter().map(|u| u.as_slice()).collect();
    let loaded = load_room("doc", Some(&snapshot), tail.iter().copied()).unwrap();
    assert_eq!(text_of(loaded.doc()), text_of(room.doc()));
    assert_eq!(loaded.state_vector().unwrap(), room.state_vector().unwrap());

    // Journal alone (no snapshot) gives the same, and so does snapshot + the whole journal
    // (replaying entries the snapshot already covers is harmless).
    assert_eq!(text_of(&load_journal(&driver.journal)), text_of(room.doc()));
    let all: Vec<&[u8]> = driver.journal.iter().map(|u| u.as_slice()).collect();
    let loaded = load_room("doc", Some(&snapshot), all.iter().copied()).unwrap();
    assert_eq!(text_of(loaded.doc()), text_of(room.doc()));
}

#[test]
fn load_failure_is_an_error_not_an_empty_doc() {
    let good = Client::new(1).insert(0, "data");
    assert!(matches!(
        load_room("doc", Some(&[0xff, 0xff]), std::iter::empty()),
        Err(moai_yjs::LoadError::SnapshotDecode(_))
    ));
    let journal: Vec<&[u8]> = vec![&good, &[0x05]];
    assert!(matches!(
        load_room("doc", None, journal.iter().copied()),
        Err(moai_yjs::LoadError::JournalDecode { index: 1, .. })
    ));
    let loaded = load_room("doc", Some(&good), std::iter::empty()).unwrap();
    assert_eq!(text_of(loaded.doc()), "data");
    let sv = loaded.doc().transact().state_vector();
    assert_eq!(sv, StateVector::decode_v1(&loaded.state_vector().unwrap()).unwrap());
}

#[test]
fn repeated_state_requests_are_answered_once_until_something_changes() {
    let mut room = Room::new("doc");
    let a = ConnId(1);
    let b = ConnId(2);
    room.connect(a).unwrap();
    room.connect(b).unwrap();
    let writer = Client::new(9);
    room.receive(b, &moai_yjs::protocol::sync_update_frame(&writer.insert(0, "x"))).unwrap();
    let step1 = moai_yjs::protocol::sync_step1_frame(&[0]);
    // Full answers (not the empty SyncStep2 `00 01 02 00 00` nor the empty awareness `01 01 00`).
    let full = |acts: &[Action]| {
        acts.iter()
            .filter(|x| match x {
                Action::Send { frame, .. } => frame[..] != [0, 1, 2, 0, 0][..] && frame[..] != [1, 1, 0][..],
                _ => false,
            })
            .count()
    };
    let replies = |acts: &[Action]| acts.iter().filter(|x| matches!(x, Action::Send { .. })).count();
    assert_eq!(full(&room.receive(a, &step1).unwrap()), 1, "first request answered in full");
    for _ in 0..100 {
        let acts = room.receive(a, &step1).unwrap();
        assert_eq!((full(&acts), replies(&acts)), (0, 1), "answered, with the empty update");
    }
    // Another connection has its own memory.
    assert_eq!(full(&room.receive(b, &step1).unwrap()), 1);
    // After a change, the same request gets a full answer again.
    room.receive(b, &moai_yjs::protocol::sync_update_frame(&writer.insert(1, "y"))).unwrap();
    assert_eq!(full(&room.receive(a, &step1).unwrap()), 1);

    // QueryAwareness likewise.
    let query = [3u8];
    let aw = Message::Awareness(
        &moai_yjs::AwarenessUpdate {
            entries: vec![moai_yjs::AwarenessEntry { client_id: 5, clock: 1, state: Some("{}".into()) }],
        }
        .encode(),
    )
    .encode();
    room.receive(b, &aw).unwrap();
    assert_eq!(full(&room.receive(a, &query).unwrap()), 1);
    let acts = room.receive(a, &query).unwrap();
    assert_eq!((full(&acts), replies(&acts)), (0, 1));
    room.receive(
        b,
        &Message::Awareness(
            &moai_yjs::AwarenessUpdate {
                entries: vec![moai_yjs::AwarenessEntry { client_id: 5, clock: 2, state: Some("{}".into()) }],
            }
            .encode(),
        )
        .encode(),
    )
    .unwrap();
    assert_eq!(full(&room.receive(a, &query).unwrap()), 1);
    assert_eq!(room.stats().coalesced_requests, 101);
}

/// Found by the `yjs_frame` fuzz target: this update used to be accepted (parked as pending), and
/// the next full-state encode made yrs panic while re-reading it. It holds legacy JSON content,
/// which yrs writes and reads back differently; it is refused as it arrives now, over HTTP and
/// from a socket, and the document stays usable.
#[test]
fn an_update_yrs_panicked_on_later_is_refused_up_front() {
    let update =
        [1u8, 1, 1, 22, 194, 1, 207, 188, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 132, 0, 1, 194, 22, 1, 207, 188, 129, 228, 166];
    let mut room = Room::new("doc");
    assert!(matches!(room.apply_http_update(&update), Err(RoomError::InvalidUpdate { .. })));
    assert!(room.encode_state_as_update().is_ok());
    room.connect(ConnId(1)).unwrap();
    let frame = moai_yjs::protocol::sync_update_frame(&update);
    let actions = room.receive(ConnId(1), &frame).unwrap();
    assert!(
        actions.iter().any(|a| matches!(a, Action::Close { code, .. } if *code == moai_yjs::CLOSE_INVALID_PAYLOAD)),
        "{actions:?}"
    );
    assert!(room.receive(ConnId(1), &moai_yjs::protocol::sync_step1_frame(&[0])).is_ok());
}

/// Found by fuzzing: an update that yrs parks as pending, where the pending update yrs builds
/// itself claims ~2 billion structs in 36 bytes; at the next full-state encode yrs decoded it
/// again and reserved ~49 GB. The cause was legacy JSON content, which yrs writes and reads back
/// differently: such updates are refused as they arrive, and the document is untouched.
#[test]
fn an_update_whose_pending_state_yrs_could_not_read_back_is_refused() {
    let input = include_bytes!("../../../fuzz/seeds/yjs_frame/regression-yrs-pending-reencode-alloc");
    let update = &input[1..]; // the fuzz target's first byte picks the HTTP path
    let mut room = Room::from_doc("d", moai_yjs::yrs::Doc::with_client_id(1));
    match room.apply_http_update(update) {
        Err(RoomError::InvalidUpdate { reason, .. }) => assert!(reason.contains("legacy JSON"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!room.has_pending_updates());
    assert!(room.encode_state_as_update().is_ok());
    assert!(room.connect(ConnId(9)).is_ok());
}

/// Once a document has failed (yrs panicked on it, or left state it cannot read back), every
/// later call says so without touching it, whatever the driver does next: the server reloads it
/// from storage instead. (The panic comes from the debug-build test hook, which panics where yrs
/// did on the inputs fuzzing found; those are refused before yrs sees them now.)
#[test]
fn a_failed_document_stays_failed() {
    moai_yjs::set_test_panic_marker(b"PANIC-HERE".to_vec());
    let poison = {
        let doc = moai_yjs::yrs::Doc::new();
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        t.insert(&mut txn, 0, "PANIC-HERE");
        txn.encode_update_v1()
    };
    let mut room = Room::new("doc");
    assert!(matches!(room.apply_http_update(&poison), Err(RoomError::Poisoned(_))));
    assert!(matches!(room.encode_state_as_update(), Err(RoomError::Poisoned(_))));
    assert!(matches!(room.connect(ConnId(9)), Err(RoomError::Poisoned(_))));
    assert!(matches!(room.state_vector(), Err(RoomError::Poisoned(_))));
    assert!(matches!(room.apply_http_update(&[0, 0]), Err(RoomError::Poisoned(_))));
    // Another document is untouched.
    let mut other = Room::new("e");
    assert!(other.connect(ConnId(1)).is_ok());
    assert!(other.encode_state_as_update().is_ok());
}

/// Subdocuments leak in yrs 0.28 (found by fuzzing with LeakSanitizer: a document holding one is
/// never freed whole), so they are refused unless the server enables them.
#[test]
fn subdocuments_are_refused_unless_enabled() {
    use moai_yjs::yrs::Map;
    let with_subdoc = {
        let doc = moai_yjs::yrs::Doc::with_client_id(5);
        let map = doc.get_or_insert_map("m");
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "sub", moai_yjs::yrs::Doc::new());
        txn.encode_update_v1()
    };
    let mut room = Room::new("doc");
    match room.apply_http_update(&with_subdoc) {
        Err(RoomError::InvalidUpdate { reason, .. }) => assert!(reason.contains("subdocuments"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut room = Room::new("doc");
    room.set_policy(moai_yjs::Policy { allow_subdocuments: true });
    assert!(room.apply_http_update(&with_subdoc).is_ok());
}

/// Found by fuzzing: an update that skips changes of a client (yrs integrates it anyway, with a
/// placeholder for the hole), then one that lands in that hole: a use-after-free inside yrs. An
/// update that skips changes is not applied any more; a socket that sent one gets our SyncStep1
/// and answers it with everything we lack, that update's changes included, so nothing is lost
/// and the connection stays open; over HTTP it is a 409 (send the missing changes first).
#[test]
fn an_update_that_skips_changes_is_asked_for_again_instead_of_applied() {
    let input = include_bytes!("../../../fuzz/seeds/yjs_frame/regression-yrs-second-gap-uaf");
    let mut room = Room::from_doc("d", moai_yjs::yrs::Doc::with_client_id(1));
    room.connect(ConnId(1)).unwrap();
    let actions = room.receive(ConnId(1), &input[1..]).unwrap();
    assert!(!actions.iter().any(|a| matches!(a, Action::Persist { .. } | Action::Close { .. })), "{actions:?}");
    assert!(actions.iter().all(|a| matches!(a, Action::Send { frame, .. } if frame[..2] == [0, 0])), "{actions:?}");
    assert_eq!(room.stats().gaps_asked, 2);
    assert!(room.encode_state_as_update().is_ok());

    // One writer's changes, the second sent first.
    let writer = moai_yjs::yrs::Doc::with_client_id(77);
    let text = writer.get_or_insert_text("t");
    let mut steps = Vec::new();
    for word in ["a", "b"] {
        let mut txn = writer.transact_mut();
        text.push(&mut txn, word);
        steps.push(txn.encode_update_v1());
    }
    let mut room = Room::new("ordered");
    assert!(matches!(room.apply_http_update(&steps[1]), Err(RoomError::MissingDependencies { .. })));
    assert!(!room.has_pending_updates(), "not kept either");
    room.connect(ConnId(1)).unwrap();
    let frame = moai_yjs::protocol::sync_update_frame(&steps[1]);
    let asked = room.receive(ConnId(1), &frame).unwrap();
    let Some(Action::Send { frame: step1, .. }) = asked.first() else { panic!("{asked:?}") };
    // The client answers our SyncStep1 with its whole diff: both changes, in one update.
    let Ok(moai_yjs::Message::Sync(moai_yjs::SyncMessage::Step1(sv))) = moai_yjs::Message::decode(step1) else {
        panic!("{step1:?}")
    };
    let answer = writer.transact().encode_state_as_update_v1(&StateVector::decode_v1(sv).unwrap());
    room.receive(ConnId(1), &moai_yjs::protocol::sync_step2_frame(&answer)).unwrap();
    let state = room.encode_state_as_update().unwrap();
    let reader = moai_yjs::yrs::Doc::new();
    reader.transact_mut().apply_update(moai_yjs::yrs::Update::decode_v1(&state).unwrap()).unwrap();
    assert_eq!(reader.get_or_insert_text("t").get_string(&reader.transact()), "ab");
}
