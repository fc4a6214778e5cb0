//! The room's answers to connections joined as Hocuspocus (docs/protocols/hocuspocus.md):
//! SyncStep1 answered with SyncStep2 + SyncStep1, acknowledgements after the Persist, read-only
//! acknowledgements, stateless messages, and y-websocket connections sharing the document.

use moai_yjs::hocuspocus::{stateless_message, sync_status_message};
use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::updates::encoder::Encode;
use moai_yjs::yrs::{Doc, ReadTxn, StateVector, Text, Transact};
use moai_yjs::{cluster, Access, Action, ConnId, Dialect, Message, Room, SyncMessage};

const H: ConnId = ConnId(1);
const H2: ConnId = ConnId(2);
const Y: ConnId = ConnId(3);

fn insert(doc: &Doc, s: &str) -> Vec<u8> {
    let text = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    let len = text.len(&txn);
    text.insert(&mut txn, len, s);
    txn.encode_update_v1()
}

fn step1(doc: &Doc) -> Vec<u8> {
    Message::Sync(SyncMessage::Step1(&doc.transact().state_vector().encode_v1())).encode()
}

fn step2(update: &[u8]) -> Vec<u8> {
    Message::Sync(SyncMessage::Step2(update)).encode()
}

fn update(update: &[u8]) -> Vec<u8> {
    Message::Sync(SyncMessage::Update(update)).encode()
}

fn room_with(conns: &[(ConnId, Access, Dialect)]) -> Room {
    let mut room = Room::new("doc");
    for (conn, access, dialect) in conns {
        room.connect_as(*conn, *access, *dialect).unwrap();
    }
    room
}

fn ack(conn: ConnId, applied: bool) -> Action {
    Action::Send { conn, frame: sync_status_message(applied) }
}

#[test]
fn a_hocuspocus_connection_gets_no_step1_on_connect_and_step2_then_step1_on_its_own() {
    let mut room = Room::new("doc");
    assert_eq!(room.connect_as(H, Access::ReadWrite, Dialect::Hocuspocus).unwrap(), vec![]);
    let client = Doc::new();
    let actions = room.receive(H, &step1(&client)).unwrap();
    // SyncStep2 with the (empty) document, then our state vector `00`.
    assert_eq!(
        actions,
        vec![Action::Send { conn: H, frame: vec![0, 1, 2, 0, 0] }, Action::Send { conn: H, frame: vec![0, 0, 1, 0] }]
    );
    // Asked again (the provider's forceSync): the coalesced empty answer, and our SyncStep1 again.
    let actions = room.receive(H, &step1(&client)).unwrap();
    assert_eq!(actions.len(), 2);
    assert_eq!(actions[1], Action::Send { conn: H, frame: vec![0, 0, 1, 0] });
}

#[test]
fn updates_are_acknowledged_after_their_persist_and_shared_with_y_websocket() {
    let mut room =
        room_with(&[(H, Access::ReadWrite, Dialect::Hocuspocus), (Y, Access::ReadWrite, Dialect::YWebsocket)]);
    let writer = Doc::new();
    let u = insert(&writer, "hi");
    let actions = room.receive(H, &update(&u)).unwrap();
    assert!(matches!(actions[0], Action::Persist { .. }), "{actions:?}");
    assert!(matches!(&actions[1], Action::Broadcast { except: Some(H), .. }), "{actions:?}");
    assert_eq!(actions[2], ack(H, true));
    assert_eq!(actions.len(), 3);

    // The same update again changes nothing: still acknowledged (it is durable), nothing stored.
    assert_eq!(room.receive(H, &update(&u)).unwrap(), vec![ack(H, true)]);
    // A SyncStep2 is acknowledged like an update.
    let more = insert(&writer, "!");
    let actions = room.receive(H, &step2(&more)).unwrap();
    assert!(matches!(actions[0], Action::Persist { .. }));
    assert_eq!(actions.last(), Some(&ack(H, true)));

    // A y-websocket connection's update reaches the Hocuspocus one; it gets no acknowledgement.
    let other = Doc::new();
    let actions = room.receive(Y, &update(&insert(&other, "yo"))).unwrap();
    assert!(matches!(actions[0], Action::Persist { .. }));
    assert!(matches!(&actions[1], Action::Broadcast { except: Some(Y), .. }));
    assert_eq!(actions.len(), 2);
}

#[test]
fn an_update_that_skips_changes_is_refused_with_zero_and_a_step1() {
    let mut room = room_with(&[(H, Access::ReadWrite, Dialect::Hocuspocus)]);
    let writer = Doc::with_client_id(7);
    let _first = insert(&writer, "a"); // never sent
    let second = insert(&writer, "b");
    let actions = room.receive(H, &update(&second)).unwrap();
    assert_eq!(actions[0], ack(H, false));
    assert!(matches!(&actions[1], Action::Send { conn: H, frame } if frame[..2] == [0, 0]), "{actions:?}");
    assert_eq!(actions.len(), 2);
}

#[test]
fn a_read_only_connection_is_told_with_the_acknowledgement() {
    let mut room =
        room_with(&[(H, Access::ReadOnly, Dialect::Hocuspocus), (Y, Access::ReadWrite, Dialect::YWebsocket)]);
    let writer = Doc::new();
    let shared = insert(&writer, "shared");
    room.receive(Y, &update(&shared)).unwrap();

    // Its own edit: refused, nothing stored or sent, no y-protocols permission-denied message.
    let reader = Doc::new();
    reader.transact_mut().apply_update(moai_yjs::yrs::Update::decode_v1(&shared).unwrap()).unwrap();
    let own = insert(&reader, "mine");
    assert_eq!(room.receive(H, &update(&own)).unwrap(), vec![ack(H, false)]);
    // Its SyncStep2 with what the room already has (its answer to our SyncStep1): `1`.
    let ours = StateVector::default();
    let nothing_new = writer.transact().encode_state_as_update_v1(&ours);
    assert_eq!(room.receive(H, &step2(&nothing_new)).unwrap(), vec![ack(H, true)]);
    // With its own edit in it: `0`.
    let with_edit = reader.transact().encode_state_as_update_v1(&ours);
    assert_eq!(room.receive(H, &step2(&with_edit)).unwrap(), vec![ack(H, false)]);
    // A deletion the room lacks is something new too.
    let deleting = Doc::new();
    deleting.transact_mut().apply_update(moai_yjs::yrs::Update::decode_v1(&shared).unwrap()).unwrap();
    let deletion = {
        let text = deleting.get_or_insert_text("t");
        let mut txn = deleting.transact_mut();
        text.remove_range(&mut txn, 0, 1);
        txn.encode_update_v1()
    };
    assert_eq!(room.receive(H, &step2(&deletion)).unwrap(), vec![ack(H, false)]);
    assert_eq!(room.receive(H, &step2(b"garbage")).unwrap(), vec![ack(H, false)]);
    assert_eq!(room.stats().read_only_dropped, 5);
}

#[test]
fn stateless_messages_go_to_the_other_hocuspocus_connections() {
    let mut room = room_with(&[
        (H, Access::ReadWrite, Dialect::Hocuspocus),
        (H2, Access::ReadOnly, Dialect::Hocuspocus),
        (Y, Access::ReadWrite, Dialect::YWebsocket),
    ]);
    let message = stateless_message("{\"ping\":1}");
    assert_eq!(room.receive(H, &message).unwrap(), vec![Action::Send { conn: H2, frame: message.clone() }]);
    // A read-only connection may send them too (they are not document changes).
    assert_eq!(room.receive(H2, &message).unwrap(), vec![Action::Send { conn: H, frame: message.clone() }]);
    // From a y-websocket connection type 5 means nothing: counted and ignored.
    assert_eq!(room.receive(Y, &message).unwrap(), vec![]);
    assert_eq!(room.stats().unknown_messages, 1);

    // Too large: this document's connection is closed with 1008; malformed: 1007.
    let big = stateless_message(&"x".repeat(moai_yjs::room::MAX_STATELESS_BYTES + 1));
    assert!(matches!(&room.receive(H, &big).unwrap()[..], [Action::Close { conn: H, code: 1008, .. }]));
    assert!(matches!(&room.receive(H2, &[5, 9, b'x']).unwrap()[..], [Action::Close { conn: H2, code: 1007, .. }]));
}

#[test]
fn stateless_messages_cross_instances_in_a_cluster() {
    let mut room =
        room_with(&[(H, Access::ReadWrite, Dialect::Hocuspocus), (H2, Access::ReadWrite, Dialect::Hocuspocus)]);
    room.set_clustered();
    let actions = room.receive(H, &stateless_message("hello")).unwrap();
    assert_eq!(actions[1], Action::Publish { kind: cluster::STATELESS, payload: b"hello".to_vec() });
    let actions = room.receive_from_instance(9, cluster::STATELESS, b"hi there").unwrap();
    let message = stateless_message("hi there");
    assert_eq!(
        actions,
        vec![Action::Send { conn: H, frame: message.clone() }, Action::Send { conn: H2, frame: message }]
    );
}
