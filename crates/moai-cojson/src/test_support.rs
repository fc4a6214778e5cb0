//! Test support: real signed cojson content, and a driver that performs the
//! relay's actions against an in-memory store while letting the test decide
//! when writes become durable.
#![allow(dead_code)]

use crate::crypto::{id_for_header, AgentSecret};
use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::message::{ContentMessage, SessionNewContent, SyncMessage};
use crate::persistence::{PersistRequest, PersistToken, StoredCoValue, StoredKnown, StoredSession};
use crate::relay::{Action, CloseReason, Diagnostic, Event, PeerId, Relay};
use crate::transaction_hash::{canonical_transaction, SessionHasher};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};

/// An agent made from a seed, and the account whose `initialAdmin` it is.
pub struct Identity {
    pub secret: AgentSecret,
    pub agent: String,
    pub account_header: Value,
    pub account: CoId,
}

impl Identity {
    pub fn from_seed(byte: u8) -> Self {
        let secret = AgentSecret::from_seed(&[byte; 32]);
        let agent = secret.agent_id().as_str().to_string();
        let account_header = json!({"type":"comap","ruleset":{"type":"group","initialAdmin":agent},
            "meta":{"type":"account"},"createdAt":null,"uniqueness":null});
        let account = id_for_header(&account_header);
        Identity { secret, agent, account_header, account }
    }

    /// A session on the account itself (agent form, as cojson writes it).
    pub fn agent_session(&self, suffix: &str) -> Writer {
        Writer::new(&self.secret, format!("{}_session_z{suffix}", self.agent))
    }

    /// A session authored by the account (used on every other CoValue).
    pub fn account_session(&self, suffix: &str) -> Writer {
        Writer::new(&self.secret, format!("{}_session_z{suffix}", self.account.as_str()))
    }
}

/// One session's signing state: appends transactions and signs the chain.
#[derive(Clone)]
pub struct Writer {
    secret: AgentSecret,
    pub session: String,
    hasher: SessionHasher,
    pub count: u64,
}

impl Writer {
    fn new(secret: &AgentSecret, session: String) -> Self {
        Writer { secret: secret.clone(), session, hasher: SessionHasher::new(), count: 0 }
    }

    /// Signs `txs` as the continuation of this session.
    pub fn append(&mut self, txs: Vec<Value>) -> (String, SessionNewContent) {
        let after = self.count;
        for tx in &txs {
            self.hasher.update(&canonical_transaction(tx).expect("valid tx").json);
            self.count += 1;
        }
        let sig = self.hasher.sign(&self.secret.signer);
        (
            self.session.clone(),
            SessionNewContent { after, new_transactions: txs, last_signature: sig.to_z_string(), extra: Map::new() },
        )
    }
}

pub fn tx(changes: Value, made_at: u64) -> Value {
    json!({"privacy":"trusting","madeAt":made_at,"changes":changes.to_string()})
}

pub fn set(key: &str, value: Value, made_at: u64) -> Value {
    tx(json!([{"op":"set","key":key,"value":value}]), made_at)
}

pub fn group_header(admin: &CoId, uniqueness: &str) -> Value {
    json!({"type":"comap","ruleset":{"type":"group","initialAdmin":admin.as_str()},"meta":null,"uniqueness":uniqueness})
}

pub fn map_header(group: &CoId, uniqueness: &str) -> Value {
    json!({"type":"comap","ruleset":{"type":"ownedByGroup","group":group.as_str()},"meta":null,
        "createdAt":"2025-01-01T00:00:00.000Z","uniqueness":uniqueness})
}

pub fn content(header: Option<&Value>, id: &CoId, sessions: Vec<(String, SessionNewContent)>) -> SyncMessage {
    SyncMessage::Content(ContentMessage {
        id: id.clone(),
        header: header.cloned(),
        priority: Some(3),
        new: sessions,
        expect_content_until: None,
        extra: Map::new(),
    })
}

pub fn load(id: &CoId, known: Option<KnownState>) -> SyncMessage {
    SyncMessage::Load(known.unwrap_or_else(|| KnownState::empty(id.clone())), Map::new())
}

/// Account + group + map of one user, each with signed content, as a
/// client would upload them (dependency order).
pub struct World {
    pub alice: Identity,
    pub group: CoId,
    pub group_header: Value,
    pub map: CoId,
    pub map_header: Value,
    pub account_writer: Writer,
    pub group_writer: Writer,
    pub map_writer: Writer,
}

impl World {
    pub fn new() -> Self {
        let alice = Identity::from_seed(1);
        let group_header = group_header(&alice.account, "zGroup1");
        let group = id_for_header(&group_header);
        let map_header = map_header(&group, "zMap1");
        let map = id_for_header(&map_header);
        World {
            account_writer: alice.agent_session("Acc1"),
            group_writer: alice.account_session("Grp1"),
            map_writer: alice.account_session("Map1"),
            alice,
            group,
            group_header,
            map,
            map_header,
        }
    }

    pub fn account_upload(&mut self) -> SyncMessage {
        let s = self.account_writer.append(vec![set(self.alice.account.as_str(), json!("admin"), 1000)]);
        content(Some(&self.alice.account_header.clone()), &self.alice.account.clone(), vec![s])
    }

    pub fn group_upload(&mut self) -> SyncMessage {
        let s = self.group_writer.append(vec![set(self.alice.account.as_str(), json!("admin"), 1001)]);
        content(Some(&self.group_header.clone()), &self.group.clone(), vec![s])
    }

    pub fn map_upload(&mut self) -> SyncMessage {
        let s = self.map_writer.append(vec![set("hello", json!("world"), 1002)]);
        content(Some(&self.map_header.clone()), &self.map.clone(), vec![s])
    }

    pub fn map_edit(&mut self, key: &str, made_at: u64) -> SyncMessage {
        let s = self.map_writer.append(vec![set(key, json!(made_at), made_at)]);
        content(None, &self.map.clone(), vec![s])
    }
}

/// The driver: performs `Load` and `Persist` against an in-memory store.
/// Loads are answered at once; writes are applied to the store at once but
/// reported durable only when the test calls [`RelayHarness::persist_all`].
pub struct RelayHarness {
    pub relay: Relay,
    pub store: HashMap<CoId, StoredCoValue>,
    pub unpersisted: Vec<PersistToken>,
    pub persists: Vec<PersistRequest>,
    /// Full loads asked for.
    pub loads: Vec<CoId>,
    /// Known-state reads asked for, one entry per `LoadKnown` action.
    pub known_loads: Vec<Vec<CoId>>,
    pub sent: Vec<(PeerId, SyncMessage)>,
    /// Every `Send` as the relay issued it (to check sharing).
    pub shared: Vec<(PeerId, crate::message::Outgoing)>,
    pub closed: Vec<(PeerId, CloseReason)>,
    pub diagnostics: Vec<Diagnostic>,
    /// When set, `Load`s are held here instead of answered.
    pub hold_loads: bool,
    pub held_loads: Vec<CoId>,
    /// `Announce`s (cluster), in order.
    pub announced: Vec<(CoId, KnownState)>,
    /// `Refresh`es asked for (answered at once from `store`).
    pub refreshes: Vec<CoId>,
}

impl RelayHarness {
    pub fn new(relay: Relay) -> Self {
        RelayHarness {
            relay,
            store: HashMap::new(),
            unpersisted: Vec::new(),
            persists: Vec::new(),
            loads: Vec::new(),
            known_loads: Vec::new(),
            sent: Vec::new(),
            shared: Vec::new(),
            closed: Vec::new(),
            diagnostics: Vec::new(),
            hold_loads: false,
            held_loads: Vec::new(),
            announced: Vec::new(),
            refreshes: Vec::new(),
        }
    }

    pub fn run(&mut self, event: Event) {
        let mut queue = VecDeque::from([event]);
        while let Some(ev) = queue.pop_front() {
            for action in self.relay.handle(ev) {
                match action {
                    Action::Send(peer, msg) => {
                        self.sent.push((peer, msg.message().clone()));
                        self.shared.push((peer, msg));
                    }
                    Action::Load(id) => {
                        self.loads.push(id.clone());
                        if self.hold_loads {
                            self.held_loads.push(id);
                        } else {
                            let stored = self.store.get(&id).cloned();
                            queue.push_back(Event::Loaded { id, stored });
                        }
                    }
                    Action::LoadKnown(ids) => {
                        self.known_loads.push(ids.clone());
                        let answers = ids
                            .into_iter()
                            .map(|id| {
                                let known = self.store.get(&id).map_or(StoredKnown::NotStored, |s| s.stored_known(&id));
                                (id, known)
                            })
                            .collect();
                        queue.push_back(Event::KnownLoaded(answers));
                    }
                    Action::Persist(req) => {
                        self.write(&req);
                        self.unpersisted.push(req.token);
                        self.persists.push(req);
                    }
                    Action::Close(peer, reason) => self.closed.push((peer, reason)),
                    Action::Diagnostic(d) => self.diagnostics.push(d),
                    Action::Announce { id, known } => self.announced.push((id, known)),
                    Action::Refresh(id) => {
                        self.refreshes.push(id.clone());
                        let stored = self.store.get(&id).cloned();
                        queue.push_back(Event::Refreshed { id, stored });
                    }
                }
            }
        }
    }

    /// Storage semantics the relay relies on: appends must start at the
    /// stored count.
    fn write(&mut self, req: &PersistRequest) {
        if let Some(h) = &req.header {
            self.store.entry(req.id.clone()).or_insert_with(|| StoredCoValue {
                header: h.clone(),
                sessions: Vec::new(),
                deleted: false,
            });
        }
        let stored = self.store.get_mut(&req.id).expect("write to a CoValue without header");
        for a in &req.sessions {
            let s = match stored.sessions.iter_mut().position(|s| s.session == a.session) {
                Some(i) => &mut stored.sessions[i],
                None => {
                    stored.sessions.push(StoredSession {
                        session: a.session.clone(),
                        transactions: Vec::new(),
                        last_signature: a.last_signature,
                        checkpoints: Default::default(),
                    });
                    stored.sessions.last_mut().unwrap()
                }
            };
            assert_eq!(s.transactions.len() as u64, a.after, "append must start at the stored count");
            s.transactions.extend(a.transactions.iter().cloned());
            s.last_signature = a.last_signature;
            s.checkpoints.extend(a.checkpoints.iter().copied());
        }
        stored.deleted |= req.deleted;
    }

    pub fn connect(&mut self, peer: u64) -> PeerId {
        let p = PeerId(peer);
        self.run(Event::PeerConnected(p));
        p
    }

    pub fn msg(&mut self, peer: PeerId, msg: SyncMessage) {
        self.run(Event::Message(peer, msg));
    }

    pub fn persist_all(&mut self) {
        for token in std::mem::take(&mut self.unpersisted) {
            self.run(Event::Persisted(token));
        }
    }

    pub fn release_loads(&mut self) {
        for id in std::mem::take(&mut self.held_loads) {
            let stored = self.store.get(&id).cloned();
            self.run(Event::Loaded { id, stored });
        }
    }

    /// Takes everything sent to `peer` so far.
    pub fn take(&mut self, peer: PeerId) -> Vec<SyncMessage> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sent).into_iter().partition(|(p, _)| *p == peer);
        self.sent = rest;
        mine.into_iter().map(|(_, m)| m).collect()
    }
}

/// Short description of a message for order assertions: ("content"|"known"|…, id).
pub fn kind(msg: &SyncMessage) -> (&'static str, String) {
    match msg {
        SyncMessage::Load(s, _) => ("load", s.id.to_string()),
        SyncMessage::Known(k) if k.is_correction => ("correction", k.state.id.to_string()),
        SyncMessage::Known(k) => ("known", k.state.id.to_string()),
        SyncMessage::Content(c) => ("content", c.id.to_string()),
        SyncMessage::Done(id) => ("done", id.to_string()),
        SyncMessage::Reconcile(r) => ("reconcile", r.id.clone()),
        SyncMessage::ReconcileAck(id) => ("reconcile-ack", id.clone()),
    }
}

pub fn known_of(msg: &SyncMessage) -> &KnownState {
    match msg {
        SyncMessage::Known(k) => &k.state,
        other => panic!("expected known, got {other:?}"),
    }
}

pub fn as_content(msg: &SyncMessage) -> &ContentMessage {
    match msg {
        SyncMessage::Content(c) => c,
        other => panic!("expected content, got {other:?}"),
    }
}
