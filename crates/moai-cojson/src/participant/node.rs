//! [`Participant`]: the server's own cojson node, sans-IO. It holds the identity and this
//! process's session, the CoValues it knows (verified, [`Store`]) and the content it wrote that
//! has not been handed out yet; operations (`account.rs`, `group_ops.rs`, `map_ops.rs`) append
//! signed transactions, and [`Participant::take_content`] turns them into `content` messages for
//! the relay (docs/protocols/cojson-participant.md §3–§6).
//!
//! Every write goes through the same verification as content from the network before it is
//! kept, so what is handed out is what a relay accepts.

use super::clock::stamp;
use super::error::ParticipantError;
use super::group_view::{tx_made_at, GroupView};
use super::identity::AgentIdentity;
use super::map_view::{read_value, MapReadError};
use super::read_key::Reader;
use super::session_writer::{SessionWriter, TxPrivacy, WrittenTx};
use super::store::{IngestReport, Store};
use crate::covalue::CoValueState;
use crate::crypto::id_for_header;
use crate::group_roles::Role;
use crate::header::{Header, Ruleset};
use crate::ids::{CoId, SessionId};
use crate::message::{ContentMessage, SessionNewContent, SyncMessage};
use crate::transaction_hash::SessionHasher;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::rc::Rc;

/// Trusting (anyone holding the CoValue reads it, relays included) or private (encrypted with the
/// owner group's current read key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePrivacy {
    Trusting,
    Private,
}

/// Written content of one CoValue not yet handed out: from which index, per session.
struct Pending {
    id: CoId,
    sessions: Vec<(SessionId, u64)>,
}

/// The server as a cojson participant.
///
/// How a host uses it: check the identity with [`AgentIdentity::from_env`]; make a
/// `Participant` with 8 fresh random bytes; [`ingest`](Self::ingest) what storage holds of the
/// account and of the CoValues to read or write, dependencies first (accounts, then groups, then
/// what they own); [`bootstrap_account`](Self::bootstrap_account); then after every operation
/// hand [`take_content`](Self::take_content) to the relay as if a client had sent it, and keep
/// ingesting content that arrives from others.
pub struct Participant {
    pub(super) identity: AgentIdentity,
    /// This process's session, account form (every CoValue but the account).
    pub(super) session: SessionId,
    /// The same session in agent form (edits of our own account, §3).
    pub(super) agent_session: SessionId,
    pub(super) store: Store,
    pending: Vec<Pending>,
    /// CoValues created here whose header has not been handed out yet.
    unsent_headers: HashSet<CoId>,
}

impl Participant {
    /// A participant with a fresh session: `session_random` must be 8 new random bytes per
    /// process start (reusing a session forks it, §3).
    pub fn new(identity: AgentIdentity, session_random: [u8; 8]) -> Self {
        let part = bs58::encode(session_random).into_string();
        let session = SessionId::parse(&format!("{}_session_z{part}", identity.account_id()));
        let agent_session = SessionId::parse(&format!("{}_session_z{part}", identity.agent_id()));
        let own_header = Header::validate(identity.account(), &identity.account_header());
        match (session, agent_session, own_header) {
            (Ok(session), Ok(agent_session), Ok(own)) => Participant {
                identity,
                session,
                agent_session,
                store: Store::new(own),
                pending: Vec::new(),
                unsent_headers: HashSet::new(),
            },
            // An AgentIdentity always has a valid account ID, agent ID and account header.
            _ => unreachable!("session and account header built from a valid identity"),
        }
    }

    pub fn identity(&self) -> &AgentIdentity {
        &self.identity
    }

    /// This process's session ID (account form).
    pub fn session_id(&self) -> &str {
        self.session.as_str()
    }

    /// Takes in content from storage or the network (verified like the relay verifies it).
    /// Dependencies first: a session whose author account is not known yet is refused.
    pub fn ingest(&mut self, msg: &SyncMessage) -> Result<IngestReport, ParticipantError> {
        match msg {
            SyncMessage::Content(content) => {
                self.store.ingest(content).map_err(|e| ParticipantError::Content(e.to_string()))
            }
            _ => Err(ParticipantError::Content("not a content message".into())),
        }
    }

    /// Whether written content waits for [`Self::take_content`].
    pub fn has_pending_content(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The content written since the last call, one message per CoValue, dependencies first
    /// (accounts, then groups, then the CoValues they own; otherwise in order of first write). A
    /// CoValue created here carries its header the first time.
    pub fn take_content(&mut self) -> Vec<SyncMessage> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|p| match self.store.get(&p.id) {
            Some(s) => (s.header.priority(), s.header.account_agent().is_none()),
            None => (u8::MAX, true),
        });
        let mut out = Vec::new();
        for p in pending {
            let Some(state) = self.store.get(&p.id) else { continue };
            let header = self.unsent_headers.remove(&p.id).then(|| state.header.raw.clone());
            let mut new = Vec::new();
            for (session, after) in p.sessions {
                let Some(log) = state.sessions.get(&session) else { continue };
                let from = usize::try_from(after).unwrap_or(usize::MAX);
                let txs = log.transactions.get(from..).unwrap_or(&[]).to_vec();
                if txs.is_empty() {
                    continue;
                }
                new.push((
                    session.as_str().to_string(),
                    SessionNewContent {
                        after,
                        new_transactions: txs,
                        last_signature: log.last_signature.to_z_string(),
                        extra: Map::new(),
                    },
                ));
            }
            out.push(SyncMessage::Content(ContentMessage {
                id: p.id,
                header,
                priority: Some(state.header.priority()),
                new,
                expect_content_until: None,
                extra: Map::new(),
            }));
        }
        out
    }

    /// The value of a CoMap as this account reads it (for a group or account: its valid sets).
    pub fn read(&self, id: &str) -> Result<Map<String, Value>, ParticipantError> {
        let id = parse_id(id)?;
        let state = self.state(&id)?;
        let reader = self.reader();
        read_value(&reader, state).map_err(|e| match e {
            MapReadError::OwnerUnavailable(g) => ParticipantError::UnknownCoValue(g.to_string()),
            MapReadError::NotAComap => ParticipantError::NotAMap(id.to_string()),
        })
    }

    /// `member`'s current role in `group` (direct, through parents, or `everyone`'s).
    pub fn role_of(&self, group: &str, member: &str) -> Result<Option<Role>, ParticipantError> {
        let reader = self.reader();
        let view = self.group_view(&reader, &parse_id(group)?)?;
        Ok(view.role_at(&reader.groups, member, None))
    }

    // ---- shared by the operations ----

    pub(super) fn reader(&self) -> Reader<'_> {
        Reader::new(&self.store, self.identity.account(), self.identity.agent(), &self.identity.secret().sealer)
    }

    pub(super) fn state(&self, id: &CoId) -> Result<&CoValueState, ParticipantError> {
        let state = self.store.get(id).ok_or_else(|| ParticipantError::UnknownCoValue(id.to_string()))?;
        if state.deleted {
            return Err(ParticipantError::Deleted(id.to_string()));
        }
        Ok(state)
    }

    /// The group `id` evaluated (an account counts as a group too).
    pub(super) fn group_view(&self, reader: &Reader<'_>, id: &CoId) -> Result<Rc<GroupView>, ParticipantError> {
        let state = self.state(id)?;
        if !matches!(state.header.ruleset, Ruleset::Group { .. }) {
            return Err(ParticipantError::NotAGroup(id.to_string()));
        }
        reader.groups.view(id).ok_or_else(|| ParticipantError::NotAGroup(id.to_string()))
    }

    /// Our session in `co`: the agent form for our own account, else the account form.
    pub(super) fn session_for(&self, co: &CoId) -> &SessionId {
        if co == self.identity.account() {
            &self.agent_session
        } else {
            &self.session
        }
    }

    /// Index the next transaction of our session in `co` will take (§11, "nonce index").
    pub(super) fn next_index(&self, co: &CoId) -> u64 {
        let session = self.session_for(co);
        self.store.get(co).and_then(|s| s.sessions.get(session)).map_or(0, |l| l.count())
    }

    /// `madeAt` for our next write in `co` (§11): after every other session's transactions in
    /// `co` and in `owner` (its owner group, if any), never before our own previous one in `co`.
    pub(super) fn stamp(&self, co: &CoId, owner: Option<&CoId>, now: u64) -> u64 {
        let mine = [&self.session, &self.agent_session];
        let mut newest_other: Option<u64> = None;
        let mut newest_own: Option<u64> = None;
        for id in std::iter::once(co).chain(owner) {
            let Some(state) = self.store.get(id) else { continue };
            for (session, log) in &state.sessions {
                let own = mine.contains(&session) && id == co;
                let others = !mine.contains(&session);
                let newest = log.transactions.iter().filter_map(tx_made_at).max();
                if own {
                    newest_own = newest_own.max(newest);
                } else if others {
                    newest_other = newest_other.max(newest);
                }
            }
        }
        stamp(now, newest_other, newest_own)
    }

    /// Creates a CoValue from its header (kept here, handed out with its first content).
    pub(super) fn create(&mut self, header: Value) -> Result<CoId, ParticipantError> {
        let id = id_for_header(&header);
        let msg = ContentMessage {
            id: id.clone(),
            header: Some(header),
            priority: None,
            new: Vec::new(),
            expect_content_until: None,
            extra: Map::new(),
        };
        let report = self.store.ingest(&msg).map_err(|e| ParticipantError::SelfCheck(e.to_string()))?;
        if !report.header_installed {
            return Err(ParticipantError::SelfCheck(format!("CoValue {id} already exists")));
        }
        self.unsent_headers.insert(id.clone());
        self.pending.push(Pending { id: id.clone(), sessions: Vec::new() });
        Ok(id)
    }

    /// Appends one transaction holding `changes` to our session in `co`, at `made_at`.
    pub(super) fn append(
        &mut self,
        co: &CoId,
        changes: &[Value],
        privacy: TxPrivacy<'_>,
        made_at: u64,
    ) -> Result<WrittenTx, ParticipantError> {
        let text = super::changes::json_stringify(&Value::Array(changes.to_vec()));
        let session = self.session_for(co).clone();
        let state = self.state(co)?;
        let mut hasher = state.sessions.get(&session).map_or_else(SessionHasher::new, |l| l.hasher.clone());
        let after = hasher.count();
        let writer = SessionWriter { co_id: co, session: &session, signer: &self.identity.secret().signer };
        let written = writer.write(&mut hasher, &text, privacy, made_at)?;
        let msg = ContentMessage {
            id: co.clone(),
            header: None,
            priority: None,
            new: vec![(
                session.as_str().to_string(),
                SessionNewContent {
                    after,
                    new_transactions: vec![written.tx.clone()],
                    last_signature: written.signature.to_z_string(),
                    extra: Map::new(),
                },
            )],
            expect_content_until: None,
            extra: Map::new(),
        };
        let report = self.store.ingest(&msg).map_err(|e| ParticipantError::SelfCheck(e.to_string()))?;
        if report.sessions_extended != 1 || !report.rejected.is_empty() {
            return Err(ParticipantError::SelfCheck(format!("{co}: {:?}", report.rejected)));
        }
        let entry = match self.pending.iter_mut().position(|p| p.id == *co) {
            Some(i) => &mut self.pending[i],
            None => {
                self.pending.push(Pending { id: co.clone(), sessions: Vec::new() });
                let last = self.pending.len() - 1;
                &mut self.pending[last]
            }
        };
        if !entry.sessions.iter().any(|(s, _)| *s == session) {
            entry.sessions.push((session, after));
        }
        Ok(written)
    }

    /// Appends a trusting single-`set` transaction (what groups and accounts accept, §4).
    pub(super) fn append_set(&mut self, co: &CoId, key: &str, value: Value, now: u64) -> Result<(), ParticipantError> {
        let made_at = self.stamp(co, None, now);
        self.append(co, &[super::changes::set_op(key, value)], TxPrivacy::Trusting, made_at).map(|_| ())
    }
}

pub(super) fn parse_id(id: &str) -> Result<CoId, ParticipantError> {
    CoId::parse(id).map_err(|_| ParticipantError::BadId(id.to_string()))
}
