//! Server-side awareness (presence) tracking, done by us rather than with yrs' `Awareness`
//! because the server needs three things yrs does not give it (docs/protocols/yjs.md §4): which client ids
//! each socket introduced (so a dropped socket's cursors can be removed), removal without a
//! lingering clock that hides the same client when it comes back, and direct access to the
//! states to answer new joiners.
//!
//! Clock rules follow `y-protocols/awareness.js` so that what we accept is exactly what JS peers
//! will accept from our broadcast: an entry wins when `clock > known` (an unknown client counts
//! as clock 0), or when `clock == known`, the entry is `null` and a state is present.
//!
//! Two facts of the y-websocket client shape the rest:
//! * Every client re-sends *every* awareness change it applies, including other clients' states
//!   it just received from us. Such relays carry a clock we already hold and are ignored, so
//!   a client id is owned by the connection that last delivered a *newer* state for it.
//! * JS peers keep a removed client's clock forever. When a client comes back after we removed
//!   it, it re-sends its state with its old clock, which peers ignore (the 18–33 s presence gap
//!   described in docs/protocols/yjs.md §4.5). Merely forgetting the clock on our side only fixes *our* view, so we
//!   keep a tombstone with the removal clock and re-broadcast the returning state at
//!   `max(clock, removal clock + 1)`; peers accept it, and the returning client adopts that
//!   clock from our echo. To tell a returning client from a relayed stale copy (a peer echoing
//!   the state it received just before the removal), the re-introduction is only honoured from
//!   a connection that joined *after* the removal — such a connection never saw the old state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::de::IgnoredAny;

use crate::conn::ConnId;
use crate::lib0::{write_bytes, write_var_u64, DecodeError, Reader};

/// Tombstones kept per room before the oldest are forgotten. Only needed for the short window in
/// which stale relays can still arrive and for clients that come back, so a bound is safe.
pub const DEFAULT_MAX_TOMBSTONES: usize = 4096;

/// Client ids one connection may own at once. A y-websocket socket introduces one (its own doc's
/// client id); a reconnect race can briefly add another. Relays of other clients' states are not
/// owned, so a busy room does not count against it.
pub const DEFAULT_MAX_CLIENTS_PER_CONNECTION: usize = 64;

/// Largest JSON state of one awareness entry. Presence (a name, a colour, a cursor) is well under
/// a kilobyte; the state is kept in memory and sent to every joiner.
pub const DEFAULT_MAX_STATE_BYTES: usize = 64 * 1024;

/// An awareness update over a limit; the room closes the connection that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwarenessLimitError {
    #[error("awareness state of {bytes} bytes is over the limit of {max}")]
    StateTooLarge { bytes: usize, max: usize },
    #[error("connection would own {owned} awareness client ids, over the limit of {max}")]
    TooManyClients { owned: usize, max: usize },
}

/// One entry of an awareness update: `state == None` is JSON `null` (the client left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwarenessEntry {
    pub client_id: u64,
    pub clock: u64,
    /// The raw JSON text, relayed verbatim. Validated as JSON on decode so we never forward
    /// something `JSON.parse` would throw on in every peer.
    pub state: Option<String>,
}

/// Decoded awareness update payload (`varuint n` + n × (client, clock, varstring JSON)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AwarenessUpdate {
    pub entries: Vec<AwarenessEntry>,
}

impl AwarenessUpdate {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let count = reader.read_var_u64()?;
        // Each entry takes at least 3 bytes, so never pre-allocate more than the input allows.
        let capacity = usize::try_from(count).unwrap_or(usize::MAX).min(reader.remaining() / 3);
        let mut entries = Vec::with_capacity(capacity);
        for _ in 0..count {
            let client_id = reader.read_var_u64()?;
            let clock = reader.read_var_u64()?;
            let json = reader.read_str()?;
            if serde_json::from_str::<IgnoredAny>(json).is_err() {
                return Err(DecodeError::InvalidAwarenessJson { client_id });
            }
            let state = if json.trim_matches([' ', '\t', '\n', '\r']) == "null" { None } else { Some(json.to_owned()) };
            entries.push(AwarenessEntry { client_id, clock, state });
        }
        // Trailing bytes are tolerated, as in y-protocols: the count delimits the update.
        Ok(AwarenessUpdate { entries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_var_u64(&mut out, self.entries.len() as u64);
        for entry in &self.entries {
            write_var_u64(&mut out, entry.client_id);
            write_var_u64(&mut out, entry.clock);
            write_bytes(&mut out, entry.state.as_deref().unwrap_or("null").as_bytes());
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[derive(Debug, Clone)]
enum ClientState {
    Present {
        clock: u64,
        state: String,
        owner: ConnId,
    },
    /// Removed at `clock`; `epoch` orders the removal against connection joins.
    Removed {
        clock: u64,
        epoch: u64,
    },
}

#[derive(Debug, Default)]
struct ConnInfo {
    joined_epoch: u64,
    owned: BTreeSet<u64>,
    /// Another moai instance standing for all of its clients (cluster): its states were checked
    /// against the limits there, so none apply here.
    trusted: bool,
}

/// Awareness state of one room. Pure state machine: no timers (clients renew every 15 s and
/// time peers out after 30 s themselves; the server only has to remove on disconnect).
#[derive(Debug)]
pub struct AwarenessTracker {
    clients: BTreeMap<u64, ClientState>,
    conns: HashMap<ConnId, ConnInfo>,
    /// Increases on every join and every removal; see the module docs.
    epoch: u64,
    /// Tombstones in removal order, each with the epoch of its removal: an entry whose client
    /// has since come back or been removed again (another epoch) is stale and skipped, so
    /// forgetting the oldest tombstone is O(1).
    tombstone_order: VecDeque<(u64, u64)>,
    max_tombstones: usize,
    max_clients_per_connection: usize,
    max_state_bytes: usize,
}

impl Default for AwarenessTracker {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_TOMBSTONES)
    }
}

impl AwarenessTracker {
    pub fn new(max_tombstones: usize) -> Self {
        AwarenessTracker {
            clients: BTreeMap::new(),
            conns: HashMap::new(),
            epoch: 0,
            tombstone_order: VecDeque::new(),
            max_tombstones,
            max_clients_per_connection: DEFAULT_MAX_CLIENTS_PER_CONNECTION,
            max_state_bytes: DEFAULT_MAX_STATE_BYTES,
        }
    }

    /// Sets the per-connection limits (client ids owned, bytes of one state).
    pub fn with_limits(mut self, max_clients_per_connection: usize, max_state_bytes: usize) -> Self {
        self.max_clients_per_connection = max_clients_per_connection;
        self.max_state_bytes = max_state_bytes;
        self
    }

    /// Registers a connection. Must be called before it sends anything, and before the
    /// "all states" message is produced for it, so it is known to have seen every removal so far.
    pub fn add_connection(&mut self, conn: ConnId) {
        self.epoch += 1;
        let joined_epoch = self.epoch;
        self.conns.entry(conn).or_insert_with(|| ConnInfo { joined_epoch, owned: BTreeSet::new(), trusted: false });
    }

    /// Registers another moai instance as one connection that owns the presence of all its
    /// clients (cluster). The per-connection limits do not apply to it: that instance enforced
    /// them on each of its own sockets.
    pub fn add_instance(&mut self, conn: ConnId) {
        self.epoch += 1;
        let joined_epoch = self.epoch;
        self.conns.entry(conn).or_insert_with(|| ConnInfo { joined_epoch, owned: BTreeSet::new(), trusted: true });
    }

    /// The present states owned by this server's own sockets (not by other instances): what
    /// this instance announces to the cluster.
    pub fn local_states(&self) -> Option<AwarenessUpdate> {
        let entries: Vec<_> = self
            .clients
            .iter()
            .filter_map(|(&client_id, st)| match st {
                ClientState::Present { clock, state, owner }
                    if self.conns.get(owner).is_some_and(|info| !info.trusted) =>
                {
                    Some(AwarenessEntry { client_id, clock: *clock, state: Some(state.clone()) })
                }
                _ => None,
            })
            .collect();
        (!entries.is_empty()).then_some(AwarenessUpdate { entries })
    }

    /// Applies an update received from `conn` and returns the entries that changed our state,
    /// to be broadcast to every connection including the sender (the echo keeps a lone client
    /// under y-websocket's 30 s silence limit and hands a returning client its bumped clock).
    /// Returns `None` when nothing changed. Updates from unregistered connections are ignored.
    pub fn apply(
        &mut self,
        conn: ConnId,
        update: &AwarenessUpdate,
    ) -> Result<Option<AwarenessUpdate>, AwarenessLimitError> {
        let Some(info) = self.conns.get(&conn) else { return Ok(None) };
        let joined_epoch = info.joined_epoch;
        // Check the limits before changing anything, counting only what would be accepted.
        let mut newly_owned = BTreeSet::new();
        for entry in update.entries.iter().filter(|_| !info.trusted) {
            if let Some(state) = &entry.state {
                if state.len() > self.max_state_bytes {
                    return Err(AwarenessLimitError::StateTooLarge { bytes: state.len(), max: self.max_state_bytes });
                }
                if !info.owned.contains(&entry.client_id) && self.decide(joined_epoch, entry).is_some() {
                    newly_owned.insert(entry.client_id);
                }
            }
        }
        let owned = info.owned.len() + newly_owned.len();
        if !info.trusted && owned > self.max_clients_per_connection {
            return Err(AwarenessLimitError::TooManyClients { owned, max: self.max_clients_per_connection });
        }
        let mut changed = Vec::new();
        for entry in &update.entries {
            if let Some(out) = self.apply_entry(conn, joined_epoch, entry) {
                changed.push(out);
            }
        }
        Ok((!changed.is_empty()).then_some(AwarenessUpdate { entries: changed }))
    }

    /// The clock at which `entry` would be accepted from a connection that joined at
    /// `joined_epoch`, or None if it would be ignored. Pure: changes nothing.
    fn decide(&self, joined_epoch: u64, entry: &AwarenessEntry) -> Option<u64> {
        match (self.clients.get(&entry.client_id), &entry.state) {
            (None, Some(_)) if entry.clock > 0 => Some(entry.clock),
            (None, _) => None,
            (Some(ClientState::Present { clock: known, .. }), Some(_)) if entry.clock > *known => Some(entry.clock),
            (Some(ClientState::Present { clock: known, .. }), None) if entry.clock >= *known => Some(entry.clock),
            (Some(ClientState::Present { .. }), _) => None,
            (Some(ClientState::Removed { clock: removed, epoch }), Some(_)) => {
                if entry.clock > *removed {
                    Some(entry.clock)
                } else if joined_epoch > *epoch {
                    Some(removed.saturating_add(1))
                } else {
                    None
                }
            }
            (Some(ClientState::Removed { .. }), None) => None,
        }
    }

    fn apply_entry(&mut self, conn: ConnId, joined_epoch: u64, entry: &AwarenessEntry) -> Option<AwarenessEntry> {
        let id = entry.client_id;
        let clock = self.decide(joined_epoch, entry)?;
        // Another instance removes only the clients it owns here: one that has since moved to a
        // socket of ours (same client id, reconnected) stays.
        if entry.state.is_none() && self.conns.get(&conn).is_some_and(|info| info.trusted) {
            let owned_by_sender =
                matches!(self.clients.get(&id), Some(ClientState::Present { owner, .. }) if *owner == conn);
            if !owned_by_sender {
                return None;
            }
        }

        match &entry.state {
            Some(state) => {
                let previous =
                    self.clients.insert(id, ClientState::Present { clock, state: state.clone(), owner: conn });
                if let Some(ClientState::Present { owner, .. }) = previous {
                    if let Some(info) = self.conns.get_mut(&owner) {
                        info.owned.remove(&id);
                    }
                }
                if let Some(info) = self.conns.get_mut(&conn) {
                    info.owned.insert(id);
                }
            }
            None => self.remove_client(id, clock),
        }
        Some(AwarenessEntry { client_id: id, clock, state: entry.state.clone() })
    }

    fn remove_client(&mut self, id: u64, clock: u64) {
        if let Some(ClientState::Present { owner, .. }) = self.clients.get(&id) {
            if let Some(info) = self.conns.get_mut(owner) {
                info.owned.remove(&id);
            }
        }
        self.epoch += 1;
        self.clients.insert(id, ClientState::Removed { clock, epoch: self.epoch });
        self.tombstone_order.push_back((id, self.epoch));
        while self.tombstone_order.len() > self.max_tombstones {
            let Some((old, epoch)) = self.tombstone_order.pop_front() else { break };
            // Only the tombstone this entry recorded: a client that came back (Present) or was
            // removed again later (a newer epoch, queued further back) is left alone.
            if matches!(self.clients.get(&old), Some(ClientState::Removed { epoch: e, .. }) if *e == epoch) {
                self.clients.remove(&old);
            }
        }
    }

    /// Every present state, for a newly connected socket or a query-awareness request.
    /// `None` when nobody is present (then nothing needs to be sent).
    pub fn all_states(&self) -> Option<AwarenessUpdate> {
        let entries: Vec<_> = self
            .clients
            .iter()
            .filter_map(|(&client_id, st)| match st {
                ClientState::Present { clock, state, .. } => {
                    Some(AwarenessEntry { client_id, clock: *clock, state: Some(state.clone()) })
                }
                ClientState::Removed { .. } => None,
            })
            .collect();
        (!entries.is_empty()).then_some(AwarenessUpdate { entries })
    }

    /// Forgets a connection and returns the `null` entries for the clients it introduced (at
    /// their current clock, which JS peers accept for a removal), or `None` if it had none.
    pub fn remove_connection(&mut self, conn: ConnId) -> Option<AwarenessUpdate> {
        let info = self.conns.remove(&conn)?;
        let mut entries = Vec::new();
        for id in info.owned {
            if let Some(ClientState::Present { clock, .. }) = self.clients.get(&id) {
                let clock = *clock;
                self.remove_client(id, clock);
                entries.push(AwarenessEntry { client_id: id, clock, state: None });
            }
        }
        (!entries.is_empty()).then_some(AwarenessUpdate { entries })
    }

    /// Current state JSON of a client, if present.
    pub fn state(&self, client_id: u64) -> Option<&str> {
        match self.clients.get(&client_id) {
            Some(ClientState::Present { state, .. }) => Some(state),
            _ => None,
        }
    }

    /// Number of clients currently present.
    pub fn present_count(&self) -> usize {
        self.clients.values().filter(|s| matches!(s, ClientState::Present { .. })).count()
    }
}
