//! Finding the secret of a group's read key as one account (`getUncachedReadKey`): public keys,
//! keys sealed to us, key-for-key chains and keys revealed to parent groups
//! (docs/protocols/cojson-participant.md §7).
//!
//! A [`Reader`] is one account's view over the CoValues a node holds, for one operation: it
//! builds the groups it needs once ([`GroupCache`]) and remembers every key it found or failed to
//! find. A key asked for while it is being looked up (a cycle of key-for-key entries) gives
//! nothing on that path, and so does a chain of key-for-key entries longer than
//! [`MAX_KEY_CHAIN`] (a hostile group must not exhaust the stack).

use super::cipher::decrypt_key_secret;
use super::encoding::{tx_nonce_material, KeyId, KeySecret};
use super::group_view::{GroupCache, GroupView};
use super::seal::{group_sealer_from_read_key, unseal_for_group, unseal_key_secret};
use super::store::Store;
use crate::crypto::{SealerId, SealerSecret};
use crate::ids::{AgentId, CoId};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

/// How many key lookups may be nested (a key opened by a key opened by …).
pub const MAX_KEY_CHAIN: usize = 128;

/// One account reading: who it is, and what it has found so far.
pub struct Reader<'a> {
    pub store: &'a Store,
    pub groups: GroupCache<'a>,
    pub account: &'a CoId,
    pub agent: &'a AgentId,
    sealer: &'a SealerSecret,
    found: RefCell<HashMap<(CoId, String), Option<KeySecret>>>,
    looking: RefCell<HashSet<(CoId, String)>>,
}

/// JavaScript truthiness of a field value (`if (value)`).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        _ => true,
    }
}

impl<'a> Reader<'a> {
    pub fn new(store: &'a Store, account: &'a CoId, agent: &'a AgentId, sealer: &'a SealerSecret) -> Self {
        Reader {
            store,
            groups: GroupCache::new(store),
            account,
            agent,
            sealer,
            found: RefCell::new(HashMap::new()),
            looking: RefCell::new(HashSet::new()),
        }
    }

    /// The agent that signs for `author` (an agent ID, or an account whose header is held here).
    pub fn agent_of(&self, author: &str) -> Option<AgentId> {
        if let Ok(agent) = AgentId::parse(author) {
            return Some(agent);
        }
        self.store.header(&CoId::parse(author).ok()?)?.account_agent()
    }

    /// The sealer (X25519 public key) of `author`'s agent.
    pub fn sealer_of(&self, author: &str) -> Option<SealerId> {
        SealerId::parse(self.agent_of(author)?.sealer_part()).ok()
    }

    /// Who we are in `group`: our agent in our own account, our account everywhere else.
    pub fn member_key_in(&self, group: &CoId) -> &str {
        if group == self.account {
            self.agent.as_str()
        } else {
            self.account.as_str()
        }
    }

    /// The group's current read key (`readKey`) and its secret, if we can get it.
    pub fn current_read_key(&self, group: &CoId) -> Option<(KeyId, KeySecret)> {
        let view = self.groups.view(group)?;
        let id = KeyId::parse(view.get_str("readKey")?).ok()?;
        let secret = self.read_key(group, id.as_str())?;
        Some((id, secret))
    }

    /// The secret of key `key_id` of `group` (§7, lookup order).
    pub fn read_key(&self, group: &CoId, key_id: &str) -> Option<KeySecret> {
        let slot = (group.clone(), key_id.to_string());
        if let Some(found) = self.found.borrow().get(&slot) {
            return found.clone();
        }
        {
            let mut looking = self.looking.borrow_mut();
            if looking.len() >= MAX_KEY_CHAIN || !looking.insert(slot.clone()) {
                return None; // too deep, or already being looked up further up this path
            }
        }
        let view = self.groups.view(group);
        let result = view.and_then(|v| self.look_up(&v, key_id));
        self.looking.borrow_mut().remove(&slot);
        self.found.borrow_mut().insert(slot, result.clone());
        result
    }

    fn look_up(&self, view: &GroupView, key_id: &str) -> Option<KeySecret> {
        // 1. Public: if present, it decides.
        if let Some(op) = view.get(&format!("{key_id}_for_everyone"), None) {
            if truthy(&op.value) {
                return op.value_str().and_then(|s| KeySecret::parse(s).ok());
            }
        }
        // 2. Sealed to us, by whoever wrote the reveal.
        if let Some(secret) = self.unseal_for_me(view, key_id) {
            return Some(secret);
        }
        let id = KeyId::parse(key_id).ok()?;
        // 3. Encrypted with another key of this group.
        for encrypting in view.revealed_by(key_id) {
            if let Some(secret) = self.key_for_key(view, &id, encrypting, &view.id) {
                return Some(secret);
            }
        }
        // 4. Revealed to a parent group: under one of its keys, or sealed to its group sealer.
        for parent in view.all_parents() {
            let Some(parent_view) = self.groups.view(parent) else { continue };
            for encrypting in view.revealed_by(key_id) {
                if let Some(secret) = self.key_for_key(view, &id, encrypting, parent) {
                    return Some(secret);
                }
            }
            if let Some(secret) = self.unseal_via_group_sealer(view, key_id, &parent_view) {
                return Some(secret);
            }
        }
        None
    }

    fn unseal_for_me(&self, view: &GroupView, key_id: &str) -> Option<KeySecret> {
        let op = view.get(&format!("{key_id}_for_{}", self.member_key_in(&view.id)), None)?;
        let sealed = op.value_str().filter(|s| !s.is_empty())?;
        // The revealer is the author of this edit, not necessarily the group's creator (§11).
        let revealer = self.sealer_of(op.author())?;
        let material = tx_nonce_material(&view.id, &op.session, op.index);
        unseal_key_secret(sealed, self.sealer, &revealer, &material).ok()
    }

    /// `<key>_for_<encrypting>` in `view`, with the encrypting key taken from `holder` (this
    /// group or a parent).
    fn key_for_key(&self, view: &GroupView, id: &KeyId, encrypting: &str, holder: &CoId) -> Option<KeySecret> {
        let encrypting_secret = self.read_key(holder, encrypting)?;
        let encrypted = view.get_str(&format!("{id}_for_{encrypting}"))?;
        let encrypting = KeyId::parse(encrypting).ok()?;
        decrypt_key_secret(id, &encrypting, encrypted, &encrypting_secret).ok()
    }

    /// `tryDecryptWithGroupSealer`: each of the parent's group sealers, newest first.
    fn unseal_via_group_sealer(&self, view: &GroupView, key_id: &str, parent: &GroupView) -> Option<KeySecret> {
        for op in parent.history("groupSealer").rev() {
            let Some(value) = op.value_str().filter(|s| !s.is_empty()) else { continue };
            let (read_key_id, sealer_id) = match value.find('@') {
                Some(i) if i > 0 => (Some(&value[..i]), &value[i + 1..]),
                _ => (None, value),
            };
            let Some(edit) = view.get(&format!("{key_id}_sealedFor_{sealer_id}"), None) else { continue };
            let Some(sealed) = edit.value_str().filter(|s| !s.is_empty()) else { continue };
            let Some(read_key_id) = read_key_id else { continue };
            let Some(parent_secret) = self.read_key(&parent.id, read_key_id) else { continue };
            let (group_sealer, _) = group_sealer_from_read_key(&parent_secret);
            let material = tx_nonce_material(&view.id, &edit.session, edit.index);
            if let Ok(Value::String(s)) = unseal_for_group(sealed, &group_sealer, &material) {
                if let Ok(secret) = KeySecret::parse(&s) {
                    return Some(secret);
                }
            }
        }
        None
    }
}
