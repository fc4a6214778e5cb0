//! Two rooms of one document on two instances, wired by hand as the cluster bus would wire
//! them (sans-IO): what crosses, when, and how a lost message is repaired.

mod support;

use moai_yjs::cluster::{ASK_PRESENCE, AWARENESS, STATE, UPDATE};
use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::{ReadTxn, Text, Transact, Update};
use moai_yjs::{Action, AwarenessEntry, AwarenessUpdate, Message, Room};
use support::{join, load_journal, Client, Driver};

const A: u64 = 1;
const B: u64 = 2;

struct Instance {
    room: Room,
    driver: Driver,
    clients: Vec<Client>,
}

impl Instance {
    fn new(first_client: u64) -> Self {
        let mut room = Room::new("doc");
        room.set_clustered();
        let mut me = Instance { room, driver: Driver::default(), clients: vec![Client::new(first_client)] };
        join(&mut me.room, &mut me.driver, &mut me.clients, 0);
        me
    }

    fn run(&mut self, actions: Vec<Action>) {
        self.driver.run(&self.room, &mut self.clients, actions);
    }

    fn take_published(&mut self) -> Vec<(u8, Vec<u8>)> {
        std::mem::take(&mut self.driver.published)
    }

    /// Delivers publications of instance `from`, whose journal appends are `shared` (storage).
    fn receive(&mut self, from: u64, shared: &[Vec<u8>], published: Vec<(u8, Vec<u8>)>) {
        self.driver.journal_elsewhere = shared.to_vec();
        for (kind, payload) in published {
            let actions = self.room.receive_from_instance(from, kind, &payload).expect("cluster message");
            self.run(actions);
        }
    }

    fn edit(&mut self, index: u32, s: &str) {
        let update = self.clients[0].insert(index, s);
        let actions = self.room.receive(self.clients[0].conn, &support::update_frame(&update)).unwrap();
        self.run(actions);
    }

    fn text(&self) -> String {
        self.clients[0].text()
    }
}

/// Every update an instance publishes is in the shared journal (both instances' appends).
fn assert_durable(published: &[(u8, Vec<u8>)], a: &Instance, b: &Instance) {
    let journal: Vec<Vec<u8>> = a.driver.journal.iter().chain(&b.driver.journal).cloned().collect();
    let durable = load_journal(&journal);
    let durable_sv = durable.transact().state_vector();
    for (kind, payload) in published {
        if *kind == UPDATE {
            let sv = Update::decode_v1(payload).unwrap().state_vector();
            for (client, clock) in sv.iter() {
                assert!(durable_sv.get(client) >= *clock, "a publication carries changes that are not durable");
            }
        }
    }
}

#[test]
fn an_update_crosses_after_its_persist_and_is_neither_stored_nor_published_again() {
    let (mut a, mut b) = (Instance::new(1), Instance::new(2));
    let journal_before = b.driver.journal.len();
    let update = a.clients[0].insert(0, "hello");
    let actions = a.room.receive(a.clients[0].conn, &support::update_frame(&update)).unwrap();
    // Persist, then Publish, then the broadcast: the publication waits for durability.
    let persist = actions.iter().position(|x| matches!(x, Action::Persist { .. })).unwrap();
    let publish = actions.iter().position(|x| matches!(x, Action::Publish { kind: UPDATE, .. })).unwrap();
    assert!(persist < publish);
    a.run(actions);
    let published = a.take_published();
    assert_durable(&published, &a, &b);
    b.receive(A, &a.driver.journal.clone(), published);
    assert_eq!(b.text(), "hello");
    assert_eq!(b.driver.journal.len(), journal_before, "already durable: not stored again");
    assert!(b.take_published().is_empty(), "not published again");
    assert_eq!(b.room.stats().cluster_updates_applied, 1);
}

#[test]
fn a_lost_update_is_repaired_by_the_state_exchange() {
    let (mut a, mut b) = (Instance::new(1), Instance::new(2));
    a.edit(0, "lost ");
    drop(a.take_published()); // the bus lost it
    a.edit(5, "kept");
    let published = a.take_published();
    // B cannot apply the second update (it builds on the first): it says what it has.
    b.receive(A, &a.driver.journal.clone(), published);
    assert_eq!(b.text(), "");
    let asked = b.take_published();
    assert!(asked.iter().any(|(k, _)| *k == STATE), "B asks with its state");
    // A answers with exactly what B lacks, which is durable.
    a.receive(B, &b.driver.journal.clone(), asked);
    let answer = a.take_published();
    assert_durable(&answer, &a, &b);
    b.receive(A, &a.driver.journal.clone(), answer);
    assert_eq!(b.text(), "lost kept");
    assert_eq!(a.text(), b.text());
}

#[test]
fn a_lost_deletion_is_found_by_the_periodic_exchange() {
    let (mut a, mut b) = (Instance::new(1), Instance::new(2));
    a.edit(0, "hello world");
    let published = a.take_published();
    b.receive(A, &a.driver.journal.clone(), published);
    assert_eq!(b.text(), "hello world");
    // A deletion changes no state vector, and its message is lost.
    let update = {
        let text = a.clients[0].doc.get_or_insert_text("t");
        let mut txn = a.clients[0].doc.transact_mut();
        text.remove_range(&mut txn, 0, 6);
        txn.encode_update_v1()
    };
    let actions = a.room.receive(a.clients[0].conn, &support::update_frame(&update)).unwrap();
    a.run(actions);
    drop(a.take_published());
    // B's periodic exchange: A sees B lacks a deletion and sends it.
    let state = b.room.state_for_cluster().unwrap();
    b.run(vec![state]);
    let state = b.take_published();
    a.receive(B, &b.driver.journal.clone(), state);
    let answer = a.take_published();
    assert!(answer.iter().any(|(k, _)| *k == UPDATE));
    b.receive(A, &a.driver.journal.clone(), answer);
    assert_eq!(b.text(), "world");
    // Equal now: another exchange finds nothing to send.
    let state = b.room.state_for_cluster().unwrap();
    b.run(vec![state]);
    let state = b.take_published();
    a.receive(B, &b.driver.journal.clone(), state);
    assert!(a.take_published().is_empty());
}

fn awareness_frame(client: u64, clock: u64, state: Option<&str>) -> Vec<u8> {
    let update =
        AwarenessUpdate { entries: vec![AwarenessEntry { client_id: client, clock, state: state.map(str::to_owned) }] };
    Message::Awareness(&update.encode()).encode()
}

fn last_awareness(client: &Client) -> &AwarenessUpdate {
    client.awareness.last().expect("an awareness message")
}

#[test]
fn presence_crosses_instances_and_leaves_with_the_socket_or_the_instance() {
    let (mut a, mut b) = (Instance::new(1), Instance::new(2));
    let conn = a.clients[0].conn;
    let actions = a.room.receive(conn, &awareness_frame(77, 1, Some(r#"{"user":"ann"}"#))).unwrap();
    a.run(actions);
    let published = a.take_published();
    assert!(published.iter().any(|(k, _)| *k == AWARENESS));
    b.receive(A, &a.driver.journal.clone(), published);
    assert_eq!(last_awareness(&b.clients[0]).entries[0].state.as_deref(), Some(r#"{"user":"ann"}"#));
    // A later joiner on B sees Ann at once.
    let mut late = Client::new(9);
    let actions = b.room.connect(late.conn).unwrap();
    let mut clients = vec![late];
    b.driver.run(&b.room, &mut clients, actions);
    late = clients.pop().unwrap();
    assert!(late.awareness.iter().any(|u| u.entries.iter().any(|e| e.client_id == 77 && e.state.is_some())));

    // Ann's socket drops on A: the removal crosses.
    let actions = a.room.disconnect(conn);
    a.run(actions);
    b.receive(A, &a.driver.journal.clone(), a.take_published());
    assert_eq!(last_awareness(&b.clients[0]).entries[0].state, None);

    // Bob on B, then B's whole instance dies: A removes Bob without a word from B.
    let actions = b.room.receive(b.clients[0].conn, &awareness_frame(88, 1, Some(r#"{"user":"bob"}"#))).unwrap();
    b.run(actions);
    a.clients.push(Client::new(5));
    join(&mut a.room, &mut a.driver, &mut a.clients, 1);
    a.receive(B, &b.driver.journal.clone(), b.take_published());
    assert_eq!(a.room.awareness().state(88), Some(r#"{"user":"bob"}"#));
    let actions = a.room.instance_gone(B);
    a.run(actions);
    assert_eq!(a.room.awareness().state(88), None);
    let removal = last_awareness(&a.clients[1]);
    assert_eq!((removal.entries[0].client_id, removal.entries[0].state.as_deref()), (88, None));
}

#[test]
fn another_instance_removes_only_presence_it_owns_and_announces_only_its_own() {
    let (mut a, mut b) = (Instance::new(1), Instance::new(2));
    // Client 77 was on A, then reconnected to B before A noticed.
    let actions = a.room.receive(a.clients[0].conn, &awareness_frame(77, 3, Some("{}"))).unwrap();
    a.run(actions);
    b.receive(A, &a.driver.journal.clone(), a.take_published());
    let actions = b.room.receive(b.clients[0].conn, &awareness_frame(77, 4, Some(r#"{"on":"b"}"#))).unwrap();
    b.run(actions);
    drop(b.take_published());
    // A's late removal (at its clock 3) does not remove the client now on B's socket.
    let removal = AwarenessUpdate { entries: vec![AwarenessEntry { client_id: 77, clock: 4, state: None }] };
    let actions = b.room.receive_from_instance(A, AWARENESS, &removal.encode()).unwrap();
    b.run(actions);
    assert_eq!(b.room.awareness().state(77), Some(r#"{"on":"b"}"#));
    // Asked for presence, B announces its own socket's client, and nobody else's.
    let actions = b.room.receive_from_instance(A, ASK_PRESENCE, &[]).unwrap();
    b.run(actions);
    let announced = b.take_published();
    assert_eq!(announced.len(), 1);
    let update = AwarenessUpdate::decode(&announced[0].1).unwrap();
    assert_eq!(update.entries.iter().map(|e| e.client_id).collect::<Vec<_>>(), vec![77]);
}

#[test]
fn garbage_from_another_instance_is_refused_and_counted_without_harm() {
    let mut a = Instance::new(1);
    a.edit(0, "safe");
    for (kind, payload) in [(UPDATE, &b"\xff\xff\xff"[..]), (STATE, b"\x01"), (AWARENESS, b"\x05"), (b'?', b"")] {
        let actions = a.room.receive_from_instance(B, kind, payload).unwrap();
        a.run(actions);
    }
    assert_eq!(a.text(), "safe");
    assert!(a.room.stats().cluster_messages_refused >= 3);
}

#[test]
fn a_room_that_joins_the_cluster_asks_for_the_others_presence() {
    let mut room = Room::new("doc");
    assert!(room.cluster_joined().is_empty(), "not clustered: nothing to ask");
    room.set_clustered();
    let asked = room.cluster_joined();
    assert!(matches!(asked.as_slice(), [Action::Publish { kind: ASK_PRESENCE, .. }]), "{asked:?}");
}
