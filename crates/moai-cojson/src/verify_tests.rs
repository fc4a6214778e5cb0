//! Verification and application of content, starting from the cojson vectors.

use crate::covalue::CoValueState;
use crate::crypto::{id_for_header, AgentSecret};
use crate::header::Header;
use crate::ids::{CoId, SessionAuthor};
use crate::known_state::KnownState;
use crate::message::{ContentMessage, SessionNewContent, SyncMessage};
use crate::transaction_hash::{canonical_transaction, SessionHasher};
use crate::verify::{verify_content, ContentError, DeletePolicy, DenyDeletes, VerifyError};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

fn vectors() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cojson-vectors.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["deterministic"].clone()
}

fn content(v: &Value) -> ContentMessage {
    match SyncMessage::from_value(v).unwrap() {
        SyncMessage::Content(c) => c,
        other => panic!("{other:?}"),
    }
}

/// Known headers with the vector account in it.
fn account_headers(v: &Value) -> HashMap<CoId, Header> {
    let id = CoId::parse(v["account"]["id"].as_str().unwrap()).unwrap();
    let h = Header::validate(&id, &v["account"]["header"]).unwrap();
    HashMap::from([(id, h)])
}

fn vector_content(v: &Value) -> ContentMessage {
    content(&v["contentMessage"])
}

/// Rewrites the vector message's single session entry.
fn with_entry(mut c: ContentMessage, f: impl FnOnce(&mut SessionNewContent)) -> ContentMessage {
    f(&mut c.new[0].1);
    c
}

fn sig(v: &Value, i: usize) -> String {
    v["transactions"][i]["signatureAfter"].as_str().unwrap().to_string()
}

fn expected_known(v: &Value) -> KnownState {
    match SyncMessage::from_value(&{
        let mut k = v["knownStateAfter"].clone();
        k["action"] = json!("known");
        k
    })
    .unwrap()
    {
        SyncMessage::Known(k) => k.state,
        other => panic!("{other:?}"),
    }
}

#[test]
fn vector_content_verifies_and_yields_the_vector_known_state() {
    let v = vectors();
    let headers = account_headers(&v);
    let msg = vector_content(&v);
    let verdict = verify_content(None, &msg, &headers, &DenyDeletes).unwrap();
    assert!(verdict.rejected.is_empty(), "{:?}", verdict.rejected);
    assert!(!verdict.gap);
    assert_eq!(verdict.accepted.len(), 1);
    assert_eq!(verdict.accepted[0].hasher.current().to_z_string(), v["transactions"][3]["hashAfter"].as_str().unwrap());
    let mut slot = None;
    let applied = CoValueState::apply(&mut slot, verdict);
    assert!(applied.header_installed);
    let state = slot.expect("installed");
    assert_eq!(state.known_state(), expected_known(&v));
    // Stored transactions are the received objects, untouched.
    let stored = &state.sessions.values().next().unwrap().transactions;
    assert_eq!(stored, msg.new[0].1.new_transactions.as_slice());
}

#[test]
fn unknown_author_account_is_reported_not_accepted() {
    let v = vectors();
    let verdict = verify_content(None, &vector_content(&v), &HashMap::new(), &DenyDeletes).unwrap();
    assert!(verdict.accepted.is_empty());
    let account = CoId::parse(v["account"]["id"].as_str().unwrap()).unwrap();
    assert_eq!(verdict.rejected[0].1, VerifyError::UnknownAccount(account));
}

#[test]
fn header_missing_and_header_mismatch() {
    let v = vectors();
    let headers = account_headers(&v);
    let mut msg = vector_content(&v);
    msg.header = None;
    assert_eq!(verify_content(None, &msg, &headers, &DenyDeletes).unwrap_err(), ContentError::HeaderMissing);
    let mut msg = vector_content(&v);
    msg.header.as_mut().unwrap()["uniqueness"] = json!("zOther");
    assert!(matches!(verify_content(None, &msg, &headers, &DenyDeletes), Err(ContentError::Header(_))));
}

#[test]
fn tampered_batch_is_rejected_atomically_and_does_not_poison_the_session() {
    let v = vectors();
    let headers = account_headers(&v);
    // First, the first two transactions (signature after tx 1).
    let first_two = with_entry(vector_content(&v), |e| {
        e.new_transactions.truncate(2);
        e.last_signature = sig(&v, 1);
    });
    let mut slot = None;
    CoValueState::apply(&mut slot, verify_content(None, &first_two, &headers, &DenyDeletes).unwrap());
    let before = slot.as_ref().unwrap().known_state();
    let before_hash = slot.as_ref().unwrap().sessions.values().next().unwrap().hasher.current();

    // A forged continuation: tx 3 altered, real signature.
    let forged = with_entry(vector_content(&v), |e| {
        e.after = 2;
        e.new_transactions.drain(..2);
        e.new_transactions[1]["changes"] = json!("[{\"op\":\"set\",\"key\":\"unicode\",\"value\":\"evil\"}]");
    });
    let verdict = verify_content(slot.as_ref(), &forged, &headers, &DenyDeletes).unwrap();
    assert_eq!(verdict.rejected.len(), 1);
    assert_eq!(verdict.rejected[0].1, VerifyError::BadSignature);
    let applied = CoValueState::apply(&mut slot, verdict);
    assert!(applied.sessions.is_empty());
    assert_eq!(slot.as_ref().unwrap().known_state(), before);
    assert_eq!(slot.as_ref().unwrap().sessions.values().next().unwrap().hasher.current(), before_hash);

    // The honest continuation still verifies afterwards (cojson-core bug not reproduced),
    // sent with full overlap from after=0.
    let honest = vector_content(&v);
    let verdict = verify_content(slot.as_ref(), &honest, &headers, &DenyDeletes).unwrap();
    assert!(verdict.rejected.is_empty());
    assert_eq!(verdict.accepted[0].after, 2);
    assert_eq!(verdict.accepted[0].transactions.len(), 2);
    CoValueState::apply(&mut slot, verdict);
    assert_eq!(slot.unwrap().known_state(), expected_known(&v));
}

#[test]
fn wrong_signature_at_a_different_index_is_rejected() {
    let v = vectors();
    // All four transactions but the signature that was valid after tx 2.
    let msg = with_entry(vector_content(&v), |e| e.last_signature = sig(&v, 2));
    let verdict = verify_content(None, &msg, &account_headers(&v), &DenyDeletes).unwrap();
    assert_eq!(verdict.rejected[0].1, VerifyError::BadSignature);
    // Header alone is still new content (the CoValue becomes known, empty).
    assert!(verdict.has_new_content() && verdict.accepted.is_empty());
}

#[test]
fn gap_and_nothing_new() {
    let v = vectors();
    let headers = account_headers(&v);
    let mut slot = None;
    CoValueState::apply(&mut slot, verify_content(None, &vector_content(&v), &headers, &DenyDeletes).unwrap());
    // Exact duplicate: nothing new, no error.
    let verdict = verify_content(slot.as_ref(), &vector_content(&v), &headers, &DenyDeletes).unwrap();
    assert!(verdict.accepted.is_empty() && verdict.rejected.is_empty() && !verdict.gap);
    // after=5 > 4: gap.
    let gap = with_entry(vector_content(&v), |e| e.after = 5);
    assert!(verify_content(slot.as_ref(), &gap, &headers, &DenyDeletes).unwrap().gap);
}

#[test]
fn float_made_at_and_garbage_signature_are_rejected() {
    let v = vectors();
    let headers = account_headers(&v);
    let msg = with_entry(vector_content(&v), |e| e.new_transactions[0]["madeAt"] = json!(1.5));
    assert!(matches!(
        verify_content(None, &msg, &headers, &DenyDeletes).unwrap().rejected[0].1,
        VerifyError::Transaction { index: 0, .. }
    ));
    let msg = with_entry(vector_content(&v), |e| e.last_signature = "signature_z0".into());
    assert!(matches!(
        verify_content(None, &msg, &headers, &DenyDeletes).unwrap().rejected[0].1,
        VerifyError::SignatureEncoding(_)
    ));
}

// ---------- agent-authored sessions and delete rules ----------

struct Fixture {
    secret: AgentSecret,
    agent: String,
}

impl Fixture {
    fn new() -> Self {
        let secret = AgentSecret::parse(vectors()["agentSecret"].as_str().unwrap()).unwrap();
        let agent = secret.agent_id().as_str().to_string();
        Fixture { secret, agent }
    }

    /// A content message for `header` with one session signed by our agent.
    fn signed(&self, header: &Value, session_suffix: &str, txs: Vec<Value>) -> ContentMessage {
        let id = id_for_header(header);
        let mut hasher = SessionHasher::new();
        for tx in &txs {
            hasher.update(&canonical_transaction(tx).unwrap().json);
        }
        let sig = hasher.sign(&self.secret.signer);
        let session = format!("{}_session_{session_suffix}", self.agent);
        let mut new = Map::new();
        new.insert(session, json!({"after": 0, "newTransactions": txs, "lastSignature": sig.to_z_string()}));
        content(&json!({"action":"content","id":id.as_str(),"header":header,"priority":3,"new":new}))
    }
}

fn map_header() -> Value {
    json!({"type":"comap","ruleset":{"type":"ownedByGroup","group":"co_zGroup"},"meta":null,"createdAt":null,"uniqueness":"zU"})
}

fn trusting(meta: Option<&str>) -> Value {
    let mut tx = json!({"privacy":"trusting","madeAt":1000,"changes":"[]"});
    if let Some(m) = meta {
        tx["meta"] = json!(m);
    }
    tx
}

struct AllowAdmin(String);

impl DeletePolicy for AllowAdmin {
    fn author_is_admin(&self, group: &CoId, author: &SessionAuthor, made_at: u64) -> bool {
        group.as_str() == "co_zGroup" && author.as_str() == self.0 && made_at == 1000
    }
}

#[test]
fn agent_session_verifies_with_its_own_signer() {
    let f = Fixture::new();
    let msg = f.signed(&map_header(), "zS1", vec![trusting(None), trusting(Some("{\"x\":1}"))]);
    let verdict = verify_content(None, &msg, &HashMap::new(), &DenyDeletes).unwrap();
    assert!(verdict.rejected.is_empty(), "{:?}", verdict.rejected);
    assert_eq!(verdict.accepted[0].hasher.count(), 2);
}

#[test]
fn delete_rules() {
    let f = Fixture::new();
    let header = map_header();
    let id = id_for_header(&header);
    let marker = format!("{{\"deleted\":\"{}\"}}", id.as_str());
    let deny = DenyDeletes;
    let allow = AllowAdmin(f.agent.clone());

    // Valid delete by an admin.
    let del = f.signed(&header, "dDel$", vec![trusting(Some(&marker))]);
    let verdict = verify_content(None, &del, &HashMap::new(), &allow).unwrap();
    assert!(verdict.rejected.is_empty(), "{:?}", verdict.rejected);
    assert!(verdict.accepted[0].is_delete);
    // Same delete, author not admin.
    let verdict = verify_content(None, &del, &HashMap::new(), &deny).unwrap();
    assert!(matches!(verdict.rejected[0].1, VerifyError::DeleteNotPermitted(_)));
    // Two transactions in a delete session.
    let two = f.signed(&header, "dDel$", vec![trusting(Some(&marker)), trusting(None)]);
    assert!(matches!(
        verify_content(None, &two, &HashMap::new(), &allow).unwrap().rejected[0].1,
        VerifyError::InvalidDelete(_)
    ));
    // Marker naming another CoValue.
    let other = f.signed(&header, "dDel$", vec![trusting(Some("{\"deleted\":\"co_zElse\"}"))]);
    assert!(matches!(
        verify_content(None, &other, &HashMap::new(), &allow).unwrap().rejected[0].1,
        VerifyError::InvalidDelete(_)
    ));
    // Groups cannot be deleted.
    let group = json!({"type":"comap","ruleset":{"type":"group","initialAdmin":f.agent},"meta":null,"uniqueness":"zG"});
    let gmarker = format!("{{\"deleted\":\"{}\"}}", id_for_header(&group).as_str());
    let gdel = f.signed(&group, "dDel$", vec![trusting(Some(&gmarker))]);
    assert_eq!(verify_content(None, &gdel, &HashMap::new(), &allow).unwrap().rejected[0].1, VerifyError::NotDeletable);
    // A delete session without a marker is an ordinary transaction (as in cojson).
    let plain = f.signed(&header, "dDel$", vec![trusting(None)]);
    let verdict = verify_content(None, &plain, &HashMap::new(), &deny).unwrap();
    assert!(verdict.rejected.is_empty() && !verdict.accepted[0].is_delete);
}

#[test]
fn applying_a_delete_discards_other_sessions_and_blocks_new_ones() {
    let f = Fixture::new();
    let header = map_header();
    let id = id_for_header(&header);
    let allow = AllowAdmin(f.agent.clone());
    let mut slot = None;
    let normal = f.signed(&header, "zS1", vec![trusting(None)]);
    CoValueState::apply(&mut slot, verify_content(None, &normal, &HashMap::new(), &allow).unwrap());
    let marker = format!("{{\"deleted\":\"{}\"}}", id.as_str());
    let del = f.signed(&header, "dDel$", vec![trusting(Some(&marker))]);
    let verdict = verify_content(slot.as_ref(), &del, &HashMap::new(), &allow).unwrap();
    let applied = CoValueState::apply(&mut slot, verdict);
    assert!(applied.deleted_now);
    let state = slot.as_ref().unwrap();
    assert!(state.deleted);
    assert_eq!(state.sessions.len(), 1);
    assert!(state.sessions.keys().all(|s| s.is_delete_session()));
    // Later ordinary content is skipped, not an error.
    let later = f.signed(&header, "zS2", vec![trusting(None)]);
    let verdict = verify_content(slot.as_ref(), &later, &HashMap::new(), &allow).unwrap();
    assert!(verdict.accepted.is_empty() && verdict.rejected.is_empty());
    assert_eq!(verdict.skipped_deleted.len(), 1);
}

#[test]
fn stale_verdict_is_not_applied_twice() {
    let v = vectors();
    let headers = account_headers(&v);
    let mut slot = None;
    let verdict = verify_content(None, &vector_content(&v), &headers, &DenyDeletes).unwrap();
    let again = verdict.clone();
    CoValueState::apply(&mut slot, verdict);
    let applied = CoValueState::apply(&mut slot, again);
    assert_eq!(applied.stale.len(), 1);
    assert_eq!(slot.unwrap().known_state(), expected_known(&v));
}
