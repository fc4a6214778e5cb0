//! Roles in a group at a point in time: the one permission check a cojson sync server makes at
//! ingest. A delete session is accepted only if its author is *admin* of the CoValue's owner
//! group at the delete's `madeAt` (cojson 0.20.19 `#canAuthorDeleteCoValueAtTime`, which calls
//! `group.atTime(madeAt).roleOfInternal(author)`).
//!
//! Conservative by construction: every step may *under*-estimate a role but never over-estimate
//! admin, so a delete cojson would refuse is refused here, while a rare valid one may be refused
//! too (the client then keeps its own deleted copy and the server keeps the CoValue). Where this
//! is narrower than cojson:
//! * the validity walk gives each author only their *direct* role in this group (cojson also
//!   counts roles inherited from parent groups there). Fewer authors are then entitled to grant
//!   roles; since no one but the admin themself can take admin away (cojson: admins cannot demote
//!   other admins, managers cannot touch admins), ignoring a grant never creates an admin;
//! * a parent group that is not in memory counts as giving no role;
//! * parent chains deeper than [`MAX_PARENT_DEPTH`] give no role (also breaks cycles).
//!
//! Ordering follows cojson's `compareTransactions`: `madeAt`, then the index within a session;
//! equal `madeAt` across sessions keeps session order (cojson keeps load order, which is not
//! defined across nodes either).

use std::collections::HashMap;

use serde_json::Value;

use crate::covalue::CoValueState;
use crate::header::Ruleset;
use crate::ids::CoId;

/// How many parent links are followed (cojson has no limit but forbids cycles).
pub const MAX_PARENT_DEPTH: usize = 8;

/// Read access to the CoValues in memory.
pub trait CoValueLookup {
    fn state(&self, id: &CoId) -> Option<&CoValueState>;
}

impl CoValueLookup for HashMap<CoId, CoValueState> {
    fn state(&self, id: &CoId) -> Option<&CoValueState> {
        self.get(id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Manager,
    Writer,
    Reader,
    WriteOnly,
    Revoked,
    AdminInvite,
    ManagerInvite,
    WriterInvite,
    ReaderInvite,
    WriteOnlyInvite,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "manager" => Role::Manager,
            "writer" => Role::Writer,
            "reader" => Role::Reader,
            "writeOnly" => Role::WriteOnly,
            "revoked" => Role::Revoked,
            "adminInvite" => Role::AdminInvite,
            "managerInvite" => Role::ManagerInvite,
            "writerInvite" => Role::WriterInvite,
            "readerInvite" => Role::ReaderInvite,
            "writeOnlyInvite" => Role::WriteOnlyInvite,
            _ => return None,
        })
    }

    /// The role as cojson writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Manager => "manager",
            Role::Writer => "writer",
            Role::Reader => "reader",
            Role::WriteOnly => "writeOnly",
            Role::Revoked => "revoked",
            Role::AdminInvite => "adminInvite",
            Role::ManagerInvite => "managerInvite",
            Role::WriterInvite => "writerInvite",
            Role::ReaderInvite => "readerInvite",
            Role::WriteOnlyInvite => "writeOnlyInvite",
        }
    }

    /// `isInheritableRole`.
    fn inheritable(self) -> bool {
        matches!(self, Role::Revoked | Role::Admin | Role::Manager | Role::Writer | Role::Reader)
    }
}

/// `isMorePermissiveAndShouldInherit(parent, current)`.
fn should_inherit(parent: Role, current: Option<Role>) -> bool {
    match parent {
        Role::Revoked => true,
        Role::Manager => !matches!(current, Some(Role::Manager | Role::Admin)),
        Role::Admin => current != Some(Role::Admin),
        Role::Writer => matches!(current, None | Some(Role::Reader | Role::WriteOnly)),
        Role::Reader => current.is_none(),
        _ => false,
    }
}

/// Whether `member` (an account or agent ID) is admin of `group` at `at` (ms since epoch).
pub fn is_admin(lookup: &dyn CoValueLookup, group: &CoId, member: &str, at: u64) -> bool {
    role_at(lookup, group, member, at, 0) == Some(Role::Admin)
}

/// One `set` of a member role or parent link, in the order cojson evaluates them.
struct RoleOp<'a> {
    made_at: u64,
    author: &'a str,
    key: String,
    value: String,
}

/// `group.atTime(at).roleOfInternal(member)`.
fn role_at(lookup: &dyn CoValueLookup, group: &CoId, member: &str, at: u64, depth: usize) -> Option<Role> {
    let state = lookup.state(group)?;
    let Ruleset::Group { initial_admin } = &state.header.ruleset else { return None };
    // An account is admin of itself (`RawAccount.roleOfInternal`).
    if state.header.account_agent().is_some() && member == group.as_str() {
        return Some(Role::Admin);
    }
    let (direct, parents) = walk(state, initial_admin, at);

    let mut role = direct.get(member).copied().filter(|r| *r != Role::Revoked);
    if depth < MAX_PARENT_DEPTH {
        for (parent, mapping) in &parents {
            let Ok(parent_id) = CoId::parse(parent) else { continue };
            let Some(inherited) = role_at(lookup, &parent_id, member, at, depth + 1) else { continue };
            if !inherited.inheritable() {
                continue;
            }
            let candidate = if mapping == "extend" { Some(inherited) } else { Role::parse(mapping) };
            if let Some(c) = candidate {
                if should_inherit(c, role) {
                    role = Some(c);
                }
            }
        }
    }
    if role.is_none() && member != "everyone" {
        role = direct.get("everyone").copied().filter(|r| *r != Role::Revoked);
    }
    role
}

/// `determineValidTransactionsForGroup` restricted to transactions made at or before `at`:
/// the valid direct roles and the parent links (parent ID → mapping) in force at `at`.
fn walk(state: &CoValueState, initial_admin: &str, at: u64) -> (HashMap<String, Role>, Vec<(String, String)>) {
    let mut ops: Vec<RoleOp<'_>> = Vec::new();
    for (session, log) in &state.sessions {
        let author = session.author_str();
        for tx in &log.transactions {
            if let Some(op) = role_op(tx, author) {
                if op.made_at <= at {
                    ops.push(op);
                }
            }
        }
    }
    // Stable: equal `madeAt` keeps session order, then index within the session.
    ops.sort_by_key(|op| op.made_at);

    let mut direct: HashMap<String, Role> = HashMap::new();
    let mut parents: Vec<(String, String)> = Vec::new();
    for op in ops {
        let mine = direct.get(op.author).copied();
        if let Some(parent) = op.key.strip_prefix("parent_") {
            if matches!(mine, Some(Role::Admin | Role::Manager)) {
                parents.retain(|(p, _)| p != parent);
                if op.value != "revoked" {
                    parents.push((parent.to_string(), op.value));
                }
            }
            continue;
        }
        let Some(value) = Role::parse(&op.value) else { continue };
        let key = op.key;
        if key == "everyone" && !matches!(value, Role::Reader | Role::Writer | Role::WriteOnly | Role::Revoked) {
            continue;
        }
        let target = direct.get(&key).copied();
        let own = key == op.author;
        // The group's creator making themself admin, or anyone leaving.
        let creator_bootstrap = mine.is_none() && op.author == initial_admin && own && value == Role::Admin;
        let leaving = own && value == Role::Revoked;
        let valid = if creator_bootstrap || leaving {
            true
        } else {
            match mine {
                Some(Role::Admin) => !(target == Some(Role::Admin) && value != Role::Admin && !own),
                Some(Role::Manager) => {
                    target != Some(Role::Admin)
                        && !matches!(value, Role::Admin | Role::AdminInvite | Role::ManagerInvite)
                }
                Some(Role::AdminInvite) => value == Role::Admin,
                Some(Role::ManagerInvite) => value == Role::Manager,
                Some(Role::WriterInvite) => value == Role::Writer,
                Some(Role::ReaderInvite) => value == Role::Reader,
                Some(Role::WriteOnlyInvite) => value == Role::WriteOnly,
                _ => false,
            }
        };
        if valid {
            direct.insert(key, value);
        }
    }
    (direct, parents)
}

/// A trusting transaction holding exactly one `set` of a member role (`co_…` account, agent ID,
/// `everyone`) or a `parent_…` link; everything else (keys, sealers, profile, private
/// transactions) does not decide roles.
fn role_op<'a>(tx: &Value, author: &'a str) -> Option<RoleOp<'a>> {
    if tx.get("privacy")?.as_str()? != "trusting" {
        return None;
    }
    let made_at = tx.get("madeAt")?.as_u64()?;
    let changes: Value = serde_json::from_str(tx.get("changes")?.as_str()?).ok()?;
    let [change] = changes.as_array()?.as_slice() else { return None };
    if change.get("op")?.as_str()? != "set" {
        return None;
    }
    let key = change.get("key")?.as_str()?;
    let value = change.get("value")?.as_str()?;
    let is_member =
        key == "everyone" || key.starts_with("co_z") || key.starts_with("sealer_z") || key.starts_with("parent_co_z");
    if !is_member {
        return None;
    }
    Some(RoleOp { made_at, author, key: key.to_string(), value: value.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::covalue::SessionLog;
    use crate::crypto::Signature;
    use crate::header::Header;
    use crate::ids::SessionId;
    use crate::transaction_hash::SessionHasher;
    use serde_json::json;
    use std::collections::BTreeMap;

    const CREATOR: &str = "co_zCreator";
    const BOB: &str = "co_zBob";
    const EVE: &str = "co_zEve";
    const INVITE: &str = "sealer_zInv/signer_zInv";

    fn id(s: &str) -> CoId {
        CoId::parse(s).unwrap()
    }

    /// A group (or account, with `account_of`) whose sessions hold the given role sets:
    /// (author, madeAt, key, value), one transaction each, in one session per author.
    fn group(gid: &str, initial_admin: &str, sets: &[(&str, u64, &str, &str)]) -> CoValueState {
        let header = Header {
            id: id(gid),
            kind: "comap".into(),
            ruleset: Ruleset::Group { initial_admin: initial_admin.into() },
            raw: json!({"type": "comap", "ruleset": {"type": "group", "initialAdmin": initial_admin}, "meta": null}),
        };
        let mut state = CoValueState::new(header);
        let mut sessions: BTreeMap<SessionId, SessionLog> = BTreeMap::new();
        for (author, made_at, key, value) in sets {
            let sid = SessionId::parse(&format!("{author}_session_zS")).unwrap();
            let log = sessions.entry(sid).or_insert_with(|| SessionLog {
                transactions: vec![],
                hasher: SessionHasher::new(),
                last_signature: Signature([0; 64]),
                signature_after: BTreeMap::new(),
                bytes_since_checkpoint: 0,
            });
            let changes = json!([{"op": "set", "key": key, "value": value}]).to_string();
            log.transactions.push(json!({"privacy": "trusting", "madeAt": made_at, "changes": changes}));
        }
        state.sessions = sessions;
        state
    }

    fn world(groups: Vec<CoValueState>) -> HashMap<CoId, CoValueState> {
        groups.into_iter().map(|g| (g.header.id.clone(), g)).collect()
    }

    #[test]
    fn creator_bootstraps_and_grants_admin_from_then_on() {
        let w = world(vec![group("co_zG", CREATOR, &[(CREATOR, 10, CREATOR, "admin"), (CREATOR, 20, BOB, "admin")])]);
        assert!(is_admin(&w, &id("co_zG"), CREATOR, 10));
        assert!(!is_admin(&w, &id("co_zG"), CREATOR, 9), "before the bootstrap");
        assert!(!is_admin(&w, &id("co_zG"), BOB, 19), "before the grant");
        assert!(is_admin(&w, &id("co_zG"), BOB, 20));
        assert!(!is_admin(&w, &id("co_zG"), EVE, 30));
    }

    #[test]
    fn nobody_else_can_make_themself_or_others_admin() {
        let w = world(vec![group(
            "co_zG",
            CREATOR,
            &[
                (EVE, 5, EVE, "admin"), // not the initial admin
                (CREATOR, 10, CREATOR, "admin"),
                (CREATOR, 20, BOB, "writer"),
                (BOB, 30, BOB, "admin"), // a writer cannot promote
                (BOB, 31, EVE, "admin"),
                (CREATOR, 40, "everyone", "admin"), // everyone is never admin
            ],
        )]);
        for who in [EVE, BOB, "everyone"] {
            assert!(!is_admin(&w, &id("co_zG"), who, 100), "{who}");
        }
    }

    #[test]
    fn managers_cannot_touch_admins_and_admins_cannot_demote_each_other() {
        let w = world(vec![group(
            "co_zG",
            CREATOR,
            &[
                (CREATOR, 10, CREATOR, "admin"),
                (CREATOR, 11, BOB, "admin"),
                (CREATOR, 12, EVE, "manager"),
                (EVE, 13, EVE, "admin"),      // manager cannot create admins
                (EVE, 14, BOB, "reader"),     // nor demote them
                (CREATOR, 15, BOB, "reader"), // admins cannot demote other admins
            ],
        )]);
        assert!(is_admin(&w, &id("co_zG"), BOB, 100));
        assert!(!is_admin(&w, &id("co_zG"), EVE, 100));
    }

    #[test]
    fn an_admin_can_leave() {
        let w = world(vec![group(
            "co_zG",
            CREATOR,
            &[(CREATOR, 10, CREATOR, "admin"), (CREATOR, 11, BOB, "admin"), (BOB, 20, BOB, "revoked")],
        )]);
        assert!(is_admin(&w, &id("co_zG"), BOB, 19));
        assert!(!is_admin(&w, &id("co_zG"), BOB, 20));
    }

    #[test]
    fn invites_grant_exactly_their_role() {
        let w = world(vec![group(
            "co_zG",
            CREATOR,
            &[
                (CREATOR, 10, CREATOR, "admin"),
                (CREATOR, 11, INVITE, "adminInvite"),
                (INVITE, 12, BOB, "admin"),
                (CREATOR, 13, "sealer_zW/signer_zW", "writerInvite"),
                ("sealer_zW/signer_zW", 14, EVE, "admin"), // a writer invite cannot make admins
            ],
        )]);
        assert!(is_admin(&w, &id("co_zG"), BOB, 12));
        assert!(!is_admin(&w, &id("co_zG"), EVE, 100));
    }

    #[test]
    fn parent_groups_give_admin_through_extend_or_an_admin_mapping() {
        let parent = group(
            "co_zP",
            CREATOR,
            &[(CREATOR, 1, CREATOR, "admin"), (CREATOR, 2, BOB, "admin"), (CREATOR, 3, EVE, "reader")],
        );
        let extend = group("co_zX", CREATOR, &[(CREATOR, 1, CREATOR, "admin"), (CREATOR, 5, "parent_co_zP", "extend")]);
        let mapped = group("co_zM", CREATOR, &[(CREATOR, 1, CREATOR, "admin"), (CREATOR, 5, "parent_co_zP", "admin")]);
        let as_reader =
            group("co_zR", CREATOR, &[(CREATOR, 1, CREATOR, "admin"), (CREATOR, 5, "parent_co_zP", "reader")]);
        let w = world(vec![parent, extend, mapped, as_reader]);
        assert!(is_admin(&w, &id("co_zX"), BOB, 5));
        assert!(!is_admin(&w, &id("co_zX"), BOB, 4), "before the link");
        assert!(!is_admin(&w, &id("co_zX"), EVE, 5), "a parent reader stays a reader");
        assert!(is_admin(&w, &id("co_zM"), EVE, 5), "an `admin` mapping makes every parent member admin");
        assert!(!is_admin(&w, &id("co_zR"), BOB, 5), "a `reader` mapping caps the role");
    }

    #[test]
    fn links_set_by_non_admins_missing_parents_and_cycles_give_nothing() {
        let a = group("co_zA", CREATOR, &[(CREATOR, 1, CREATOR, "admin"), (CREATOR, 2, "parent_co_zB", "extend")]);
        let b = group("co_zB", CREATOR, &[(CREATOR, 1, CREATOR, "admin"), (CREATOR, 2, "parent_co_zA", "extend")]);
        let c = group(
            "co_zC",
            CREATOR,
            &[
                (CREATOR, 1, CREATOR, "admin"),
                (CREATOR, 2, EVE, "writer"),
                (EVE, 3, "parent_co_zA", "extend"),
                (CREATOR, 4, "parent_co_zGone", "extend"),
            ],
        );
        let w = world(vec![a, b, c]);
        assert!(!is_admin(&w, &id("co_zA"), BOB, 10));
        assert!(!is_admin(&w, &id("co_zC"), BOB, 10));
        assert!(is_admin(&w, &id("co_zA"), CREATOR, 10));
    }

    #[test]
    fn an_account_is_admin_of_itself_and_unknown_groups_give_nothing() {
        let agent = "sealer_zAcc/signer_zAcc";
        let mut account = group("co_zAcc", agent, &[(agent, 1, agent, "admin")]);
        account.header.raw =
            json!({"type": "comap", "ruleset": {"type": "group", "initialAdmin": agent}, "meta": {"type": "account"}});
        let w = world(vec![account]);
        assert!(is_admin(&w, &id("co_zAcc"), "co_zAcc", 0));
        assert!(!is_admin(&w, &id("co_zAcc"), BOB, 10));
        assert!(!is_admin(&w, &id("co_zNope"), CREATOR, 10));
    }

    #[test]
    fn private_or_multi_op_transactions_do_not_decide_roles() {
        let mut g = group("co_zG", CREATOR, &[(CREATOR, 10, CREATOR, "admin")]);
        let sid = SessionId::parse(&format!("{CREATOR}_session_zS")).unwrap();
        let log = g.sessions.get_mut(&sid).unwrap();
        let two = json!([{"op": "set", "key": BOB, "value": "admin"}, {"op": "set", "key": EVE, "value": "admin"}])
            .to_string();
        log.transactions.push(json!({"privacy": "trusting", "madeAt": 11, "changes": two}));
        log.transactions.push(json!({"privacy": "private", "madeAt": 12, "encryptedChanges": "x"}));
        log.transactions.push(json!({"privacy": "trusting", "madeAt": 13, "changes": "not json"}));
        let w = world(vec![g]);
        assert!(!is_admin(&w, &id("co_zG"), BOB, 100));
        assert!(!is_admin(&w, &id("co_zG"), EVE, 100));
        assert!(is_admin(&w, &id("co_zG"), CREATOR, 100));
    }
}
