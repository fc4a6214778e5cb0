//! The server's own account at work (participant mode, docs/participant.md): a task that holds
//! the sans-IO [`Participant`] and talks to the relay as an in-process client, over an ordinary
//! [`CojsonSession`]. So everything the server writes goes through the same verification,
//! storage and fan-out as a client's content, and clients load the server's account like any
//! other.
//!
//! How it knows a load or a write is complete, with the protocol alone: it sends `load` with
//! the known state it has; the relay answers with content the task lacks, or with `known` when
//! it lacks nothing. A `known` that the task's state covers means "in sync" (and, after a write,
//! "durable": the relay acks only durable content).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Map, Value};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::session::{CojsonSession, Outbound};
use super::CojsonService;
use crate::group_roles::Role;
use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::message::{parse_frame, Incoming, SyncMessage};
use crate::participant::{
    AccountBootstrap, AgentIdentity, Entropy, EntropyError, Participant, ParticipantError, WritePrivacy,
};

fn parse(id: &str) -> Result<CoId, ParticipantServiceError> {
    CoId::parse(id).map_err(|_| ParticipantError::BadId(id.to_owned()).into())
}

/// How long one sync exchange with the relay may take (a storage read, a durable write).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Rounds of `load` one read may take (each brings content the task lacked).
const MAX_ROUNDS: usize = 64;

/// Why the server's account could not do something.
#[derive(Debug, Error)]
pub enum ParticipantServiceError {
    #[error(transparent)]
    Participant(#[from] ParticipantError),
    #[error("no randomness from the operating system: {0}")]
    Entropy(#[from] EntropyError),
    /// The relay closed the in-process session (shutdown, storage failure).
    #[error("the relay closed the participant's session: {0}")]
    SessionClosed(String),
    #[error("no answer from the relay about {0} within {1:?}")]
    Timeout(String, Duration),
    #[error("{0} is not stored")]
    NotFound(String),
    /// The request does not fit the CoValue (a key for a CoList, none for a CoMap).
    #[error("{0}")]
    BadRequest(String),
    /// The participant task is gone (shutdown).
    #[error("the participant is not running")]
    Stopped,
}

/// What `GET /profile` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileView {
    pub account_id: String,
    pub profile_id: Option<String>,
    pub profile_name: Option<String>,
    pub session_id: String,
    /// Whether this start created the account (or added its missing profile).
    pub created: bool,
    /// The username registry (a CoMap everyone can read).
    pub registry_id: Option<String>,
    /// What clients said they gave the server (`/on-added`): CoValue id → what was recorded.
    pub given: Map<String, Value>,
}

/// What `/register-human` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The name now points to the account.
    Registered,
    /// It already did (idempotent).
    AlreadyRegistered,
    /// It points to another account; nothing changed.
    Conflict,
}

type Reply<T> = oneshot::Sender<Result<T, ParticipantServiceError>>;

enum Command {
    Profile(Reply<ProfileView>),
    OnAdded {
        id: String,
        reply: Reply<Value>,
    },
    RegisterHuman {
        username: String,
        account: String,
        reply: Reply<Registration>,
    },
    Trigger {
        id: String,
        key: Option<String>,
        value: Value,
        on_behalf_of: Option<String>,
        reply: Reply<()>,
    },
    CreateSharedMap {
        parent: String,
        role: Option<Role>,
        init: Map<String, Value>,
        on_behalf_of: Option<String>,
        reply: Reply<SharedMap>,
    },
}

/// What `/create-map` made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMap {
    /// The server's new group (it is admin), extended into the caller's group.
    pub group_id: String,
    pub map_id: String,
}

/// Keys of the server's profile that name its own CoMaps.
const REGISTRY_KEY: &str = "moaiRegistry";
const GIVEN_KEY: &str = "moaiGiven";

/// Handle on the server's account. Cheap to clone.
#[derive(Clone)]
pub struct ParticipantService {
    commands: mpsc::Sender<Command>,
    account_id: String,
}

/// The operating system's CSPRNG.
struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), EntropyError> {
        getrandom::fill(dest).map_err(|e| EntropyError(e.to_string()))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl ParticipantService {
    /// Connects the account to `cojson`, loads it from storage, creates it (account, profile
    /// group, profile named `name`) on first start or adds a missing profile, and waits until
    /// that is durable. Fails if storage holds an account with this id for another agent.
    pub async fn start(
        cojson: &CojsonService,
        identity: AgentIdentity,
        name: &str,
    ) -> Result<ParticipantService, ParticipantServiceError> {
        let session = cojson.connect().await.map_err(|_| ParticipantServiceError::Stopped)?;
        let mut random = [0u8; 8];
        OsEntropy.fill(&mut random)?;
        let account_id = identity.account_id().to_owned();
        let mut task = ParticipantTask {
            participant: Participant::new(identity, random),
            session,
            known: HashMap::new(),
            headers: HashMap::new(),
        };
        let account = CoId::parse(&account_id).map_err(|_| ParticipantServiceError::NotFound(account_id.clone()))?;
        let stored = task.sync(&account).await?;
        if stored {
            // Its profile (and profile group) too, so the bootstrap can tell whether it exists.
            if let Some(profile) = task.profile_id(&account_id) {
                if let Ok(id) = CoId::parse(&profile) {
                    task.sync(&id).await?;
                }
            }
        }
        let outcome = task.participant.bootstrap_account(name, now_ms(), &mut OsEntropy)?;
        let created = !matches!(outcome, AccountBootstrap::Complete);
        task.flush().await?;
        task.ensure_own_maps().await?;
        let (commands, rx) = mpsc::channel(64);
        tokio::spawn(task.run(rx, created));
        Ok(ParticipantService { commands, account_id })
    }

    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ParticipantServiceError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| ParticipantServiceError::Stopped)?;
        answer.await.map_err(|_| ParticipantServiceError::Stopped)?
    }

    pub async fn profile(&self) -> Result<ProfileView, ParticipantServiceError> {
        self.ask(Command::Profile).await
    }

    /// A client says it gave the server access to `id` (a group or a CoMap): load it, check that
    /// the server can read it (a role in the group that owns it, directly, through a parent or
    /// `everyone`), and record it. Returns what was recorded.
    pub async fn on_added(&self, id: &str) -> Result<Value, ParticipantServiceError> {
        let id = id.to_owned();
        self.ask(|reply| Command::OnAdded { id, reply }).await
    }

    /// Registers `username` → `account` in the server's registry, first come first served.
    pub async fn register_human(&self, username: &str, account: &str) -> Result<Registration, ParticipantServiceError> {
        let (username, account) = (username.to_owned(), account.to_owned());
        self.ask(|reply| Command::RegisterHuman { username, account, reply }).await
    }

    /// Creates a CoMap holding `init` in a new group of the server's, and extends that group into
    /// `parent` (a client's group) with `role` (`None`: inherit), so `parent`'s members read
    /// (and, by role, write) it. `on_behalf_of`: an account that asked for it, which must be a
    /// member of `parent` itself.
    pub async fn create_shared_map(
        &self,
        parent: &str,
        role: Option<Role>,
        init: Map<String, Value>,
        on_behalf_of: Option<&str>,
    ) -> Result<SharedMap, ParticipantServiceError> {
        let (parent, on_behalf_of) = (parent.to_owned(), on_behalf_of.map(str::to_owned));
        self.ask(|reply| Command::CreateSharedMap { parent, role, init, on_behalf_of, reply }).await
    }

    /// As the server (it needs a write role there): sets `key` to `value` in the CoMap `id`, or
    /// appends `value` to the CoList `id` (no `key`). `on_behalf_of`: an account that asked for
    /// it, which must have a write role there itself.
    pub async fn trigger(
        &self,
        id: &str,
        key: Option<&str>,
        value: Value,
        on_behalf_of: Option<&str>,
    ) -> Result<(), ParticipantServiceError> {
        let (id, key, on_behalf_of) = (id.to_owned(), key.map(str::to_owned), on_behalf_of.map(str::to_owned));
        self.ask(|reply| Command::Trigger { id, key, value, on_behalf_of, reply }).await
    }
}

struct ParticipantTask {
    participant: Participant,
    session: CojsonSession,
    /// What the task holds of each CoValue it has synced or written (its known state).
    known: HashMap<CoId, KnownState>,
    /// Headers of the CoValues it has seen (to find a CoMap's owner group).
    headers: HashMap<CoId, Value>,
}

impl ParticipantTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, created: bool) {
        loop {
            let cmd = tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => break,
                },
                // Between commands the relay pushes what changed in the CoValues the account
                // synced (clients' edits, or agent mode's upstream): taken in as it comes, so
                // the session's outbox never fills (the relay would close it) and the account's
                // view stays current.
                out = self.session.outbound() => {
                    match out {
                        Some(Outbound::Text(text)) => self.absorb_frame(&text),
                        Some(Outbound::Close { code, reason }) => {
                            tracing::error!(code, %reason, "the relay closed the participant's session");
                            break;
                        }
                        None => break,
                    }
                    continue;
                }
            };
            match cmd {
                Command::Profile(reply) => {
                    let _ = reply.send(Ok(self.profile_view(created)));
                }
                Command::OnAdded { id, reply } => {
                    let _ = reply.send(self.on_added(&id).await);
                }
                Command::RegisterHuman { username, account, reply } => {
                    let _ = reply.send(self.register_human(&username, &account).await);
                }
                Command::Trigger { id, key, value, on_behalf_of, reply } => {
                    let _ = reply.send(self.trigger(&id, key.as_deref(), value, on_behalf_of.as_deref()).await);
                }
                Command::CreateSharedMap { parent, role, init, on_behalf_of, reply } => {
                    let _ = reply.send(self.create_shared_map(&parent, role, init, on_behalf_of.as_deref()).await);
                }
            }
        }
        self.session.leave().await;
    }

    fn profile_view(&self, created: bool) -> ProfileView {
        let account = self.participant.identity().account_id().to_owned();
        let profile_id = self.profile_id(&account);
        let profile = profile_id.as_deref().and_then(|p| self.participant.read(p).ok()).unwrap_or_default();
        let text = |k: &str| profile.get(k).and_then(Value::as_str).map(str::to_owned);
        let given = text(GIVEN_KEY).and_then(|g| self.participant.read(&g).ok()).unwrap_or_default();
        ProfileView {
            account_id: account,
            profile_id,
            profile_name: text("name"),
            session_id: self.participant.session_id().to_owned(),
            created,
            registry_id: text(REGISTRY_KEY),
            given,
        }
    }

    /// The profile's own CoMaps: the username registry (its group lets everyone read) and the
    /// record of what the server was given (only the server's account can read it). Created
    /// once, named in the profile.
    async fn ensure_own_maps(&mut self) -> Result<(), ParticipantServiceError> {
        let account = self.participant.identity().account_id().to_owned();
        let Some(profile) = self.profile_id(&account) else { return Ok(()) };
        let current = self.participant.read(&profile)?;
        for (key, public) in [(REGISTRY_KEY, true), (GIVEN_KEY, false)] {
            if current.get(key).and_then(Value::as_str).is_some() {
                // Written by an earlier start: load it (and its group) to write to it.
                let id = current.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
                self.sync(&parse(&id)?).await?;
                continue;
            }
            let now = now_ms();
            let group = self.participant.create_group(None, now, &mut OsEntropy)?;
            if public {
                self.participant.add_member(&group, "everyone", crate::group_roles::Role::Reader, now)?;
            }
            let map = self.participant.create_map(&group, None, &[], WritePrivacy::Private, now, &mut OsEntropy)?;
            self.participant.set(&profile, key, Value::String(map), WritePrivacy::Private, now)?;
            self.flush().await?;
        }
        Ok(())
    }

    fn own_map(&self, key: &str) -> Result<String, ParticipantServiceError> {
        let account = self.participant.identity().account_id().to_owned();
        let profile = self.profile_id(&account).ok_or_else(|| ParticipantServiceError::NotFound("profile".into()))?;
        self.participant
            .read(&profile)?
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ParticipantServiceError::NotFound(key.into()))
    }

    async fn on_added(&mut self, id: &str) -> Result<Value, ParticipantServiceError> {
        let co = parse(id)?;
        if !self.sync(&co).await? {
            return Err(ParticipantServiceError::NotFound(id.to_owned()));
        }
        let group = self.owner_group(&co)?;
        let me = self.participant.identity().account_id().to_owned();
        let role = self.participant.role_of(&group, &me)?;
        let Some(role) = role.filter(|r| r.as_str() != "revoked") else {
            return Err(ParticipantError::NotPermitted(format!("this server has no role in {group}")).into());
        };
        let record = serde_json::json!({ "role": role.as_str(), "group": group, "at": now_ms() });
        let given = self.own_map(GIVEN_KEY)?;
        self.participant.set(&given, id, record.clone(), WritePrivacy::Private, now_ms())?;
        self.flush().await?;
        Ok(record)
    }

    /// The group that decides who reads and writes `co`: itself for a group, else its owner.
    fn owner_group(&self, co: &CoId) -> Result<String, ParticipantServiceError> {
        let header = self.headers.get(co).cloned().unwrap_or(Value::Null);
        let ruleset = &header["ruleset"];
        match ruleset["type"].as_str() {
            Some("group") => Ok(co.as_str().to_owned()),
            Some("ownedByGroup") => Ok(ruleset["group"].as_str().unwrap_or_default().to_owned()),
            _ => Err(ParticipantError::NotAMap(co.to_string()).into()),
        }
    }

    async fn register_human(&mut self, username: &str, account: &str) -> Result<Registration, ParticipantServiceError> {
        let registry = self.own_map(REGISTRY_KEY)?;
        match self.participant.read(&registry)?.get(username).and_then(Value::as_str) {
            Some(existing) if existing == account => return Ok(Registration::AlreadyRegistered),
            Some(_) => return Ok(Registration::Conflict),
            None => {}
        }
        self.participant.set(
            &registry,
            username,
            Value::String(account.to_owned()),
            WritePrivacy::Private,
            now_ms(),
        )?;
        self.flush().await?;
        Ok(Registration::Registered)
    }

    async fn trigger(
        &mut self,
        id: &str,
        key: Option<&str>,
        value: Value,
        on_behalf_of: Option<&str>,
    ) -> Result<(), ParticipantServiceError> {
        let co = parse(id)?;
        if !self.sync(&co).await? {
            return Err(ParticipantServiceError::NotFound(id.to_owned()));
        }
        if let Some(account) = on_behalf_of {
            let group = self.owner_group(&co)?;
            let role = self.participant.role_of(&group, account)?;
            let writes = role.is_some_and(|r| matches!(r.as_str(), "admin" | "manager" | "writer"));
            if !writes {
                return Err(ParticipantError::NotPermitted(format!("{account} may not write {id}")).into());
            }
        }
        let kind = self.headers.get(&co).and_then(|h| h["type"].as_str().map(str::to_owned));
        match (kind.as_deref(), key) {
            (Some("colist"), None) => self.participant.append_to_list(id, value, WritePrivacy::Private, now_ms())?,
            (Some("colist"), Some(_)) => {
                return Err(ParticipantServiceError::BadRequest(format!("{id} is a CoList: give a value, not a key")))
            }
            (_, Some(key)) => self.participant.set(id, key, value, WritePrivacy::Private, now_ms())?,
            (_, None) => {
                return Err(ParticipantServiceError::BadRequest(format!("{id} is not a CoList: a key is needed")))
            }
        }
        self.flush().await
    }

    async fn create_shared_map(
        &mut self,
        parent: &str,
        role: Option<Role>,
        init: Map<String, Value>,
        on_behalf_of: Option<&str>,
    ) -> Result<SharedMap, ParticipantServiceError> {
        let co = parse(parent)?;
        if !self.sync(&co).await? {
            return Err(ParticipantServiceError::NotFound(parent.to_owned()));
        }
        if let Some(account) = on_behalf_of {
            let member = self.participant.role_of(parent, account)?;
            if !member.is_some_and(|r| matches!(r, Role::Admin | Role::Manager | Role::Writer | Role::Reader)) {
                return Err(ParticipantError::NotPermitted(format!("{account} is not a member of {parent}")).into());
            }
        }
        let now = now_ms();
        let group = self.participant.create_group(None, now, &mut OsEntropy)?;
        self.participant.extend(&group, parent, role, now, &mut OsEntropy)?;
        let entries: Vec<(&str, Value)> = init.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let map = self.participant.create_map(&group, None, &entries, WritePrivacy::Private, now, &mut OsEntropy)?;
        self.flush().await?;
        Ok(SharedMap { group_id: group, map_id: map })
    }

    fn profile_id(&self, account: &str) -> Option<String> {
        self.participant.read(account).ok()?.get("profile").and_then(Value::as_str).map(str::to_owned)
    }

    async fn send(&self, messages: &[SyncMessage]) -> Result<(), ParticipantServiceError> {
        self.session
            .receive(&messages.iter().map(SyncMessage::to_json).collect::<Vec<_>>().join("\n"))
            .await
            .map(|_| ())
            .map_err(|_| ParticipantServiceError::SessionClosed("the relay stopped".into()))
    }

    /// The next message from the relay (pings skipped).
    async fn next(&mut self, about: &CoId) -> Result<Vec<SyncMessage>, ParticipantServiceError> {
        let out = tokio::time::timeout(EXCHANGE_TIMEOUT, self.session.outbound())
            .await
            .map_err(|_| ParticipantServiceError::Timeout(about.to_string(), EXCHANGE_TIMEOUT))?;
        match out {
            None => Err(ParticipantServiceError::SessionClosed("no reason given".into())),
            Some(Outbound::Close { code, reason }) => {
                Err(ParticipantServiceError::SessionClosed(format!("{code} {reason}")))
            }
            Some(Outbound::Text(text)) => Ok(parse_frame(&text)
                .into_iter()
                .filter_map(|line| match line {
                    Ok(Incoming::Sync(msg)) => Some(msg),
                    _ => None,
                })
                .collect()),
        }
    }

    /// Takes in a frame the relay pushed between commands.
    fn absorb_frame(&mut self, text: &str) {
        for line in parse_frame(text) {
            if let Ok(Incoming::Sync(msg)) = line {
                if let Err(e) = self.absorb(&msg) {
                    tracing::warn!(error = %e, "the participant could not take in pushed content");
                }
            }
        }
    }

    fn known_of(&self, id: &CoId) -> KnownState {
        self.known.get(id).cloned().unwrap_or_else(|| KnownState::empty(id.clone()))
    }

    /// Takes in one message from the relay: content goes into the participant.
    fn absorb(&mut self, msg: &SyncMessage) -> Result<(), ParticipantServiceError> {
        if let SyncMessage::Content(c) = msg {
            if let Some(h) = &c.header {
                self.headers.entry(c.id.clone()).or_insert_with(|| h.clone());
            }
            let report = self.participant.ingest(msg)?;
            if !report.rejected.is_empty() {
                tracing::warn!(covalue = %c.id, rejected = ?report.rejected, "participant refused sessions of stored content");
            }
            let entry = self.known.entry(c.id.clone()).or_insert_with(|| KnownState::empty(c.id.clone()));
            entry.header |= c.header.is_some();
            for (key, s) in &c.new {
                if let Ok(session) = crate::ids::SessionId::parse(key) {
                    entry.raise(&session, s.after + s.new_transactions.len() as u64);
                }
            }
        }
        Ok(())
    }

    /// Brings `id` (and what the relay sends first: its dependencies) in sync with the relay.
    /// Returns whether the relay has it at all.
    async fn sync(&mut self, id: &CoId) -> Result<bool, ParticipantServiceError> {
        for _ in 0..MAX_ROUNDS {
            let ours = self.known_of(id);
            self.send(&[SyncMessage::Load(ours, Map::new())]).await?;
            // Read until the relay said something about `id` itself.
            loop {
                let messages = self.next(id).await?;
                let mut about_id = None;
                for msg in &messages {
                    self.absorb(msg)?;
                    match msg {
                        SyncMessage::Known(k) if &k.state.id == id => about_id = Some(Some(k.state.clone())),
                        SyncMessage::Content(c) if &c.id == id => about_id = Some(None),
                        _ => {}
                    }
                }
                match about_id {
                    // A `known`: in sync when we hold at least that much; absent when it has no header.
                    Some(Some(theirs)) => {
                        if !theirs.header {
                            return Ok(false);
                        }
                        if theirs.missing_in(&self.known_of(id)).is_empty() {
                            return Ok(true);
                        }
                        break; // ask again with what we have now
                    }
                    // Content: ask again, until the relay answers `known`.
                    Some(None) => break,
                    None => continue,
                }
            }
        }
        Err(ParticipantServiceError::Timeout(id.to_string(), EXCHANGE_TIMEOUT))
    }

    /// Hands what the participant wrote to the relay and waits until each CoValue is acked
    /// (durable).
    async fn flush(&mut self) -> Result<(), ParticipantServiceError> {
        let messages = self.participant.take_content();
        if messages.is_empty() {
            return Ok(());
        }
        let mut waiting: HashMap<CoId, KnownState> = HashMap::new();
        for msg in &messages {
            self.absorb_own(msg);
            if let SyncMessage::Content(c) = msg {
                waiting.insert(c.id.clone(), self.known_of(&c.id));
            }
        }
        self.send(&messages).await?;
        while let Some(about) = waiting.keys().next().cloned() {
            for msg in self.next(&about).await? {
                if let SyncMessage::Known(k) = &msg {
                    if let Some(want) = waiting.get(&k.state.id) {
                        if want.missing_in(&k.state).is_empty() {
                            waiting.remove(&k.state.id);
                        } else if k.is_correction {
                            return Err(ParticipantServiceError::SessionClosed(format!(
                                "the relay did not accept the server's content for {}",
                                k.state.id
                            )));
                        }
                    }
                } else {
                    self.absorb(&msg)?;
                }
            }
        }
        Ok(())
    }

    /// Records what we are about to send as held.
    fn absorb_own(&mut self, msg: &SyncMessage) {
        if let SyncMessage::Content(c) = msg {
            if let Some(h) = &c.header {
                self.headers.entry(c.id.clone()).or_insert_with(|| h.clone());
            }
            let entry = self.known.entry(c.id.clone()).or_insert_with(|| KnownState::empty(c.id.clone()));
            entry.header |= c.header.is_some();
            for (key, s) in &c.new {
                if let Ok(session) = crate::ids::SessionId::parse(key) {
                    entry.raise(&session, s.after + s.new_transactions.len() as u64);
                }
            }
        }
    }
}
