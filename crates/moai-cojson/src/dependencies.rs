//! Which other CoValues a CoValue depends on (cojson's `getDependedOnCoValues`).
//!
//! The relay needs this twice: a server sends a peer every dependency it
//! lacks *before* the CoValue itself (clients verify, and would otherwise
//! have to ask for them one round trip at a time), and incoming content is
//! held back until its dependencies are present (an account-authored session
//! cannot be verified without the account's header). The rules are cojson's
//! (`coValueCore/utils.ts`):
//! * the header's owner group (`ruleset.group` of `ownedByGroup`);
//! * the header's `meta.source` (branches);
//! * the account of every session author written `co_z…` (agent authors have
//!   no CoValue);
//! * for group/account CoValues only: in *trusting* transactions, every
//!   `{"op":"set","key":K}` whose key is a `co_…` ID (a member) or
//!   `parent_co_…` (a parent group). Unparsable `changes` count as none.
//!
//! A CoValue never depends on itself. IDs that are not `co_z…` are dropped
//! (cojson would try to load them and never find them).

use crate::covalue::CoValueState;
use crate::header::{Header, Ruleset};
use crate::ids::{CoId, SessionAuthor, SessionId};
use serde_json::Value;
use std::collections::BTreeSet;

/// Owner group and branch source of a header.
pub fn header_dependencies(header: &Header, out: &mut BTreeSet<CoId>) {
    if let Ruleset::OwnedByGroup { group, .. } = &header.ruleset {
        out.insert(group.clone());
    }
    let source = header.raw.get("meta").and_then(|m| m.get("source")).and_then(Value::as_str);
    if let Some(source) = source.and_then(|s| CoId::parse(s).ok()) {
        out.insert(source);
    }
}

/// The account that authored a session, if it is an account.
pub fn session_dependency(session: &SessionId) -> Option<CoId> {
    match session.author() {
        SessionAuthor::Account(account) => Some(account),
        SessionAuthor::Agent(_) => None,
    }
}

/// `getGroupDependentKey`: `parent_<id>` → `<id>`; a key starting `co_` is itself.
fn group_key_dependency(key: &str) -> Option<CoId> {
    let id = key.strip_prefix("parent_").unwrap_or(key);
    if id.starts_with("co_") {
        CoId::parse(id).ok()
    } else {
        None
    }
}

/// Member and parent-group references in a group's trusting transactions.
pub fn group_transaction_dependencies<'a>(txs: impl IntoIterator<Item = &'a Value>, out: &mut BTreeSet<CoId>) {
    for tx in txs {
        if tx.get("privacy").and_then(Value::as_str) != Some("trusting") {
            continue;
        }
        let Some(changes) = tx.get("changes").and_then(Value::as_str) else { continue };
        let Ok(Value::Array(changes)) = serde_json::from_str::<Value>(changes) else { continue };
        for change in &changes {
            if change.get("op").and_then(Value::as_str) != Some("set") {
                continue;
            }
            if let Some(dep) = change.get("key").and_then(Value::as_str).and_then(group_key_dependency) {
                out.insert(dep);
            }
        }
    }
}

/// Dependencies contributed by new transactions of one session.
pub fn session_content_dependencies<'a>(
    header: &Header,
    session: &SessionId,
    txs: impl IntoIterator<Item = &'a Value>,
    out: &mut BTreeSet<CoId>,
) {
    if let Some(account) = session_dependency(session) {
        out.insert(account);
    }
    if header.is_group_or_account() {
        group_transaction_dependencies(txs, out);
    }
}

/// All dependencies of a CoValue held in memory.
pub fn covalue_dependencies(state: &CoValueState) -> BTreeSet<CoId> {
    let mut out = BTreeSet::new();
    header_dependencies(&state.header, &mut out);
    for (session, log) in &state.sessions {
        session_content_dependencies(&state.header, session, &log.transactions, &mut out);
    }
    out.remove(&state.header.id);
    out
}

/// Dependencies a content message brings for a CoValue with `header`
/// (`getDependenciesFromContentMessage`). Session keys that do not parse are
/// skipped: verification rejects them anyway.
pub fn content_dependencies(header: &Header, new: &[(String, crate::message::SessionNewContent)]) -> BTreeSet<CoId> {
    let mut out = BTreeSet::new();
    header_dependencies(header, &mut out);
    for (key, entry) in new {
        if let Ok(session) = SessionId::parse(key) {
            session_content_dependencies(header, &session, &entry.new_transactions, &mut out);
        }
    }
    out.remove(&header.id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::id_for_header;
    use serde_json::json;

    fn header(raw: Value) -> Header {
        Header::validate(&id_for_header(&raw), &raw).unwrap()
    }

    #[test]
    fn owner_group_and_branch_source() {
        let h = header(json!({"type":"comap","ruleset":{"type":"ownedByGroup","group":"co_zG"},
            "meta":{"source":"co_zSrc","branch":"b"},"uniqueness":"z1"}));
        let mut out = BTreeSet::new();
        header_dependencies(&h, &mut out);
        assert_eq!(out.iter().map(CoId::as_str).collect::<Vec<_>>(), ["co_zG", "co_zSrc"]);
    }

    #[test]
    fn group_members_and_parents_but_not_keys_or_children() {
        let h = header(
            json!({"type":"comap","ruleset":{"type":"group","initialAdmin":"co_zAdmin"},"meta":null,"uniqueness":"z2"}),
        );
        let changes = json!([
            {"op":"set","key":"co_zMember","value":"writer"},
            {"op":"set","key":"parent_co_zParent","value":"extend"},
            {"op":"set","key":"child_co_zChild","value":"extend"},
            {"op":"set","key":"key_zK_for_co_zMember","value":"sealed_U"},
            {"op":"del","key":"co_zGone"}
        ])
        .to_string();
        let tx = json!({"privacy":"trusting","madeAt":1,"changes":changes});
        let private = json!({"privacy":"private","madeAt":1,"keyUsed":"key_z","encryptedChanges":"encrypted_U"});
        let garbage = json!({"privacy":"trusting","madeAt":1,"changes":"not json"});
        let session = SessionId::parse("co_zAdmin_session_zS").unwrap();
        let mut out = BTreeSet::new();
        session_content_dependencies(&h, &session, [&tx, &private, &garbage], &mut out);
        assert_eq!(out.iter().map(CoId::as_str).collect::<Vec<_>>(), ["co_zAdmin", "co_zMember", "co_zParent"]);
    }

    #[test]
    fn non_group_transactions_are_not_scanned() {
        let h = header(json!({"type":"comap","ruleset":{"type":"unsafeAllowAll"},"meta":null,"uniqueness":"z3"}));
        let tx = json!({"privacy":"trusting","madeAt":1,"changes":json!([{"op":"set","key":"co_zX","value":1}]).to_string()});
        let session = SessionId::parse("sealer_zA/signer_zB_session_zS").unwrap();
        let mut out = BTreeSet::new();
        session_content_dependencies(&h, &session, [&tx], &mut out);
        assert!(out.is_empty());
    }
}
