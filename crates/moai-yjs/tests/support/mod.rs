//! Test harness: y-websocket clients simulated with a second yrs `Doc`, and a driver that
//! executes a room's actions the way the server edge will (journal for `Persist`, routing for
//! `Send`/`Broadcast`), checking the durability rule as it goes.
#![allow(dead_code)]

use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::updates::encoder::Encode;
use moai_yjs::yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};
use moai_yjs::{Action, AwarenessUpdate, ConnId, Message, Room, SyncMessage};

pub struct Client {
    pub conn: ConnId,
    pub doc: Doc,
    /// Awareness updates received, decoded.
    pub awareness: Vec<AwarenessUpdate>,
    /// Frames that asked this client for something (our SyncStep1).
    pub step1_received: Vec<Vec<u8>>,
    pub closed: Option<(u16, String)>,
}

impl Client {
    pub fn new(id: u64) -> Self {
        Client {
            conn: ConnId(id),
            doc: Doc::with_client_id(id + 1000),
            awareness: Vec::new(),
            step1_received: Vec::new(),
            closed: None,
        }
    }

    pub fn insert(&self, index: u32, s: &str) -> Vec<u8> {
        let text = self.doc.get_or_insert_text("t");
        let mut txn = self.doc.transact_mut();
        text.insert(&mut txn, index, s);
        txn.encode_update_v1()
    }

    pub fn text(&self) -> String {
        text_of(&self.doc)
    }

    pub fn step1_frame(&self) -> Vec<u8> {
        let sv = self.doc.transact().state_vector().encode_v1();
        Message::Sync(SyncMessage::Step1(&sv)).encode()
    }

    /// The SyncStep2 a y-websocket client sends in reply to the server's SyncStep1.
    pub fn step2_for(&self, server_sv: &[u8]) -> Vec<u8> {
        let sv = StateVector::decode_v1(server_sv).expect("server state vector");
        let update = self.doc.transact().encode_state_as_update_v1(&sv);
        Message::Sync(SyncMessage::Step2(&update)).encode()
    }

    fn deliver(&mut self, frame: &[u8]) {
        match Message::decode(frame).expect("server frames must decode") {
            Message::Sync(SyncMessage::Step1(sv)) => self.step1_received.push(sv.to_vec()),
            Message::Sync(SyncMessage::Step2(u)) | Message::Sync(SyncMessage::Update(u)) => {
                let update = Update::decode_v1(u).expect("server updates must decode");
                self.doc.transact_mut().apply_update(update).expect("server updates must apply");
            }
            Message::Awareness(a) => {
                self.awareness.push(AwarenessUpdate::decode(a).expect("server awareness must decode"))
            }
            other => panic!("unexpected server message {other:?}"),
        }
    }
}

pub fn text_of(doc: &Doc) -> String {
    let text = doc.get_or_insert_text("t");
    let txn = doc.transact();
    text.get_string(&txn)
}

/// Executes actions like the edge: `Persist` appends to `journal`, sends are routed to the
/// connected clients. Panics if a frame carrying a document change would be sent before the
/// change was persisted.
#[derive(Default)]
pub struct Driver {
    pub journal: Vec<Vec<u8>>,
    pub sent_frames: usize,
    /// What the room asked to tell the other instances (cluster), in order.
    pub published: Vec<(u8, Vec<u8>)>,
    /// Updates other instances appended to the storage they share with this one (cluster).
    pub journal_elsewhere: Vec<Vec<u8>>,
}

impl Driver {
    pub fn run(&mut self, room: &Room, clients: &mut [Client], actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Persist { update } => self.journal.push(update),
                Action::Send { conn, frame } => {
                    self.check_durable(&frame);
                    if let Some(c) = clients.iter_mut().find(|c| c.conn == conn && c.closed.is_none()) {
                        c.deliver(&frame);
                        self.sent_frames += 1;
                    }
                }
                Action::Broadcast { except, frame } => {
                    self.check_durable(&frame);
                    for c in clients.iter_mut() {
                        if Some(c.conn) != except && c.closed.is_none() && room.is_connected(c.conn) {
                            c.deliver(&frame);
                            self.sent_frames += 1;
                        }
                    }
                }
                Action::Close { conn, code, reason } => {
                    if let Some(c) = clients.iter_mut().find(|c| c.conn == conn) {
                        c.closed = Some((code, reason));
                    }
                }
                Action::Publish { kind, payload } => self.published.push((kind, payload)),
            }
        }
    }

    /// Everything a server frame carries about the document must already be in the journal.
    fn check_durable(&self, frame: &[u8]) {
        if let Ok(Message::Sync(SyncMessage::Step2(u) | SyncMessage::Update(u))) = Message::decode(frame) {
            let all: Vec<Vec<u8>> = self.journal_elsewhere.iter().chain(&self.journal).cloned().collect();
            let durable = load_journal(&all);
            let carried = Update::decode_v1(u).expect("decodable");
            let carried_sv = carried.state_vector();
            let durable_sv = durable.transact().state_vector();
            for (client, clock) in carried_sv.iter() {
                assert!(
                    durable_sv.get(client) >= *clock,
                    "frame carries client {client} up to {clock} but only {} is durable",
                    durable_sv.get(client)
                );
            }
        }
    }
}

pub fn load_journal(journal: &[Vec<u8>]) -> Doc {
    moai_yjs::load_doc(None, journal.iter().map(|u| u.as_slice())).expect("journal loads")
}

/// Connects a client and completes the handshake both ways, as y-websocket does on open.
pub fn join(room: &mut Room, driver: &mut Driver, clients: &mut [Client], idx: usize) {
    let conn = clients[idx].conn;
    let actions = room.connect(conn).expect("connect");
    driver.run(room, clients, actions);
    let server_sv = clients[idx].step1_received.last().expect("server sent SyncStep1").clone();
    let step1 = clients[idx].step1_frame();
    let actions = room.receive(conn, &step1).expect("step1");
    driver.run(room, clients, actions);
    let step2 = clients[idx].step2_for(&server_sv);
    let actions = room.receive(conn, &step2).expect("step2");
    driver.run(room, clients, actions);
}

pub fn update_frame(update: &[u8]) -> Vec<u8> {
    Message::Sync(SyncMessage::Update(update)).encode()
}

pub fn full_state(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_state_as_update_v1(&StateVector::default())
}

/// Only what is integrated (no pending structs): `encode_diff_v1` leaves pending out, while
/// `encode_state_as_update_v1` merges it in.
pub fn integrated_state(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_diff_v1(&StateVector::default())
}
