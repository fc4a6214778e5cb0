//! A group (or account) as a cojson client sees it: which of its transactions are valid, its
//! value at any time, its parent links and the roles of members, including roles inherited from
//! parent groups (docs/protocols/cojson-participant.md §9.1–§9.3).
//!
//! This is the full reader's rule set, unlike the relay's deliberately conservative
//! `group_roles` (which only answers "admin at `madeAt`?" for deletes). The participant needs it
//! to know its own role, to find read keys, and to decide which CoMap transactions count.
//!
//! Groups refer to parent groups, which are evaluated through a [`GroupCache`]: each group is
//! built once per cache and each role asked once, so a wide graph of parents costs linear work;
//! a group asked for while it is being built (a cycle), or anything beyond [`MAX_GROUP_DEPTH`]
//! nested evaluations, counts as not available, so hostile parent chains cannot exhaust the
//! stack.

use crate::covalue::CoValueState;
use crate::group_roles::{CoValueLookup, Role};
use crate::header::Ruleset;
use crate::ids::{AgentId, CoId, SessionId};
use crate::transaction_hash::canonical_transaction;
use serde_json::{Map, Value};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use super::changes::parse_changes;

/// How many evaluations (a group being built, a role being asked through parents) may be nested;
/// deeper ones give nothing.
pub const MAX_GROUP_DEPTH: usize = 32;

/// One transaction of a CoValue in reading order.
pub struct OrderedTx<'a> {
    pub session: &'a SessionId,
    pub index: u64,
    pub made_at: u64,
    pub tx: &'a Value,
}

/// `madeAt` of a stored (verified) transaction, as clients read it.
pub fn tx_made_at(tx: &Value) -> Option<u64> {
    tx.get("madeAt").and_then(Value::as_u64).or_else(|| canonical_transaction(tx).ok().map(|c| c.made_at))
}

/// A CoValue's transactions sorted by `madeAt`; within a session by index. The sort is stable
/// over session order, so equal `madeAt` across sessions keeps session-ID order (§9.1).
pub fn ordered_transactions(state: &CoValueState) -> Vec<OrderedTx<'_>> {
    let mut out = Vec::new();
    for (session, log) in &state.sessions {
        for (index, tx) in log.transactions.iter().enumerate() {
            // Verified transactions always have a `madeAt`; skip rather than guess otherwise.
            let Some(made_at) = tx_made_at(tx) else { continue };
            out.push(OrderedTx { session, index: index as u64, made_at, tx });
        }
    }
    out.sort_by_key(|t| t.made_at);
    out
}

/// A trusting transaction's parsed `changes`; `None` for private or unparseable ones.
pub fn trusting_changes(tx: &Value) -> Option<Vec<Value>> {
    if tx.get("privacy")?.as_str()? != "trusting" {
        return None;
    }
    parse_changes(tx.get("changes")?.as_str()?.as_bytes())
}

/// One valid `set` of a group.
#[derive(Debug, Clone)]
pub struct GroupOp {
    pub session: SessionId,
    pub index: u64,
    pub made_at: u64,
    pub key: String,
    pub value: Value,
}

impl GroupOp {
    /// The session author: an account ID or agent ID.
    pub fn author(&self) -> &str {
        self.session.author_str()
    }

    pub fn value_str(&self) -> Option<&str> {
        self.value.as_str()
    }
}

/// How a parent group's members count in the child (`parent_<id>` values other than `revoked`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParentRole {
    Extend,
    Fixed(Role),
}

fn parent_role(value: &str) -> Option<ParentRole> {
    match value {
        "extend" => Some(ParentRole::Extend),
        "reader" => Some(ParentRole::Fixed(Role::Reader)),
        "writer" => Some(ParentRole::Fixed(Role::Writer)),
        "manager" => Some(ParentRole::Fixed(Role::Manager)),
        "admin" => Some(ParentRole::Fixed(Role::Admin)),
        _ => None,
    }
}

/// `isInheritableRole`.
fn inheritable(role: Role) -> bool {
    matches!(role, Role::Revoked | Role::Admin | Role::Manager | Role::Writer | Role::Reader)
}

/// `isMorePermissiveAndShouldInherit(parent, child)`: reading roles.
fn should_inherit(parent: Role, child: Option<Role>) -> bool {
    match parent {
        Role::Revoked => true,
        Role::Manager => !matches!(child, Some(Role::Manager | Role::Admin)),
        Role::Admin => child != Some(Role::Admin),
        Role::Writer => matches!(child, None | Some(Role::Reader | Role::WriteOnly)),
        Role::Reader => child.is_none(),
        _ => false,
    }
}

/// `isHigherRole(a, b)`: validating group transactions.
fn is_higher(a: Role, b: Option<Role>) -> bool {
    if a == Role::Revoked {
        return false;
    }
    match b {
        None | Some(Role::Revoked) => true,
        Some(Role::Admin) => false,
        _ if a == Role::Admin => true,
        Some(Role::Manager) => false,
        _ if a == Role::Manager => true,
        Some(b) => a == Role::Writer && b == Role::Reader,
    }
}

fn can_admin(role: Option<Role>) -> bool {
    matches!(role, Some(Role::Admin | Role::Manager))
}

/// `key_…_for_key…`.
fn is_key_for_key(key: &str) -> bool {
    key.starts_with("key_") && key.contains("_for_key")
}

/// `key_…_for_sealer…`, `key_…_for_co…`, `…_for_everyone`.
fn is_key_for_member(key: &str) -> bool {
    (key.starts_with("key_") && (key.contains("_for_sealer") || key.contains("_for_co")))
        || key.contains("_for_everyone")
}

/// `key_…_sealedFor_sealer…`.
fn is_key_sealed_for_group(key: &str) -> bool {
    key.starts_with("key_") && key.contains("_sealedFor_sealer")
}

/// Roles as validation sees them while folding the group: direct roles as written, and the
/// parent links in force so far (`MemberRoleResolver`).
#[derive(Default)]
struct Resolver {
    direct: HashMap<String, Role>,
    parents: Vec<(CoId, ParentRole)>,
}

impl Resolver {
    fn role_at(&self, cache: &GroupCache<'_>, member: &str, at: u64) -> Option<Role> {
        let mut role = self.direct.get(member).copied();
        for (parent, mapping) in &self.parents {
            let Some(view) = cache.view(parent) else { continue };
            let Some(parent_role) = view.role_at(cache, member, Some(at)) else { continue };
            if !inheritable(parent_role) {
                continue;
            }
            let resolved = match mapping {
                ParentRole::Extend => parent_role,
                ParentRole::Fixed(r) => *r,
            };
            if is_higher(resolved, role) {
                role = Some(resolved);
            }
        }
        role
    }

    fn set_parent(&mut self, parent: CoId, mapping: Option<ParentRole>) {
        self.parents.retain(|(p, _)| *p != parent);
        if let Some(m) = mapping {
            self.parents.push((parent, m));
        }
    }
}

/// A group's valid transactions and what follows from them.
pub struct GroupView {
    pub id: CoId,
    /// The account's agent, when this is an account.
    account_agent: Option<AgentId>,
    ops: Vec<GroupOp>,
    /// Indices into `ops` per key, in reading order.
    by_key: HashMap<String, Vec<usize>>,
    /// Keys in the order they first appeared.
    key_order: Vec<String>,
    /// `parent_<id>` history per parent, in order of first appearance: `(madeAt, value)`.
    parents: Vec<(CoId, Vec<(u64, String)>)>,
    /// `key_A_for_key_B` entries: A → every B.
    key_revelations: HashMap<String, Vec<String>>,
}

impl GroupView {
    fn new(state: &CoValueState) -> Self {
        GroupView {
            id: state.header.id.clone(),
            account_agent: state.header.account_agent(),
            ops: Vec::new(),
            by_key: HashMap::new(),
            key_order: Vec::new(),
            parents: Vec::new(),
            key_revelations: HashMap::new(),
        }
    }

    pub fn is_account(&self) -> bool {
        self.account_agent.is_some()
    }

    pub fn account_agent(&self) -> Option<&AgentId> {
        self.account_agent.as_ref()
    }

    /// The last valid `set` of `key` made at or before `at` (all of them for `None`).
    pub fn get(&self, key: &str, at: Option<u64>) -> Option<&GroupOp> {
        let indices = self.by_key.get(key)?;
        indices.iter().rev().map(|i| &self.ops[*i]).find(|op| at.is_none_or(|t| op.made_at <= t))
    }

    /// The current value of `key` as a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key, None).and_then(GroupOp::value_str)
    }

    /// Every valid `set` of `key`, oldest first.
    pub fn history(&self, key: &str) -> impl DoubleEndedIterator<Item = &GroupOp> {
        self.by_key.get(key).into_iter().flatten().map(|i| &self.ops[*i])
    }

    /// Key-for-key entries that encrypt `key_id`: the encrypting key IDs.
    pub fn revealed_by(&self, key_id: &str) -> &[String] {
        self.key_revelations.get(key_id).map_or(&[], Vec::as_slice)
    }

    /// Every parent group ever linked (revoked ones too: their key entries still open keys).
    pub fn all_parents(&self) -> impl Iterator<Item = &CoId> {
        self.parents.iter().map(|(p, _)| p)
    }

    /// Parents linked at `at` (now for `None`) with a link other than `revoked`.
    pub fn parents_at(&self, at: Option<u64>) -> Vec<(&CoId, &str)> {
        let mut out = Vec::new();
        for (parent, history) in &self.parents {
            let latest = history.iter().rev().find(|(t, _)| at.is_none_or(|a| *t <= a));
            if let Some((_, value)) = latest {
                if value != "revoked" {
                    out.push((parent, value.as_str()));
                }
            }
        }
        out
    }

    /// Member keys (`co_…` accounts and agent IDs) in order of first appearance.
    pub fn member_keys(&self) -> impl Iterator<Item = &str> {
        self.key_order.iter().map(String::as_str).filter(|k| k.starts_with("co_") || AgentId::parse(k).is_ok())
    }

    /// The group's value: every key's latest valid value, in order of first appearance.
    pub fn value(&self) -> Map<String, Value> {
        self.key_order.iter().filter_map(|k| Some((k.clone(), self.get(k, None)?.value.clone()))).collect()
    }

    /// `roleOfInternal`: `member`'s role in this group as of `at` (now for `None`), §9.3.
    pub fn role_at(&self, cache: &GroupCache<'_>, member: &str, at: Option<u64>) -> Option<Role> {
        if self.is_account() && member == self.id.as_str() {
            return Some(Role::Admin);
        }
        let slot = (self.id.clone(), member.to_string(), at);
        if let Some(known) = cache.roles.borrow().get(&slot) {
            return *known;
        }
        let role = {
            let _nested = cache.enter()?;
            self.uncached_role_at(cache, member, at)
        };
        cache.roles.borrow_mut().insert(slot, role);
        role
    }

    /// Whether `author` (a session author) may write a CoValue this group owns at `made_at`
    /// (§9.4). A transaction by the owner account itself counts as its agent's.
    pub fn may_write(&self, cache: &GroupCache<'_>, author: &str, made_at: u64) -> bool {
        let effective = match self.account_agent() {
            Some(agent) if author == self.id.as_str() => agent.as_str(),
            _ => author,
        };
        matches!(
            self.role_at(cache, effective, Some(made_at)),
            Some(Role::Admin | Role::Manager | Role::Writer | Role::WriteOnly)
        )
    }

    fn uncached_role_at(&self, cache: &GroupCache<'_>, member: &str, at: Option<u64>) -> Option<Role> {
        let mut role =
            self.get(member, at).and_then(GroupOp::value_str).and_then(Role::parse).filter(|r| *r != Role::Revoked);
        for (parent, mapping) in self.parents_at(at) {
            let Some(view) = cache.view(parent) else { continue };
            let Some(inherited) = view.role_at(cache, member, at) else { continue };
            if !inheritable(inherited) {
                continue;
            }
            let to_inherit = match parent_role(mapping) {
                Some(ParentRole::Extend) => inherited,
                Some(ParentRole::Fixed(r)) => r,
                None => continue,
            };
            if should_inherit(to_inherit, role) {
                role = Some(to_inherit);
            }
        }
        if role.is_none() && member != "everyone" {
            let everyone = self.get("everyone", at).and_then(GroupOp::value_str).and_then(Role::parse);
            if let Some(r) = everyone.filter(|r| *r != Role::Revoked) {
                return Some(r);
            }
        }
        role
    }

    fn push(&mut self, op: GroupOp) {
        let i = self.ops.len();
        if let Some(parent) = op.key.strip_prefix("parent_") {
            if let (Ok(parent), Some(value)) = (CoId::parse(parent), op.value_str()) {
                match self.parents.iter_mut().find(|(p, _)| *p == parent) {
                    Some((_, history)) => history.push((op.made_at, value.to_string())),
                    None => self.parents.push((parent, vec![(op.made_at, value.to_string())])),
                }
            }
        } else if is_key_for_key(&op.key) {
            let parts: Vec<&str> = op.key.split("_for_").collect();
            if let [encrypted, encrypting] = parts.as_slice() {
                let set = self.key_revelations.entry((*encrypted).to_string()).or_default();
                if !set.iter().any(|k| k == encrypting) {
                    set.push((*encrypting).to_string());
                }
            }
        }
        match self.by_key.get_mut(&op.key) {
            Some(v) => v.push(i),
            None => {
                self.key_order.push(op.key.clone());
                self.by_key.insert(op.key.clone(), vec![i]);
            }
        }
        self.ops.push(op);
    }

    /// `determineValidTransactionsForGroup` (§9.2): folds the group's transactions in order.
    fn build(cache: &GroupCache<'_>, state: &CoValueState, initial_admin: &str) -> GroupView {
        let mut view = GroupView::new(state);
        let mut resolver = Resolver::default();
        let mut write_only_keys: HashMap<String, String> = HashMap::new();
        let mut write_keys: HashSet<String> = HashSet::new();
        for t in ordered_transactions(state) {
            let author = t.session.author_str();
            let role = resolver.role_at(cache, author, t.made_at);
            // Private transactions are invalid in groups; in accounts they are admin-only and
            // unreadable without the key they would reveal, so they never count here.
            let Some(changes) = trusting_changes(t.tx) else { continue };
            let [change] = changes.as_slice() else { continue };
            if change.get("op").and_then(Value::as_str) != Some("set") {
                continue;
            }
            let Some(key) = change.get("key").and_then(Value::as_str) else { continue };
            let value = change.get("value").cloned().unwrap_or(Value::Null);
            let valid = match key {
                "readKey" | "groupSealer" | "profile" | "root" => can_admin(role),
                _ if is_key_for_key(key) || is_key_for_member(key) || is_key_sealed_for_group(key) => {
                    matches!(
                        role,
                        Some(
                            Role::Admin
                                | Role::AdminInvite
                                | Role::Manager
                                | Role::ManagerInvite
                                | Role::WriterInvite
                                | Role::ReaderInvite
                                | Role::WriteOnlyInvite
                        )
                    ) || own_write_key_revelation(key, author, &write_only_keys)
                }
                _ if key.starts_with("parent_") => {
                    validate_parent(cache, &view, &mut resolver, role, key, value.as_str())
                }
                _ if key.starts_with("child_") => false,
                _ if key.starts_with("writeKeyFor_") => {
                    let member = &key["writeKeyFor_".len()..];
                    if !matches!(role, Some(Role::Admin | Role::Manager | Role::WriteOnlyInvite)) && member != author {
                        false
                    } else {
                        if let Some(v) = value.as_str() {
                            write_only_keys.insert(member.to_string(), v.to_string());
                        }
                        let overrides = write_keys.contains(key) && !can_admin(role);
                        write_keys.insert(key.to_string());
                        !overrides
                    }
                }
                _ => {
                    let assigned = value.as_str().and_then(Role::parse);
                    match assigned {
                        Some(assigned) => {
                            let valid = role_assignment_valid(
                                cache,
                                &resolver,
                                (author, role),
                                (key, assigned),
                                initial_admin,
                                t.made_at,
                            );
                            if valid {
                                resolver.direct.insert(key.to_string(), assigned);
                            }
                            valid
                        }
                        None => false,
                    }
                }
            };
            if valid {
                view.push(GroupOp {
                    session: t.session.clone(),
                    index: t.index,
                    made_at: t.made_at,
                    key: key.to_string(),
                    value,
                });
            }
        }
        view
    }
}

/// `isOwnWriteKeyRevelation`: the revealed key is the author's own write key.
fn own_write_key_revelation(key: &str, author: &str, write_only_keys: &HashMap<String, String>) -> bool {
    let at = key.find("_for_").or_else(|| key.find("_sealedFor_"));
    let Some(at) = at.filter(|i| *i > 0) else { return false };
    write_only_keys.get(author).is_some_and(|k| k == &key[..at])
}

/// A `parent_<id>` set: admin or manager, a group that is available here, no cycle back to this
/// group. Updates the links validation uses.
fn validate_parent(
    cache: &GroupCache<'_>,
    this: &GroupView,
    resolver: &mut Resolver,
    role: Option<Role>,
    key: &str,
    value: Option<&str>,
) -> bool {
    if !can_admin(role) {
        return false;
    }
    let Ok(parent) = CoId::parse(&key["parent_".len()..]) else { return false };
    // The client requires the parent to be loaded; one this node does not hold is not honoured.
    let Some(parent_view) = cache.view(&parent) else { return false };
    if is_self_extension(cache, &this.id, &parent_view) {
        return false;
    }
    match value {
        Some("revoked") => resolver.set_parent(parent, None),
        Some(v) => match parent_role(v) {
            Some(mapping) => resolver.set_parent(parent, Some(mapping)),
            None => return false,
        },
        None => return false,
    }
    true
}

/// `isSelfExtension`: does following `parent`'s current parent links lead back to `this`?
fn is_self_extension(cache: &GroupCache<'_>, this: &CoId, parent: &GroupView) -> bool {
    if parent.id == *this {
        return true;
    }
    let mut seen: HashSet<CoId> = HashSet::from([parent.id.clone()]);
    let mut queue: Vec<CoId> = parent.parents_at(None).into_iter().map(|(p, _)| p.clone()).collect();
    while let Some(id) = queue.pop() {
        if id == *this {
            return true;
        }
        if !seen.insert(id.clone()) || seen.len() > 4 * MAX_GROUP_DEPTH {
            continue;
        }
        if let Some(view) = cache.view(&id) {
            queue.extend(view.parents_at(None).into_iter().map(|(p, _)| p.clone()));
        }
    }
    false
}

/// A role assignment (§9.2).
fn role_assignment_valid(
    cache: &GroupCache<'_>,
    resolver: &Resolver,
    (author, role): (&str, Option<Role>),
    (member, assigned): (&str, Role),
    initial_admin: &str,
    made_at: u64,
) -> bool {
    if member == "everyone" && !matches!(assigned, Role::Reader | Role::Writer | Role::WriteOnly | Role::Revoked) {
        return false;
    }
    // The creator making itself admin, or anyone leaving.
    if role.is_none() && author == initial_admin && member == author && assigned == Role::Admin {
        return true;
    }
    if author == member && assigned == Role::Revoked {
        return true;
    }
    let target = resolver.role_at(cache, member, made_at);
    match role {
        Some(Role::Admin) => !(target == Some(Role::Admin) && assigned != Role::Admin && member != author),
        Some(Role::Manager) => {
            target != Some(Role::Admin) && !matches!(assigned, Role::Admin | Role::AdminInvite | Role::ManagerInvite)
        }
        Some(Role::AdminInvite) => assigned == Role::Admin,
        Some(Role::ManagerInvite) => assigned == Role::Manager,
        Some(Role::WriterInvite) => assigned == Role::Writer,
        Some(Role::ReaderInvite) => assigned == Role::Reader,
        Some(Role::WriteOnlyInvite) => assigned == Role::WriteOnly,
        _ => false,
    }
}

/// A role question: group, member, as of when.
type RoleSlot = (CoId, String, Option<u64>);

/// Builds group views on demand, once each, over the CoValues a node holds, and remembers the
/// roles asked.
pub struct GroupCache<'a> {
    lookup: &'a dyn CoValueLookup,
    views: RefCell<HashMap<CoId, Option<Rc<GroupView>>>>,
    roles: RefCell<HashMap<RoleSlot, Option<Role>>>,
    building: RefCell<Vec<CoId>>,
    nesting: Cell<usize>,
}

/// One level of nested evaluation, given back when dropped.
pub struct Nested<'c>(&'c Cell<usize>);

impl Drop for Nested<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl<'a> GroupCache<'a> {
    pub fn new(lookup: &'a dyn CoValueLookup) -> Self {
        GroupCache {
            lookup,
            views: RefCell::new(HashMap::new()),
            roles: RefCell::new(HashMap::new()),
            building: RefCell::new(Vec::new()),
            nesting: Cell::new(0),
        }
    }

    /// Enters one more nested evaluation, or `None` beyond [`MAX_GROUP_DEPTH`].
    fn enter(&self) -> Option<Nested<'_>> {
        let n = self.nesting.get();
        if n >= MAX_GROUP_DEPTH {
            return None;
        }
        self.nesting.set(n + 1);
        Some(Nested(&self.nesting))
    }

    /// The group (or account) `id`, if it is held here and can be evaluated.
    pub fn view(&self, id: &CoId) -> Option<Rc<GroupView>> {
        if let Some(cached) = self.views.borrow().get(id) {
            return cached.clone();
        }
        if self.building.borrow().contains(id) {
            return None; // a cycle: not cached, the outer evaluation finishes this group
        }
        let state = self.lookup.state(id);
        let view = match state.map(|s| (s, &s.header.ruleset)) {
            Some((state, Ruleset::Group { initial_admin })) => {
                let _nested = self.enter()?; // too deep: not cached, a shallower path may build it
                self.building.borrow_mut().push(id.clone());
                let view = GroupView::build(self, state, initial_admin);
                self.building.borrow_mut().pop();
                Some(Rc::new(view))
            }
            _ => None,
        };
        self.views.borrow_mut().insert(id.clone(), view.clone());
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_orderings_follow_the_client() {
        assert!(is_higher(Role::Admin, Some(Role::Manager)));
        assert!(is_higher(Role::Reader, Some(Role::Revoked)));
        assert!(!is_higher(Role::Revoked, None));
        assert!(!is_higher(Role::Manager, Some(Role::Admin)));
        assert!(is_higher(Role::Writer, Some(Role::Reader)));
        assert!(!is_higher(Role::Writer, Some(Role::WriteOnly)));
        assert!(!is_higher(Role::Reader, Some(Role::Reader)));
        assert!(should_inherit(Role::Revoked, Some(Role::Admin)));
        assert!(should_inherit(Role::Writer, Some(Role::WriteOnly)));
        assert!(!should_inherit(Role::Reader, Some(Role::WriteOnly)));
    }

    #[test]
    fn field_kinds() {
        assert!(is_key_for_key("key_zA_for_key_zB"));
        assert!(is_key_for_member("key_zA_for_co_zX"));
        assert!(is_key_for_member("key_zA_for_sealer_zX/signer_zY"));
        assert!(is_key_for_member("key_zA_for_everyone"));
        assert!(is_key_sealed_for_group("key_zA_sealedFor_sealer_zX"));
        assert!(!is_key_for_member("readKey"));
        let mut w = HashMap::new();
        w.insert("co_zMe".to_string(), "key_zW".to_string());
        assert!(own_write_key_revelation("key_zW_for_co_zOther", "co_zMe", &w));
        assert!(!own_write_key_revelation("key_zV_for_co_zOther", "co_zMe", &w));
        assert!(!own_write_key_revelation("_for_x", "co_zMe", &w));
    }
}
