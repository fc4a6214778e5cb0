//! One document's sync state machine: the live `yrs::Doc`, its awareness and its connections.
//! Sans-IO: every input (a connect, a frame, a close, an HTTP write) returns the list of
//! [`Action`]s the driver must perform. The room never blocks on I/O, reads no clock and owns
//! no socket, so one actor task per document can drive it and tests can drive it directly.
//!
//! # Action ordering contract (durability)
//!
//! Actions returned by one call must be executed **in order**, with one rule that makes updates
//! durable before anybody sees them:
//!
//! > An action that follows a [`Action::Persist`] must not be executed before that `Persist`
//! > (and every earlier one) is durable.
//!
//! The room guarantees the matching half: a change to the document is always returned as
//! `Persist` *before* any `Send`/`Broadcast` that carries it. Later calls are also covered: a
//! SyncStep2 or `encode_state_as_update` may contain data whose `Persist` was returned by an
//! earlier call, so the driver must treat its action lists as one sequence.
//!
//! **Group commit.** The driver may feed several inputs, concatenate their action lists, write
//! all `Persist` payloads (in order) in one batch, wait for it, and then execute every other
//! action in its original relative order. That satisfies the rule, because moving a `Persist`
//! earlier only delays sends; it never reorders them.
//!
//! **Panics.** yrs panics on some hostile input, also later, when it re-reads what a hostile
//! update left pending (encoding the state for the next joiner). Every entry point contains
//! them and returns [`RoomError::Poisoned`]: the driver must then drop the room, close its
//! connections and reload the document from storage, as after a persist failure.
//!
//! **Persist failure.** Memory is then ahead of storage. Do not execute the pending actions;
//! close every connection of the room and drop the `Room` (reload it from storage). Clients keep
//! their edits and upload them again through the SyncStep1/SyncStep2 exchange on reconnect.
//!
//! **Close.** After executing [`Action::Close`] the driver must call [`Room::disconnect`] for
//! that connection (as for any socket that ended), which returns the awareness removals.
//!
//! Reads ([`Room::encode_state_as_update`]) see memory, which can be ahead of storage by the
//! batch in flight; an HTTP reader needing only durable data must wait for that batch too.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact};

use crate::apply::{apply_v1, contain, has_pending, ApplyError};
use crate::awareness::{AwarenessTracker, AwarenessUpdate};
use crate::cluster;
use crate::conn::{Access, ConnId, Dialect};
use crate::hocuspocus;
use crate::plausible::Policy;
use crate::protocol::{
    awareness_frame, permission_denied_frame, sync_step1_frame, sync_step2_frame, sync_update_frame, Message,
    MessageReader, SyncMessage,
};

/// What a read-only connection is told (once) when it sends a document update. y-websocket
/// clients show it as "Permission denied" (y-protocols' auth message) and stay connected.
pub const READ_ONLY_REASON: &str = "read-only: document updates from this connection are not accepted";

/// WebSocket close code for a frame we cannot parse as a y-websocket message.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Largest stateless message (its payload) a Hocuspocus connection may send; each is copied
/// to every other Hocuspocus connection of the document.
pub const MAX_STATELESS_BYTES: usize = 64 * 1024;

/// WebSocket close code for a message over a limit (an awareness state too large, too many
/// awareness client ids on one connection).
pub const CLOSE_POLICY: u16 = 1008;
/// WebSocket close code for a well-framed message with an invalid payload (bad update, state
/// vector or awareness update).
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;

/// Something the driver has to do. See the module docs for the ordering contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send one binary frame to one connection.
    Send { conn: ConnId, frame: Vec<u8> },
    /// Send one binary frame to every connection of the room, except `except`.
    Broadcast { except: Option<ConnId>, frame: Vec<u8> },
    /// Append this v1 update to the document's journal; it must be durable before any later
    /// action runs. Replaying all persisted updates (after the last snapshot) rebuilds the doc.
    Persist { update: Vec<u8> },
    /// Close the connection with this WebSocket close code, then call [`Room::disconnect`].
    Close { conn: ConnId, code: u16, reason: String },
    /// Tell the other instances serving this document (cluster; only from a room made
    /// [`Room::set_clustered`]). `kind` is one of [`crate::cluster`]'s constants. Like a send, it
    /// must wait for every earlier `Persist`: an update crosses instances only once durable.
    Publish { kind: u8, payload: Vec<u8> },
}

/// Misuse by the driver, or a state in which nothing was done. Misbehaving peers never produce
/// an `Err` from [`Room::receive`]; they get a [`Action::Close`].
#[derive(Debug, Error)]
pub enum RoomError {
    #[error("connection {0:?} is not connected to this room")]
    UnknownConnection(ConnId),
    /// Another transaction (e.g. a snapshot on a cloned `Doc` handle) holds the document;
    /// nothing was applied, retry later.
    #[error("document is busy")]
    Busy,
    /// An HTTP update was rejected. `actions` persists and broadcasts whatever yrs integrated
    /// before failing (usually nothing); execute them as usual.
    #[error("invalid update: {reason}")]
    InvalidUpdate { reason: String, actions: Vec<Action> },
    /// An HTTP update depends on changes the document does not have: yrs parks it (in memory
    /// only) until they arrive. Not applied; `actions` carries whatever part did integrate.
    #[error("update depends on changes this document does not have")]
    MissingDependencies { actions: Vec<Action> },
    /// yrs panicked on this document. Its memory may be half-changed: drop the room, close its
    /// connections and reload it from storage (which holds only what was durable).
    #[error("document failed: {0}")]
    Poisoned(String),
}

/// Counters for metrics; the edge reads and exports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomStats {
    /// Messages of an unknown top-level type (ignored, as the JS client does).
    pub unknown_messages: u64,
    /// Updates that changed the document.
    pub updates_applied: u64,
    /// Updates that changed nothing (already known, or only parked as pending).
    pub updates_without_effect: u64,
    /// Frames that made us close the connection.
    pub rejected_frames: u64,
    /// Document updates dropped because their connection is read-only.
    pub read_only_dropped: u64,
    /// SyncStep1 / QueryAwareness requests answered with an empty update because the connection
    /// already got the full answer and nothing changed since.
    pub coalesced_requests: u64,
    /// Updates that skipped a client's changes, not applied: the sender got our SyncStep1 to
    /// send everything we lack instead.
    pub gaps_asked: u64,
    /// Updates from other instances (or from a resync) that changed the document.
    pub cluster_updates_applied: u64,
    /// Messages from other instances that were not understood or not applicable (ignored; the
    /// state exchange repairs what they carried).
    pub cluster_messages_refused: u64,
    /// Differences found by the state exchange and answered.
    pub cluster_repairs: u64,
}

pub struct Room {
    doc_id: String,
    doc: Doc,
    awareness: AwarenessTracker,
    conns: BTreeSet<ConnId>,
    /// Read-only connections, each with whether it was already told its updates are dropped.
    read_only: BTreeMap<ConnId, bool>,
    /// Connections that speak Hocuspocus ([`Dialect::Hocuspocus`]).
    hocuspocus: BTreeSet<ConnId>,
    /// Per connection, the last full-state answers it got: (hash of the SyncStep1 state vector,
    /// document version) and the awareness version. A repeated request that would get the same
    /// answer again gets an empty one instead: a 4-byte SyncStep1 or a 1-byte QueryAwareness
    /// must not make the server encode the whole document or every presence state in a loop.
    answered: BTreeMap<ConnId, Answered>,
    /// Bumped on every change to the document / to awareness.
    doc_version: u64,
    awareness_version: u64,
    stats: RoomStats,
    /// Set by the first call that found the document poisoned (yrs panicked, or left state it
    /// cannot read back): every later call answers [`RoomError::Poisoned`] without touching the
    /// document, whatever the driver does next.
    poisoned: std::sync::OnceLock<String>,
    /// What this server accepts in updates beyond the basics ([`Policy`]).
    policy: Policy,
    /// Whether other instances serve this document too: local changes are then also published.
    clustered: bool,
    /// Each other instance heard from, as one awareness connection owning its clients' presence.
    instances: BTreeMap<u64, ConnId>,
    /// Instance connections ever made (their ids are never reused).
    instances_ever: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Answered {
    step1: Option<(u64, u64)>,
    awareness: Option<u64>,
}

/// A v1 update that changes nothing: no structs, no deletions.
const EMPTY_UPDATE: &[u8] = &[0, 0];
/// An awareness update with no entries.
const EMPTY_AWARENESS: &[u8] = &[0];

fn hash_of(bytes: &[u8]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static KEYS: std::collections::hash_map::RandomState = std::collections::hash_map::RandomState::new();
    }
    KEYS.with(|k| {
        let mut h = k.build_hasher();
        h.write(bytes);
        h.finish()
    })
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room")
            .field("doc_id", &self.doc_id)
            .field("connections", &self.conns.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Room {
    /// A room for a document that does not exist in storage yet. Never use this as a fallback
    /// when loading failed: an empty doc would later be persisted over the real one
    /// (hocuspocus#382). Use [`crate::load::load_room`] for stored documents.
    pub fn new(doc_id: impl Into<String>) -> Self {
        Self::from_doc(doc_id, Doc::new())
    }

    /// What this room accepts in updates from now on (the server's configuration; documents
    /// loaded from storage are not checked against it).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Wraps an already loaded document.
    pub fn from_doc(doc_id: impl Into<String>, doc: Doc) -> Self {
        Room {
            doc_id: doc_id.into(),
            doc,
            awareness: AwarenessTracker::default(),
            conns: BTreeSet::new(),
            read_only: BTreeMap::new(),
            hocuspocus: BTreeSet::new(),
            answered: BTreeMap::new(),
            doc_version: 0,
            awareness_version: 0,
            stats: RoomStats::default(),
            poisoned: std::sync::OnceLock::new(),
            policy: Policy::default(),
            clustered: false,
            instances: BTreeMap::new(),
            instances_ever: 0,
        }
    }

    pub fn doc_id(&self) -> &str {
        &self.doc_id
    }

    /// The live document. Cloning the handle is allowed (e.g. to encode a snapshot on a
    /// blocking thread), but while a transaction on it is open, mutating calls return
    /// [`RoomError::Busy`] instead of blocking.
    pub fn doc(&self) -> &Doc {
        &self.doc
    }

    pub fn awareness(&self) -> &AwarenessTracker {
        &self.awareness
    }

    pub fn stats(&self) -> RoomStats {
        self.stats
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn is_connected(&self, conn: ConnId) -> bool {
        self.conns.contains(&conn)
    }

    /// True while yrs holds structs whose dependencies never arrived. Normal briefly; if it
    /// persists, some client keeps sending updates we cannot integrate (docs/protocols/yjs.md §3.5).
    pub fn has_pending_updates(&self) -> bool {
        has_pending(&self.doc)
    }

    /// A new socket joined (after auth). Returns our SyncStep1 — the only way a reconnecting
    /// client's offline edits get uploaded — and, if anybody is present, one awareness message
    /// with every state. Two frames: JS clients read one message per frame.
    pub fn connect(&mut self, conn: ConnId) -> Result<Vec<Action>, RoomError> {
        self.connect_with(conn, Access::ReadWrite)
    }

    /// [`Room::connect`] with the connection's access. A read-only connection syncs and shows
    /// presence like any other, but its document updates (SyncStep2, Update) are dropped: never
    /// applied, persisted or broadcast. The first one it sends is answered with a
    /// permission-denied auth message ([`READ_ONLY_REASON`]).
    pub fn connect_with(&mut self, conn: ConnId, access: Access) -> Result<Vec<Action>, RoomError> {
        self.connect_as(conn, access, Dialect::YWebsocket)
    }

    /// [`Room::connect_with`] for a connection that speaks `dialect`. A Hocuspocus connection
    /// gets no SyncStep1 on connect (its client starts with its own SyncStep1, answered with
    /// SyncStep2 and SyncStep1), gets a sync-status acknowledgement for every update it sends,
    /// and may send stateless messages ([`Dialect::Hocuspocus`], docs/protocols/hocuspocus.md).
    pub fn connect_as(&mut self, conn: ConnId, access: Access, dialect: Dialect) -> Result<Vec<Action>, RoomError> {
        self.not_poisoned()?;
        let result = contain(|| self.connect_with_unguarded(conn, access, dialect))
            .unwrap_or_else(|why| Err(RoomError::Poisoned(why)));
        self.note(result)
    }

    /// `Err(Poisoned)` once the document has been found poisoned.
    fn not_poisoned(&self) -> Result<(), RoomError> {
        match self.poisoned.get() {
            Some(why) => Err(RoomError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Remembers a poisoning, so the document is never used again.
    fn note<T>(&self, result: Result<T, RoomError>) -> Result<T, RoomError> {
        if let Err(RoomError::Poisoned(why)) = &result {
            let _ = self.poisoned.set(why.clone());
        }
        result
    }

    fn connect_with_unguarded(
        &mut self,
        conn: ConnId,
        access: Access,
        dialect: Dialect,
    ) -> Result<Vec<Action>, RoomError> {
        let mut actions = Vec::new();
        match dialect {
            Dialect::YWebsocket => {
                let sv = self.doc.try_transact().map_err(|_| RoomError::Busy)?.state_vector();
                actions.push(Action::Send { conn, frame: sync_step1_frame(&sv.encode_v1()) });
            }
            Dialect::Hocuspocus => {
                self.hocuspocus.insert(conn);
            }
        }
        self.conns.insert(conn);
        if access == Access::ReadOnly {
            self.read_only.insert(conn, false);
        }
        self.awareness.add_connection(conn);
        if let Some(all) = self.awareness.all_states() {
            actions.push(Action::Send { conn, frame: awareness_frame(&all.encode()) });
        }
        Ok(actions)
    }

    /// A socket ended (closed by either side, or dropped). Returns the awareness removal for
    /// the clients it introduced, for the remaining connections. Idempotent.
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<Action> {
        if !self.conns.remove(&conn) {
            return Vec::new();
        }
        self.read_only.remove(&conn);
        self.hocuspocus.remove(&conn);
        self.answered.remove(&conn);
        match self.awareness.remove_connection(conn) {
            Some(removed) => {
                self.awareness_version += 1;
                let encoded = removed.encode();
                let mut actions = vec![Action::Broadcast { except: Some(conn), frame: awareness_frame(&encoded) }];
                if self.clustered {
                    actions.push(Action::Publish { kind: cluster::AWARENESS, payload: encoded });
                }
                actions
            }
            None => Vec::new(),
        }
    }

    /// Handles one binary frame from `conn`. Frames holding several concatenated messages (as
    /// yrs-based peers send) are processed message by message; the first bad message closes
    /// the connection, keeping the actions of the messages before it.
    pub fn receive(&mut self, conn: ConnId, frame: &[u8]) -> Result<Vec<Action>, RoomError> {
        self.not_poisoned()?;
        let result =
            contain(|| self.receive_unguarded(conn, frame)).unwrap_or_else(|why| Err(RoomError::Poisoned(why)));
        self.note(result)
    }

    fn receive_unguarded(&mut self, conn: ConnId, frame: &[u8]) -> Result<Vec<Action>, RoomError> {
        if !self.conns.contains(&conn) {
            return Err(RoomError::UnknownConnection(conn));
        }
        let mut actions = Vec::new();
        if self.hocuspocus.contains(&conn) {
            if let Some(payload) = hocuspocus::stateless_payload(frame) {
                match payload {
                    Ok(payload) => self.stateless(conn, payload, &mut actions),
                    Err(e) => {
                        self.reject(conn, format!("malformed stateless message: {e}"), &mut actions);
                    }
                }
                return Ok(actions);
            }
        }
        for message in MessageReader::new(frame) {
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    self.stats.rejected_frames += 1;
                    actions.push(close(conn, CLOSE_PROTOCOL_ERROR, format!("malformed message: {e}")));
                    break;
                }
            };
            let closed = self.handle(conn, message, &mut actions)?;
            if closed {
                break;
            }
        }
        Ok(actions)
    }

    /// Returns whether it emitted a `Close`.
    fn handle(&mut self, conn: ConnId, message: Message<'_>, actions: &mut Vec<Action>) -> Result<bool, RoomError> {
        match message {
            Message::Sync(SyncMessage::Step1(sv_bytes)) => {
                let key = Some((hash_of(sv_bytes), self.doc_version));
                let answered = self.answered.entry(conn).or_default();
                if answered.step1 == key {
                    // The earlier answer already carries everything this state vector lacks
                    // (it is in flight, or it was empty): answer with the empty update, which
                    // costs nothing to make, so clients that wait for a reply still get one.
                    self.stats.coalesced_requests += 1;
                    actions.push(Action::Send { conn, frame: sync_step2_frame(EMPTY_UPDATE) });
                    self.hocuspocus_step1(conn, actions)?;
                    return Ok(false);
                }
                answered.step1 = key;
                let sv =
                    crate::plausible::state_vector(sv_bytes).ok().and_then(|()| StateVector::decode_v1(sv_bytes).ok());
                let Some(sv) = sv else {
                    return Ok(self.reject(conn, "invalid state vector".into(), actions));
                };
                let txn = self.doc.try_transact().map_err(|_| RoomError::Busy)?;
                let update = txn.encode_state_as_update_v1(&sv);
                drop(txn);
                actions.push(Action::Send { conn, frame: sync_step2_frame(&update) });
                self.hocuspocus_step1(conn, actions)?;
            }
            Message::Sync(SyncMessage::Step2(update)) | Message::Sync(SyncMessage::Update(update))
                if self.read_only.contains_key(&conn) =>
            {
                self.stats.read_only_dropped += 1;
                if self.hocuspocus.contains(&conn) {
                    // Hocuspocus tells a read-only client with the acknowledgement: `1` only for
                    // a SyncStep2 that holds nothing the document lacks (the provider's answer to
                    // our SyncStep1), so a read-only provider still becomes synced.
                    let step2 = matches!(message, Message::Sync(SyncMessage::Step2(_)));
                    let nothing_new = step2 && self.holds_nothing_new(update);
                    actions.push(Action::Send { conn, frame: hocuspocus::sync_status_message(nothing_new) });
                } else if let Some(told) = self.read_only.get_mut(&conn).filter(|told| !**told) {
                    *told = true;
                    actions.push(Action::Send { conn, frame: permission_denied_frame(READ_ONLY_REASON) });
                }
            }
            Message::Sync(SyncMessage::Step2(update)) | Message::Sync(SyncMessage::Update(update)) => {
                let applied = apply_v1(&self.doc, update, self.policy);
                if let Some(diff) = applied.diff {
                    self.stats.updates_applied += 1;
                    self.doc_version += 1;
                    push_change(actions, diff, Some(conn), self.clustered);
                } else if applied.error.is_none() {
                    self.stats.updates_without_effect += 1;
                }
                let hocuspocus = self.hocuspocus.contains(&conn);
                match applied.error {
                    // Acknowledged after the Persist above: the driver sends it once durable.
                    None if hocuspocus => {
                        actions.push(Action::Send { conn, frame: hocuspocus::sync_status_message(true) })
                    }
                    None => {}
                    Some(ApplyError::Busy) => return Err(RoomError::Busy),
                    Some(ApplyError::Poisoned(why)) => return Err(RoomError::Poisoned(why)),
                    // Not applied; the sender answers our SyncStep1 with everything we lack,
                    // this update's changes included (docs/protocols/yjs.md §3.5). A Hocuspocus
                    // client is told `0` for this one; the SyncStep2 it answers with is acked.
                    Some(ApplyError::Gap { .. }) => {
                        self.stats.gaps_asked += 1;
                        if hocuspocus {
                            actions.push(Action::Send { conn, frame: hocuspocus::sync_status_message(false) });
                        }
                        let sv = self.doc.try_transact().map_err(|_| RoomError::Busy)?.state_vector();
                        actions.push(Action::Send { conn, frame: sync_step1_frame(&sv.encode_v1()) });
                    }
                    Some(e) => return Ok(self.reject(conn, e.to_string(), actions)),
                }
            }
            Message::Awareness(bytes) => match AwarenessUpdate::decode(bytes) {
                Ok(update) => {
                    let applied = match self.awareness.apply(conn, &update) {
                        Ok(applied) => applied,
                        Err(e) => {
                            self.stats.rejected_frames += 1;
                            actions.push(close(conn, CLOSE_POLICY, e.to_string()));
                            return Ok(true);
                        }
                    };
                    if let Some(changed) = applied {
                        self.awareness_version += 1;
                        let encoded = changed.encode();
                        // Everyone, sender included: see AwarenessTracker::apply.
                        actions.push(Action::Broadcast { except: None, frame: awareness_frame(&encoded) });
                        if self.clustered {
                            actions.push(Action::Publish { kind: cluster::AWARENESS, payload: encoded });
                        }
                    }
                }
                Err(e) => return Ok(self.reject(conn, format!("invalid awareness update: {e}"), actions)),
            },
            Message::QueryAwareness => {
                let answered = self.answered.entry(conn).or_default();
                if answered.awareness == Some(self.awareness_version) {
                    self.stats.coalesced_requests += 1;
                    actions.push(Action::Send { conn, frame: awareness_frame(EMPTY_AWARENESS) });
                    return Ok(false);
                }
                answered.awareness = Some(self.awareness_version);
                let all = self.awareness.all_states().unwrap_or_default();
                actions.push(Action::Send { conn, frame: awareness_frame(&all.encode()) });
            }
            // Servers send auth messages; a client sending one is ignored like the JS client does.
            Message::Auth(_) => {}
            Message::Unknown(_) => self.stats.unknown_messages += 1,
        }
        Ok(false)
    }

    /// A Hocuspocus client's SyncStep1 is answered with SyncStep2 and then our own SyncStep1:
    /// its answer to that (a SyncStep2, acknowledged) is what its provider waits for to count
    /// its changes as saved, also after `forceSync`.
    fn hocuspocus_step1(&mut self, conn: ConnId, actions: &mut Vec<Action>) -> Result<(), RoomError> {
        if self.hocuspocus.contains(&conn) {
            let sv = self.doc.try_transact().map_err(|_| RoomError::Busy)?.state_vector();
            actions.push(Action::Send { conn, frame: sync_step1_frame(&sv.encode_v1()) });
        }
        Ok(())
    }

    /// Whether `update` holds no struct and no deletion the document lacks (an invalid update
    /// counts as holding something).
    fn holds_nothing_new(&self, update: &[u8]) -> bool {
        let check = || -> Option<bool> {
            crate::plausible::update_v1_with(update, self.policy).ok()?;
            let update = yrs::Update::decode_v1(update).ok()?;
            let ours = self.doc.try_transact().ok()?.snapshot();
            let inserted = update.insertions(true);
            let structs_known =
                inserted.iter().all(|(client, ranges)| ranges.iter().all(|r| r.end <= ours.state_map.get(client)));
            Some(structs_known && cluster::covers(&ours.delete_set, update.delete_set()))
        };
        contain(check).ok().flatten().unwrap_or(false)
    }

    /// A stateless message from a Hocuspocus connection: sent on to the document's other
    /// Hocuspocus connections (and, in a cluster, to the other instances'). moai runs no
    /// application hooks, so this is its one meaning (docs/protocols/hocuspocus.md).
    fn stateless(&mut self, conn: ConnId, payload: &str, actions: &mut Vec<Action>) {
        if payload.len() > MAX_STATELESS_BYTES {
            self.stats.rejected_frames += 1;
            let reason = format!("stateless message over {MAX_STATELESS_BYTES} bytes");
            actions.push(close(conn, CLOSE_POLICY, reason));
            return;
        }
        let message = hocuspocus::stateless_message(payload);
        for other in self.hocuspocus.iter().copied().filter(|c| *c != conn) {
            actions.push(Action::Send { conn: other, frame: message.clone() });
        }
        if self.clustered {
            actions.push(Action::Publish { kind: cluster::STATELESS, payload: payload.as_bytes().to_vec() });
        }
    }

    fn reject(&mut self, conn: ConnId, reason: String, actions: &mut Vec<Action>) -> bool {
        self.stats.rejected_frames += 1;
        actions.push(close(conn, CLOSE_INVALID_PAYLOAD, reason));
        true
    }

    /// Applies an update from the HTTP API (server-side write). The change is persisted and then
    /// broadcast to every connection.
    pub fn apply_http_update(&mut self, update: &[u8]) -> Result<Vec<Action>, RoomError> {
        self.not_poisoned()?;
        let result =
            contain(|| self.apply_http_update_unguarded(update)).unwrap_or_else(|why| Err(RoomError::Poisoned(why)));
        self.note(result)
    }

    fn apply_http_update_unguarded(&mut self, update: &[u8]) -> Result<Vec<Action>, RoomError> {
        let had_pending = has_pending(&self.doc);
        let applied = apply_v1(&self.doc, update, self.policy);
        let mut actions = Vec::new();
        if let Some(diff) = applied.diff {
            self.stats.updates_applied += 1;
            self.doc_version += 1;
            push_change(&mut actions, diff, None, self.clustered);
        }
        match applied.error {
            // An HTTP writer gets no SyncStep1 to learn what we lack, and a parked update is
            // not durable: tell it, rather than answer as if it had been applied.
            None if !had_pending && has_pending(&self.doc) => Err(RoomError::MissingDependencies { actions }),
            Some(ApplyError::Gap { .. }) => Err(RoomError::MissingDependencies { actions }),
            None => Ok(actions),
            Some(ApplyError::Busy) => Err(RoomError::Busy),
            Some(ApplyError::Poisoned(why)) => Err(RoomError::Poisoned(why)),
            Some(e) => Err(RoomError::InvalidUpdate { reason: e.to_string(), actions }),
        }
    }

    /// The whole document as one v1 update: for HTTP reads and for compaction. O(document):
    /// call it off the per-update path (e.g. on the snapshot debounce).
    ///
    /// Compaction: a snapshot taken at any moment contains every update whose `Persist` was
    /// emitted before the call (changes are applied before they are emitted), so journal
    /// entries up to that point may be dropped once the snapshot is durable; later entries
    /// must stay (replaying something the snapshot already has is harmless).
    pub fn encode_state_as_update(&self) -> Result<Vec<u8>, RoomError> {
        self.not_poisoned()?;
        let result = contain(|| {
            let txn = self.doc.try_transact().map_err(|_| RoomError::Busy)?;
            Ok(txn.encode_state_as_update_v1(&StateVector::default()))
        })
        .unwrap_or_else(|why| Err(RoomError::Poisoned(why)));
        self.note(result)
    }

    /// The document's current state vector (v1), e.g. to compare replicas.
    pub fn state_vector(&self) -> Result<Vec<u8>, RoomError> {
        self.not_poisoned()?;
        let txn = self.doc.try_transact().map_err(|_| RoomError::Busy)?;
        Ok(txn.state_vector().encode_v1())
    }
}

impl Room {
    /// Other instances serve this document too (cluster, docs/cluster.md): from now on the
    /// room also returns [`Action::Publish`] for its own changes (after their `Persist`) and its
    /// sockets' presence.
    pub fn set_clustered(&mut self) {
        self.clustered = true;
    }

    /// A message another instance (`from`) published about this document. Updates are applied
    /// as durable (they were stored before being published): shown to every socket, not
    /// persisted again, not published again.
    pub fn receive_from_instance(&mut self, from: u64, kind: u8, payload: &[u8]) -> Result<Vec<Action>, RoomError> {
        self.not_poisoned()?;
        let result = contain(|| self.receive_from_instance_unguarded(from, kind, payload))
            .unwrap_or_else(|why| Err(RoomError::Poisoned(why)));
        self.note(result)
    }

    fn receive_from_instance_unguarded(
        &mut self,
        from: u64,
        kind: u8,
        payload: &[u8],
    ) -> Result<Vec<Action>, RoomError> {
        let mut actions = Vec::new();
        match kind {
            cluster::UPDATE => self.apply_durable_unguarded(payload, &mut actions)?,
            cluster::AWARENESS => {
                let Ok(update) = AwarenessUpdate::decode(payload) else {
                    self.stats.cluster_messages_refused += 1;
                    return Ok(actions);
                };
                let conn = self.instance_conn(from);
                // No limits apply to another instance: it enforced them on its own sockets.
                if let Ok(Some(changed)) = self.awareness.apply(conn, &update) {
                    self.awareness_version += 1;
                    actions.push(Action::Broadcast { except: None, frame: awareness_frame(&changed.encode()) });
                }
            }
            cluster::STATE => {
                let Ok(theirs) = yrs::Snapshot::decode_v1(payload) else {
                    self.stats.cluster_messages_refused += 1;
                    return Ok(actions);
                };
                let txn = self.doc.try_transact().map_err(|_| RoomError::Busy)?;
                let ours = txn.snapshot();
                let difference = cluster::compare(&ours, &theirs);
                if difference.we_have_more {
                    self.stats.cluster_repairs += 1;
                    let update = txn.encode_state_as_update_v1(&theirs.state_map);
                    actions.push(Action::Publish { kind: cluster::UPDATE, payload: update });
                }
                if difference.they_have_more {
                    actions.push(Action::Publish { kind: cluster::STATE, payload: ours.encode_v1() });
                }
            }
            cluster::STATELESS => match std::str::from_utf8(payload) {
                Ok(text) if text.len() <= MAX_STATELESS_BYTES => {
                    let message = hocuspocus::stateless_message(text);
                    for conn in self.hocuspocus.iter().copied() {
                        actions.push(Action::Send { conn, frame: message.clone() });
                    }
                }
                _ => self.stats.cluster_messages_refused += 1,
            },
            cluster::ASK_PRESENCE => {
                if let Some(states) = self.awareness.local_states() {
                    actions.push(Action::Publish { kind: cluster::AWARENESS, payload: states.encode() });
                }
            }
            _ => self.stats.cluster_messages_refused += 1,
        }
        Ok(actions)
    }

    /// Applies an update known to be durable already (another instance's, or read back from
    /// storage by a resync): every socket is sent what it changed; nothing is persisted or
    /// published. An update that skips changes this document lacks is not applied; the room
    /// asks the other instances for them instead.
    pub fn apply_durable(&mut self, update: &[u8]) -> Result<Vec<Action>, RoomError> {
        self.not_poisoned()?;
        let result = contain(|| {
            let mut actions = Vec::new();
            self.apply_durable_unguarded(update, &mut actions)?;
            Ok(actions)
        })
        .unwrap_or_else(|why| Err(RoomError::Poisoned(why)));
        self.note(result)
    }

    fn apply_durable_unguarded(&mut self, update: &[u8], actions: &mut Vec<Action>) -> Result<(), RoomError> {
        let applied = apply_v1(&self.doc, update, self.policy);
        if let Some(diff) = applied.diff {
            self.stats.cluster_updates_applied += 1;
            self.doc_version += 1;
            actions.push(Action::Broadcast { except: None, frame: sync_update_frame(&diff) });
        }
        match applied.error {
            None => {}
            Some(ApplyError::Busy) => return Err(RoomError::Busy),
            Some(ApplyError::Poisoned(why)) => return Err(RoomError::Poisoned(why)),
            Some(ApplyError::Gap { .. }) => {
                // An earlier message was lost: say what we have; whoever has more sends it.
                self.stats.gaps_asked += 1;
                if self.clustered {
                    let snapshot = self.doc.try_transact().map_err(|_| RoomError::Busy)?.snapshot();
                    actions.push(Action::Publish { kind: cluster::STATE, payload: snapshot.encode_v1() });
                }
            }
            Some(_) => self.stats.cluster_messages_refused += 1,
        }
        Ok(())
    }

    /// Another instance stopped heartbeating: its clients' presence goes, for every socket.
    pub fn instance_gone(&mut self, from: u64) -> Vec<Action> {
        let Some(conn) = self.instances.remove(&from) else { return Vec::new() };
        match self.awareness.remove_connection(conn) {
            Some(removed) => {
                self.awareness_version += 1;
                vec![Action::Broadcast { except: None, frame: awareness_frame(&removed.encode()) }]
            }
            None => Vec::new(),
        }
    }

    /// What this instance has of the document, for the periodic exchange: whoever has more
    /// answers with it.
    pub fn state_for_cluster(&self) -> Result<Action, RoomError> {
        self.not_poisoned()?;
        let result = contain(|| {
            let snapshot = self.doc.try_transact().map_err(|_| RoomError::Busy)?.snapshot();
            Ok(Action::Publish { kind: cluster::STATE, payload: snapshot.encode_v1() })
        })
        .unwrap_or_else(|why| Err(RoomError::Poisoned(why)));
        self.note(result)
    }

    /// A room that just loaded in a cluster: ask the other instances to announce their clients'
    /// presence, so this instance's first sockets see everyone at once (otherwise they would
    /// wait for each client's next renewal, up to 15 s).
    pub fn cluster_joined(&self) -> Vec<Action> {
        if !self.clustered {
            return Vec::new();
        }
        vec![Action::Publish { kind: cluster::ASK_PRESENCE, payload: Vec::new() }]
    }

    /// After a resync (the link to the other instances was lost, or messages were): announce
    /// this instance's clients again, ask the others to announce theirs, and exchange state.
    pub fn cluster_resync(&self) -> Result<Vec<Action>, RoomError> {
        let mut actions = Vec::new();
        if let Some(states) = self.awareness.local_states() {
            actions.push(Action::Publish { kind: cluster::AWARENESS, payload: states.encode() });
        }
        actions.push(Action::Publish { kind: cluster::ASK_PRESENCE, payload: Vec::new() });
        actions.push(self.state_for_cluster()?);
        Ok(actions)
    }

    /// The awareness connection standing for instance `from`.
    fn instance_conn(&mut self, from: u64) -> ConnId {
        if let Some(conn) = self.instances.get(&from) {
            return *conn;
        }
        // Far from the ids the driver gives sockets (counting up from 0).
        let conn = ConnId(u64::MAX - self.instances_ever);
        self.instances_ever += 1;
        self.instances.insert(from, conn);
        self.awareness.add_instance(conn);
        conn
    }
}

fn push_change(actions: &mut Vec<Action>, diff: Vec<u8>, except: Option<ConnId>, clustered: bool) {
    // Persist strictly before the broadcast (and the publication) that carries the same change.
    let frame = sync_update_frame(&diff);
    if clustered {
        actions.push(Action::Persist { update: diff.clone() });
        actions.push(Action::Publish { kind: cluster::UPDATE, payload: diff });
    } else {
        actions.push(Action::Persist { update: diff });
    }
    actions.push(Action::Broadcast { except, frame });
}

fn close(conn: ConnId, code: u16, reason: String) -> Action {
    // Close reasons are limited to 123 bytes by RFC 6455; keep it on a char boundary.
    let mut reason = reason;
    if reason.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    Action::Close { conn, code, reason }
}
