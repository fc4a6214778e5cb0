//! Incoming `content` (cojson's `handleNewContent`, server side).
//!
//! Order of checks, each of which may park the message and resume it later
//! from the top (so a resumed message sees the state as it is then):
//! 1. the CoValue must be resolved: in memory, or known to be absent from
//!    storage (a `Load` is issued first — it may have been evicted, or be
//!    only a shell whose known state answered a lazy `load`);
//! 2. unknown CoValue without header → `known {isCorrection, header:false}`;
//!    an invalid header (or ID mismatch) → nothing, as cojson (probe);
//! 3. dependencies (owner group, branch source, author accounts, group
//!    members) must be present. A missing one is loaded from storage, else
//!    requested from the sender with `load {header:false}`. If the sender
//!    answers it does not have it, we stop waiting: verification then
//!    rejects sessions whose author account is unknown, and other missing
//!    dependencies only mean they cannot be sent first. (cojson would wait
//!    forever.) Dependency cycles between parked CoValues do not block;
//! 4. verification ([`crate::verify::verify_content`]); nothing is applied
//!    before it. Rejected sessions mark the CoValue errored for the sender;
//!    accepted sessions of the same message are kept (cojson semantics);
//! 5. apply, `Persist`, and the reply: `known` (a correction if a session
//!    had a gap) once the write is durable;
//! 6. fan-out to every subscribed peer (the sender gets only what it lacks),
//!    once the write is durable (`Relay::on_persisted`).

use super::slot::{Job, PendingAck, Residence, Resident};
use super::{Diagnostic, PeerId, Relay, Slot, SlotGroups, SlotHeaders};
use crate::covalue::CoValueState;
use crate::dependencies::{content_dependencies, covalue_dependencies, session_content_dependencies};
use crate::durable::Durable;
use crate::header::Header;
use crate::ids::CoId;
use crate::known_state::KnownState;
use crate::message::{ContentMessage, SyncMessage};
use crate::persistence::{persist_request, PersistToken};
use crate::verify::{verify_content, ContentError};
use std::collections::{BTreeSet, HashSet, VecDeque};

use super::Action;

enum Deps {
    Ready,
    WaitOn(CoId),
}

impl Relay {
    pub(super) fn process_content(&mut self, peer: PeerId, msg: ContentMessage) {
        let id = msg.id.clone();
        if self.peers.get(&peer).is_none_or(|p| p.errored.contains(&id)) {
            return;
        }
        // 1. Resolve the CoValue itself.
        let slot = self.slots.entry(id.clone()).or_default();
        let header: Header = match &slot.residence {
            // A shell (stored known state only) is loaded whole: content is
            // verified against, and applied to, the whole CoValue.
            Residence::Unknown | Residence::LoadingKnown | Residence::Shell(_) | Residence::Loading => {
                self.request_load(&id);
                self.park(&id, Job::Content { peer, msg });
                return;
            }
            Residence::InMemory(r) => r.state.header.clone(),
            Residence::Absent => {
                // 2. Unknown here: it must come with a valid header.
                let Some(raw) = &msg.header else {
                    self.send_known(peer, KnownState::empty(id), true);
                    return;
                };
                match Header::validate(&id, raw) {
                    Ok(h) => h,
                    Err(error) => {
                        self.diagnostic(Diagnostic::InvalidHeader { peer, id, error });
                        return;
                    }
                }
            }
        };

        // 3. Dependencies.
        let deps = content_dependencies(&header, &msg.new);
        if let Deps::WaitOn(on) = self.resolve_dependencies(peer, &id, &deps) {
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.pending_deps = deps;
            }
            self.park(&on, Job::Content { peer, msg });
            return;
        }
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.pending_deps.clear();
        }

        // 4. Verify against the current state; nothing changes yet.
        let existing = self.slots.get(&id).and_then(Slot::resident).map(|r| &r.state);
        let verdict = match verify_content(existing, &msg, &SlotHeaders(&self.slots), &SlotGroups(&self.slots)) {
            Ok(v) => v,
            Err(ContentError::HeaderMissing) => {
                self.send_known(peer, KnownState::empty(id), true);
                return;
            }
            Err(ContentError::Header(error)) => {
                self.diagnostic(Diagnostic::InvalidHeader { peer, id, error });
                return;
            }
        };
        let gap = verdict.gap;
        let rejected = verdict.rejected.clone();
        let mut sender_state = KnownState::empty(id.clone());
        sender_state.header = msg.header.is_some();
        for a in &verdict.accepted {
            sender_state.raise(&a.session, a.after.saturating_add(a.transactions.len() as u64));
        }

        // 5. Apply and persist.
        let (applied_any, header_installed, deleted) = self.apply_verdict(&id, verdict);
        let Some(slot) = self.slots.get_mut(&id) else { return };
        let Some(r) = slot.resident_mut() else {
            // Header rejected by apply (cannot happen after validation) and
            // nothing applied: answer like an unknown CoValue.
            self.send_known(peer, KnownState::empty(id), true);
            return;
        };
        // The ack waits for every write of this CoValue issued so far.
        let wait_for = r.newest_pending();
        if let Some(after) = wait_for {
            r.acks.push(PendingAck { after, peer, correction: gap });
        }

        let full_msg_state = deleted.then(|| content_known_state(&msg));
        if let Some(entry) = self.peer_known(peer, &id) {
            entry.combine(full_msg_state.as_ref().unwrap_or(&sender_state));
        }
        for (session, error) in rejected.iter().cloned() {
            self.diagnostic(Diagnostic::RejectedSession { peer, id: id.clone(), session, error });
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            if !rejected.is_empty() {
                p.errored.insert(id.clone());
            }
            p.told_known.insert(id.clone());
            if wait_for.is_some() {
                p.awaiting_ack.insert(id.clone());
            }
        }
        if wait_for.is_none() {
            self.send_ack(peer, &id, gap);
        }
        if header_installed {
            self.wake(&id);
        }
        self.reconcile_settled(peer, &id);

        // 6. Fan-out happens once the write is durable (`on_persisted`): every write issued
        // here answers with `Persisted` or `PersistFailed`.
        let _ = applied_any;
    }

    /// Commits a verdict (installing the CoValue if new), updates cached
    /// dependencies and issues the write. Returns (anything applied, header
    /// installed, CoValue deleted).
    fn apply_verdict(&mut self, id: &CoId, verdict: crate::verify::ContentVerdict) -> (bool, bool, bool) {
        self.content_memo = None;
        let Some(slot) = self.slots.get_mut(id) else { return (false, false, false) };
        let applied = match &mut slot.residence {
            Residence::InMemory(r) => r.state.apply_verdict(verdict),
            _ => {
                let mut fresh: Option<CoValueState> = None;
                let applied = CoValueState::apply(&mut fresh, verdict);
                if let Some(state) = fresh {
                    let deps = covalue_dependencies(&state);
                    let durable = Durable::default();
                    slot.residence = Residence::InMemory(Box::new(Resident {
                        state,
                        deps,
                        durable,
                        pending: VecDeque::new(),
                        acks: Vec::new(),
                    }));
                }
                applied
            }
        };
        let Some(r) = slot.resident_mut() else { return (false, false, false) };
        let anything = applied.header_installed || !applied.sessions.is_empty();
        if anything {
            for (session, before, after) in &applied.sessions {
                let txs = r.state.sessions.get(session).and_then(|log| {
                    log.transactions.get(usize::try_from(*before).ok()?..usize::try_from(*after).ok()?)
                });
                session_content_dependencies(&r.state.header, session, txs.unwrap_or(&[]), &mut r.deps);
            }
            r.deps.remove(id);
            let token = PersistToken(self.next_token);
            self.next_token += 1;
            // What this write makes durable, with the signature valid at each new count (the
            // incoming message's, just applied), so exactly that much can be sent later.
            let mut written = Durable { header: true, ..Durable::default() };
            for (session, _, after) in &applied.sessions {
                if let Some(log) = r.state.sessions.get(session) {
                    let signature = if log.count() == *after { log.last_signature } else { continue };
                    written.sessions.insert(session.clone(), (*after, signature));
                }
            }
            r.pending.push_back((token, false, written));
            let req = persist_request(
                token,
                &r.state,
                applied.header_installed,
                &applied.sessions,
                applied.deleted_now,
                &applied.erased,
            );
            self.tokens.insert(token, id.clone());
            self.out.push(Action::Persist(req));
        }
        (anything, applied.header_installed, r.state.deleted)
    }

    /// Step 3: are all dependencies of incoming content resolved?
    fn resolve_dependencies(&mut self, peer: PeerId, id: &CoId, deps: &BTreeSet<CoId>) -> Deps {
        // Park on a dependency storage is still resolving if there is one:
        // its answer needs nothing from the peer, and once it comes every
        // dependency still absent gets requested from the peer together.
        let mut wait_on: Option<CoId> = None;
        let mut wait_on_storage: Option<CoId> = None;
        for dep in deps {
            if self.waits_for(dep, id) {
                continue; // a cycle between parked CoValues: do not deadlock
            }
            let residence = self.slots.get(dep).map(|s| &s.residence);
            match residence {
                Some(Residence::InMemory(_)) => continue,
                None | Some(Residence::Unknown) | Some(Residence::Shell(_)) => {
                    self.request_load(dep);
                    wait_on_storage.get_or_insert_with(|| dep.clone());
                }
                Some(Residence::Loading) | Some(Residence::LoadingKnown) => {
                    wait_on_storage.get_or_insert_with(|| dep.clone());
                }
                Some(Residence::Absent) => {
                    let Some(p) = self.peers.get_mut(&peer) else { return Deps::Ready };
                    if p.not_found.contains(dep) {
                        continue;
                    }
                    if p.requested.insert(dep.clone()) {
                        self.send(peer, SyncMessage::Load(KnownState::empty(dep.clone()), Default::default()));
                    }
                }
            }
            wait_on.get_or_insert_with(|| dep.clone());
        }
        match wait_on_storage.or(wait_on) {
            Some(on) => Deps::WaitOn(on),
            None => Deps::Ready,
        }
    }

    /// Whether parked content of `from` (transitively) waits for `target`.
    fn waits_for(&self, from: &CoId, target: &CoId) -> bool {
        let mut stack = vec![from];
        let mut seen: HashSet<&CoId> = HashSet::new();
        while let Some(node) = stack.pop() {
            if !seen.insert(node) {
                continue;
            }
            let Some(slot) = self.slots.get(node) else { continue };
            if slot.resident().is_some() {
                continue;
            }
            for dep in &slot.pending_deps {
                if dep == target {
                    return true;
                }
                stack.push(dep);
            }
        }
        false
    }
}

/// `knownStateFromContent`: what the sender has after this message.
fn content_known_state(msg: &ContentMessage) -> KnownState {
    let mut state = KnownState::empty(msg.id.clone());
    state.header = msg.header.is_some();
    for (key, entry) in &msg.new {
        if let Ok(session) = crate::ids::SessionId::parse(key) {
            state.raise(&session, entry.after.saturating_add(entry.new_transactions.len() as u64));
        }
    }
    state
}
