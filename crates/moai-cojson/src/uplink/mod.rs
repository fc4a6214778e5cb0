//! Agent mode's upstream link (docs/participant.md, "Agent mode"): this server as a *client* of
//! another sync server (another moai, or any Jazz sync server), keeping a set of CoValues in
//! sync between the two.
//!
//! Sans-IO. The link sits between two servers and is a client of both: the local relay (an
//! in-process session) and the upstream server (a WebSocket). Each server sees an ordinary
//! client peer whose known state is, in truth, the *other* server's: so a server's `known`
//! is passed on to the other one, which then pushes what the first lacks, and content from one
//! is passed on to the other, which verifies, stores and acknowledges it as it would a client's.
//! The link holds no content and verifies nothing itself; both servers do.
//!
//! Servers only answer, they never ask (a relay in role "server" pushes what a peer lacks but
//! does not fetch what the peer has). Two things make the pair converge anyway:
//! * **The kick.** On every new link (both sessions fresh) the link sends the local relay a
//!   `load` for every CoValue it follows, with the upstream's last reported state (the lower
//!   bound of what upstream holds, since acks report durable state). The local relay answers
//!   with what upstream lacks, or with its own state.
//! * **`known` becomes `load` until the other side has reported.** A `known` passed on to a side
//!   that has not yet told the link its own state for that CoValue (on this link) is sent as a
//!   `load`, which a server always answers: with content the sender lacks, or with its state.
//!   Once both sides reported, `known`s pass as `known`s, and each server pushes what the other
//!   lacks. Every step answers a strictly newer state or nothing, so an exchange ends.
//!
//! Dependency requests (a server's `load` for a CoValue its content needs) pass to the other
//! side, and the answer is passed back as a `known` (which is what clears the request). A
//! correction passes as a correction. Everything a side says about a CoValue adds it to the
//! followed set, up to `max_followed`. The kick sends groups (and accounts) first: a server
//! answers a `load` with the dependencies its peer lacks before the CoValue, and on a fresh
//! link its peer lacks all of them.
//!
//! [`Event::Fetch`] asks for one CoValue to be brought from upstream: it completes when the
//! local relay has reported holding everything upstream reported (or upstream said it has none).

use std::collections::HashMap;

use serde_json::Map;

use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::message::{KnownMessage, SyncMessage};

/// One of the two servers the link connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// This server's relay (an in-process session).
    Local,
    /// The server configured as `PEER_MOAI`.
    Upstream,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Local => Side::Upstream,
            Side::Upstream => Side::Local,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Local => 0,
            Side::Upstream => 1,
        }
    }
}

/// Names a [`Event::Fetch`], chosen by the driver.
pub type FetchId = u64;

/// How a fetch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The local relay now holds everything upstream reported of it.
    Found,
    /// Neither server has it.
    NotFound,
    /// No link to upstream (down, or it went down before the answer); the local relay holds
    /// what it held.
    Offline,
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // events and actions are consumed at once
pub enum Event {
    /// A new link: a fresh local session and a fresh upstream connection, both open.
    Connected,
    /// The link is down (either side closed); nothing passes until the next `Connected`.
    Disconnected,
    /// A message one side sent the link.
    Message(Side, SyncMessage),
    /// Keep this CoValue (and what it depends on) in sync from now on.
    Follow(CoId),
    /// Bring this CoValue from upstream and report [`Action::Fetched`].
    Fetch(FetchId, CoId),
}

#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Send this message to that side (messages for one side in order).
    Send(Side, SyncMessage),
    /// The answer to an [`Event::Fetch`].
    Fetched(FetchId, Fetched),
}

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// CoValues the link follows at most. Each costs both servers a subscription of this peer
    /// (their per-peer bound closes a peer beyond theirs, 20 000 on moai); beyond it, messages
    /// still pass, but a new CoValue is not kicked again on the next link.
    pub max_followed: usize,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig { max_followed: 10_000 }
    }
}

/// Fetches waiting for an answer at most; beyond it the oldest is answered `Offline`.
const MAX_PENDING_FETCHES: usize = 1024;

/// What the link knows of one followed CoValue.
#[derive(Debug)]
struct Followed {
    /// First-seen order.
    seq: u64,
    /// Whether its header says it is a group (accounts are groups too). Groups are kicked
    /// first: a server answers a `load` with the dependencies its peer lacks first, and on a
    /// fresh link the peer lacks all of them, so kicking a map before its group would send the
    /// group whole.
    group: bool,
    /// The upstream's last reported state, kept across links: the kick's lower bound.
    upstream_last: Option<KnownState>,
    /// On this link: per side, whether it reported its state (sent a `known`).
    reported: [bool; 2],
    /// On this link: per side, whether it asked for this CoValue (a dependency request) and
    /// waits for a `known` answer.
    requested: [bool; 2],
    /// On this link: everything upstream said it holds (knowns and content), and whether it
    /// said anything at all.
    upstream_floor: Option<KnownState>,
    /// On this link: what the local relay said it holds.
    local: Option<KnownState>,
    /// Added by a fetch and not (yet) kept: released when its fetches are answered, unless it
    /// was found and fits within `max_followed` (see [`Uplink::release`]).
    by_fetch: bool,
}

impl Followed {
    fn new(seq: u64) -> Self {
        Followed {
            seq,
            group: false,
            upstream_last: None,
            reported: [false; 2],
            requested: [false; 2],
            upstream_floor: None,
            local: None,
            by_fetch: false,
        }
    }

    fn reset_link(&mut self) {
        self.reported = [false; 2];
        self.requested = [false; 2];
        self.upstream_floor = None;
        self.local = None;
    }

    /// A fetch's outcome, if it is decided.
    fn fetched(&self) -> Option<Fetched> {
        let floor = self.upstream_floor.as_ref()?;
        let local = self.local.as_ref()?;
        if !floor.header && !local.header {
            return Some(Fetched::NotFound);
        }
        floor.missing_in(local).is_empty().then_some(Fetched::Found)
    }
}

/// The link's state machine. See the module docs.
pub struct Uplink {
    config: UplinkConfig,
    connected: bool,
    followed: HashMap<CoId, Followed>,
    next_seq: u64,
    fetches: Vec<(FetchId, CoId)>,
    out: Vec<Action>,
}

fn merge_into(slot: &mut Option<KnownState>, state: &KnownState) {
    match slot {
        Some(s) => s.merge(state),
        None => *slot = Some(state.clone()),
    }
}

/// What a content message shows its sender holds.
fn content_state(c: &crate::message::ContentMessage) -> KnownState {
    let mut state = KnownState::empty(c.id.clone());
    state.header = c.header.is_some();
    for (key, s) in &c.new {
        if let Ok(session) = crate::ids::SessionId::parse(key) {
            state.raise(&session, s.after + s.new_transactions.len() as u64);
        }
    }
    state
}

impl Uplink {
    pub fn new(config: UplinkConfig) -> Self {
        Uplink { config, connected: false, followed: HashMap::new(), next_seq: 0, fetches: Vec::new(), out: Vec::new() }
    }

    /// Whether the link is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// How many CoValues the link follows.
    pub fn followed_count(&self) -> usize {
        self.followed.len()
    }

    /// Whether the link follows `id`.
    pub fn follows(&self, id: &CoId) -> bool {
        self.followed.contains_key(id)
    }

    /// Processes one event; returns what the driver must do, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Connected => self.on_connected(),
            Event::Disconnected => self.on_disconnected(),
            Event::Message(side, msg) => {
                if self.connected {
                    self.on_message(side, msg);
                }
            }
            Event::Follow(id) => {
                // Asked to keep what a fetch brought: kept if it fits.
                let len = self.followed.len();
                if let Some(f) = self.followed.get_mut(&id).filter(|f| f.by_fetch) {
                    f.by_fetch = len > self.config.max_followed;
                }
                if self.follow(&id) && self.connected {
                    self.kick(&id);
                }
            }
            Event::Fetch(fetch, id) => self.on_fetch(fetch, id),
        }
        std::mem::take(&mut self.out)
    }

    /// Adds `id` to the followed set; false when the set is full.
    fn follow(&mut self, id: &CoId) -> bool {
        if self.followed.contains_key(id) {
            return true;
        }
        if self.followed.len() >= self.config.max_followed {
            return false;
        }
        self.next_seq += 1;
        self.followed.insert(id.clone(), Followed::new(self.next_seq));
        true
    }

    fn on_connected(&mut self) {
        self.connected = true;
        let mut ids: Vec<(bool, u64, CoId)> = self
            .followed
            .iter_mut()
            .map(|(id, f)| {
                f.reset_link();
                (!f.group, f.seq, id.clone())
            })
            .collect();
        ids.sort();
        for (_, _, id) in ids {
            self.kick(&id);
        }
    }

    fn on_disconnected(&mut self) {
        self.connected = false;
        for f in self.followed.values_mut() {
            f.reset_link();
        }
        for (fetch, id) in std::mem::take(&mut self.fetches) {
            self.answer(fetch, &id, Fetched::Offline);
        }
    }

    /// Answers one fetch, and lets go of what only fetches kept.
    fn answer(&mut self, fetch: FetchId, id: &CoId, outcome: Fetched) {
        self.out.push(Action::Fetched(fetch, outcome));
        self.release(id, outcome);
    }

    /// A CoValue a fetch added stays followed only if it was found and fits within
    /// `max_followed`. Everything else a fetch added goes once no fetch waits for it: an id that
    /// names nothing, or one asked for beyond the bound, must not stay followed. Otherwise any
    /// caller of the agent API could grow the set without end, and past the upstream's own
    /// per-peer bound every link would be refused.
    fn release(&mut self, id: &CoId, outcome: Fetched) {
        if self.fetches.iter().any(|(_, f)| f == id) {
            return;
        }
        let len = self.followed.len();
        let Some(f) = self.followed.get_mut(id) else { return };
        if !f.by_fetch {
            return;
        }
        if outcome == Fetched::Found && len <= self.config.max_followed {
            f.by_fetch = false;
        } else {
            self.followed.remove(id);
        }
    }

    /// Asks the local relay for what upstream lacks of `id` (relative to what upstream last
    /// reported), which starts the exchange of the module docs.
    fn kick(&mut self, id: &CoId) {
        let state = self
            .followed
            .get(id)
            .and_then(|f| f.upstream_last.clone())
            .unwrap_or_else(|| KnownState::empty(id.clone()));
        self.out.push(Action::Send(Side::Local, SyncMessage::Load(state, Map::new())));
    }

    fn on_fetch(&mut self, fetch: FetchId, id: CoId) {
        if !self.connected {
            self.out.push(Action::Fetched(fetch, Fetched::Offline));
            return;
        }
        // Tracked while the fetch waits even beyond `max_followed`; kept afterwards only if
        // found and within it (`release`).
        if !self.followed.contains_key(&id) {
            self.next_seq += 1;
            let mut f = Followed::new(self.next_seq);
            f.by_fetch = true;
            self.followed.insert(id.clone(), f);
        }
        let f = &self.followed[&id];
        if let Some(outcome) = f.fetched() {
            self.answer(fetch, &id, outcome);
            return;
        }
        let heard = f.upstream_floor.is_some();
        self.fetches.push((fetch, id.clone()));
        if self.fetches.len() > MAX_PENDING_FETCHES {
            // The oldest has waited longest (its caller has most likely given up): answered now.
            let (oldest, oldest_id) = self.fetches.remove(0);
            self.answer(oldest, &oldest_id, Fetched::Offline);
        }
        if !heard {
            self.kick(&id);
        }
    }

    fn on_message(&mut self, side: Side, msg: SyncMessage) {
        let id = match &msg {
            SyncMessage::Load(s, _) => s.id.clone(),
            SyncMessage::Known(k) => k.state.id.clone(),
            SyncMessage::Content(c) => c.id.clone(),
            // Legacy, or a client's whole-store check: servers send neither to a client.
            SyncMessage::Done(_) | SyncMessage::Reconcile(_) | SyncMessage::ReconcileAck(_) => return,
        };
        self.follow(&id);
        let to = side.other();
        match msg {
            SyncMessage::Load(state, extra) => {
                if let Some(f) = self.followed.get_mut(&id) {
                    f.requested[side.index()] = true;
                }
                self.out.push(Action::Send(to, SyncMessage::Load(state, extra)));
            }
            SyncMessage::Content(c) => {
                let shown = content_state(&c);
                if let Some(f) = self.followed.get_mut(&id) {
                    if let Some(header) = &c.header {
                        f.group = header["ruleset"]["type"].as_str() == Some("group");
                    }
                    match side {
                        Side::Upstream => merge_into(&mut f.upstream_floor, &shown),
                        Side::Local => merge_into(&mut f.local, &shown),
                    }
                    // Content answers a dependency request as well as a `known` does.
                    f.requested[to.index()] = false;
                }
                self.out.push(Action::Send(to, SyncMessage::Content(c)));
            }
            SyncMessage::Known(k) => self.on_known(side, k),
            _ => {}
        }
        self.settle_fetches(&id);
    }

    fn on_known(&mut self, side: Side, k: KnownMessage) {
        let to = side.other();
        let id = k.state.id.clone();
        let mut as_load = false;
        let mut k = k;
        if let Some(f) = self.followed.get_mut(&id) {
            f.reported[side.index()] = true;
            match side {
                Side::Upstream => {
                    // Upstream holds less than it reported before (it lost data, or was
                    // replaced): the local relay was told more by the kick, and a plain `known`
                    // never lowers a peer's state. Passed on as a correction, so the local relay
                    // resends from what upstream really holds.
                    let lost = f.upstream_last.as_ref().is_some_and(|last| !last.missing_in(&k.state).is_empty());
                    if k.is_correction || lost {
                        k.is_correction = true;
                        f.upstream_last = Some(k.state.clone());
                    } else {
                        merge_into(&mut f.upstream_last, &k.state);
                    }
                    merge_into(&mut f.upstream_floor, &k.state);
                }
                Side::Local => {
                    if k.is_correction {
                        f.local = Some(k.state.clone());
                    } else {
                        merge_into(&mut f.local, &k.state);
                    }
                }
            }
            // A side waiting for its request's answer gets a `known` (that clears it); a side
            // that has not reported gets a `load` (so it answers with its own state).
            let requested = std::mem::take(&mut f.requested[to.index()]);
            as_load = !k.is_correction && !requested && !f.reported[to.index()];
        }
        let msg = if as_load {
            SyncMessage::Load(k.state, Map::new())
        } else {
            SyncMessage::Known(KnownMessage { as_dependency_of: None, extra: Map::new(), ..k })
        };
        self.out.push(Action::Send(to, msg));
    }

    fn settle_fetches(&mut self, id: &CoId) {
        if !self.fetches.iter().any(|(_, f)| f == id) {
            return;
        }
        let Some(outcome) = self.followed.get(id).and_then(Followed::fetched) else { return };
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fetches).into_iter().partition(|(_, f)| f == id);
        self.fetches = rest;
        for (fetch, id) in done {
            self.answer(fetch, &id, outcome);
        }
    }
}

#[cfg(test)]
mod tests;
