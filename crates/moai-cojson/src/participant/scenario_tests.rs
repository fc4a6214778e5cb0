//! The vectors' scenarios played through [`Participant`]: the server creates its account, a
//! group and a CoMap, adds and removes the human, and reads and writes the human's group; a
//! second participant plays the human. Every content message must equal cojson's byte for byte,
//! and every read must equal what cojson's node read
//! (docs/protocols/cojson-participant.md §13).

use super::entropy::{Entropy, VectorEntropy};
use super::vectors_tests::{s, vectors};
use super::{AccountBootstrap, AgentIdentity, IngestReport, Participant, ParticipantError, WritePrivacy};
use crate::group_roles::Role;
use crate::message::SyncMessage;
use serde_json::{json, Map, Value};

const ACCOUNT_MADE_AT: u64 = 1_767_225_600_000;
const G1_MADE_AT: u64 = 1_767_225_660_000;
const ROTATION_MADE_AT: u64 = 1_767_225_780_000;

fn message(v: &Value) -> SyncMessage {
    SyncMessage::from_value(v).expect("vector message decodes")
}

/// A participant for `agent` ("server" or "human") whose session random part is the `k`-th draw.
fn participant(v: &Value, agent: &str, session_k: u64) -> (Participant, VectorEntropy) {
    let identity = AgentIdentity::from_secret(s(&v["agents"][agent], "agentSecret")).unwrap();
    let mut entropy = VectorEntropy { next_k: session_k };
    let mut random = [0u8; 8];
    entropy.fill(&mut random).unwrap();
    (Participant::new(identity, random), entropy)
}

/// A header-only content message for an account known only by its header.
fn account_header_message(v: &Value, agent: &str) -> SyncMessage {
    let a = &v["agents"][agent];
    message(&json!({"action": "content", "id": a["accountID"], "header": a["accountHeader"], "new": {}}))
}

fn ingest_ok(p: &mut Participant, msg: &SyncMessage) -> IngestReport {
    let report = p.ingest(msg).unwrap();
    assert!(report.rejected.is_empty() && !report.gap, "{report:?}");
    report
}

/// The message as cojson's JSON text, key order included.
fn same_bytes(ours: &SyncMessage, theirs: &Value) {
    assert_eq!(ours.to_json(), serde_json::to_string(theirs).unwrap());
}

fn object(v: &Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// The server after creating its account as in `accountCreation`, with the messages it sent.
fn server_with_account(v: &Value) -> (Participant, Vec<SyncMessage>) {
    let (mut server, mut entropy) = participant(v, "server", 1);
    let created =
        server.bootstrap_account(s(&v["accountCreation"]["inputs"], "profileName"), ACCOUNT_MADE_AT, &mut entropy);
    assert_eq!(created, Ok(AccountBootstrap::Created));
    assert_eq!(entropy.next_k, 8, "seven draws, in cojson's order");
    let msgs = server.take_content();
    (server, msgs)
}

#[test]
fn account_creation_content_is_cojsons() {
    let v = vectors();
    let ac = &v["accountCreation"];
    let (mut server, msgs) = server_with_account(&v);
    assert_eq!(server.session_id(), s(ac, "sessionID"));
    assert_eq!(server.identity().account_id(), s(ac, "accountID"));
    let expected = ac["contentMessages"].as_array().unwrap();
    assert_eq!(msgs.len(), expected.len());
    for (ours, theirs) in msgs.iter().zip(expected) {
        same_bytes(ours, theirs);
    }
    assert!(!server.has_pending_content());
    // The account's agent-form session holds the account's own transactions.
    let account = server.read(s(ac, "accountID")).unwrap();
    let agent = server.identity().agent_id().to_string();
    assert_eq!(account[&agent], "admin");
    assert_eq!(account["readKey"], ac["inputs"]["accountReadKey"]["id"]);
    assert_eq!(account["profile"], ac["coValues"]["profile"]["id"]);
    let profile_id = s(&ac["coValues"]["profile"], "id");
    assert_eq!(server.read(profile_id).unwrap()["name"], ac["inputs"]["profileName"]);
    // Public profile: everyone reads it.
    let group = server.read(s(&ac["coValues"]["profileGroup"], "id")).unwrap();
    assert_eq!(group["everyone"], "reader");
    // A second bootstrap has nothing to do.
    let mut entropy = VectorEntropy { next_k: 100 };
    assert_eq!(server.bootstrap_account("x", ACCOUNT_MADE_AT + 1, &mut entropy), Ok(AccountBootstrap::Complete));
    assert!(!server.has_pending_content());

    // Another node that receives the three messages reads the name: the key is public.
    let (mut human, _) = participant(&v, "human", 8);
    for m in &msgs {
        ingest_ok(&mut human, m);
    }
    assert_eq!(human.read(profile_id).unwrap()["name"], ac["inputs"]["profileName"]);
    assert_eq!(
        human.role_of(s(&ac["coValues"]["profileGroup"], "id"), human.identity().account_id()),
        Ok(Some(Role::Reader))
    );
}

#[test]
fn a_stored_account_without_profile_gets_one() {
    let v = vectors();
    let ac = &v["accountCreation"];
    // The account as stored after a crash: its first three transactions only.
    let mut account = ac["contentMessages"][0].clone();
    let session = s(ac, "agentSessionID");
    let entries = ac["coValues"]["account"]["sessions"][session].as_array().unwrap();
    let new = &mut account["new"][session];
    new["newTransactions"].as_array_mut().unwrap().truncate(3);
    new["lastSignature"] = entries[2]["signatureAfter"].clone();
    let (mut server, mut entropy) = participant(&v, "server", 50);
    ingest_ok(&mut server, &message(&account));
    assert_eq!(
        server.bootstrap_account("Again", ACCOUNT_MADE_AT + 5, &mut entropy),
        Ok(AccountBootstrap::ProfileAdded)
    );
    let msgs = server.take_content();
    assert_eq!(msgs.len(), 3, "account (profile link), profile group, profile");
    let account_id = s(ac, "accountID");
    let profile = server.read(account_id).unwrap()["profile"].as_str().unwrap().to_string();
    assert_eq!(server.read(&profile).unwrap()["name"], "Again");
    // The link is in this process's (new) agent-form session; a client accepts it.
    let SyncMessage::Content(link) = &msgs[0] else { panic!("content") };
    assert_eq!(link.id.as_str(), account_id);
    assert!(link.header.is_none(), "the account was not created here");
    let (mut human, _) = participant(&v, "human", 8);
    ingest_ok(&mut human, &message(&account));
    for m in &msgs {
        ingest_ok(&mut human, m);
    }
    assert_eq!(human.read(&profile).unwrap()["name"], "Again");
    assert_eq!(human.read(account_id).unwrap()["profile"], json!(profile));
}

/// The server after `serverGroupAndMap` (before the rotation), with the human's account known.
fn server_after_group_and_map(v: &Value) -> (Participant, Vec<SyncMessage>, String, String) {
    let (mut server, _) = server_with_account(v);
    ingest_ok(&mut server, &account_header_message(v, "human"));
    let human_account = s(&v["agents"]["human"], "accountID");
    let at = |k: &str| v["serverGroupAndMap"]["inputs"]["madeAt"][k].as_u64().unwrap();
    let mut entropy = VectorEntropy { next_k: 15 };
    let g1 = server.create_group(None, G1_MADE_AT, &mut entropy).unwrap();
    let m1 = server
        .create_map(
            &g1,
            None,
            &[("title", json!("Registry")), ("count", json!(1))],
            WritePrivacy::Private,
            at("createMap"),
            &mut entropy,
        )
        .unwrap();
    assert_eq!(entropy.next_k, 19);
    server.set(&m1, "note", json!("public note"), WritePrivacy::Trusting, at("note")).unwrap();
    server.set(&m1, "secret", json!("s3cr3t é\u{2028}\n"), WritePrivacy::Private, at("secret")).unwrap();
    server.delete(&m1, "count", WritePrivacy::Private, at("delCount")).unwrap();
    server.add_member(&g1, human_account, Role::Writer, at("addMember")).unwrap();
    server.set(&m1, "afterAdd", json!(true), WritePrivacy::Private, at("afterAdd")).unwrap();
    let msgs = server.take_content();
    (server, msgs, g1, m1)
}

/// The human's node after receiving everything the server sent.
fn human_with(v: &Value, server_msgs: &[&[SyncMessage]]) -> Participant {
    let (mut human, _) = participant(v, "human", 8);
    ingest_ok(&mut human, &account_header_message(v, "server"));
    for msgs in server_msgs {
        for m in *msgs {
            ingest_ok(&mut human, m);
        }
    }
    human
}

#[test]
fn server_group_and_map_content_and_views_are_cojsons() {
    let v = vectors();
    let sg = &v["serverGroupAndMap"];
    let (_, account_msgs) = server_with_account(&v);
    let (mut server, msgs, g1, m1) = server_after_group_and_map(&v);
    assert_eq!(g1, s(&sg["group"], "id"));
    assert_eq!(m1, s(&sg["map"], "id"));
    let expected = sg["contentMessages"].as_array().unwrap();
    assert_eq!(msgs.len(), expected.len());
    for (ours, theirs) in msgs.iter().zip(expected) {
        same_bytes(ours, theirs);
    }
    // The reveal to the human is entry 5 of G1.
    let g1_entries = sg["group"]["sessions"].as_object().unwrap().values().next().unwrap();
    assert_eq!(g1_entries[5]["sealed"], sg["revealToHuman"]);
    // The server reads its own map.
    assert_eq!(server.read(&m1).unwrap(), object(&sg["humanView"]));
    assert_eq!(server.role_of(&g1, s(&v["agents"]["human"], "accountID")), Ok(Some(Role::Writer)));

    // The human reads what cojson's node read, then writes back as cojson did.
    let mut human = human_with(&v, &[&account_msgs, &msgs]);
    assert_eq!(human.read(&m1).unwrap(), object(&sg["humanView"]));
    let wb = &sg["humanWriteBack"];
    let txs = wb["transactions"].as_array().unwrap();
    human
        .set(&m1, "fromHuman", json!("hello server"), WritePrivacy::Private, txs[0]["madeAt"].as_u64().unwrap())
        .unwrap();
    human.set(&m1, "humanTrusting", json!(42), WritePrivacy::Trusting, txs[1]["madeAt"].as_u64().unwrap()).unwrap();
    let back = human.take_content();
    let [SyncMessage::Content(back_msg)] = back.as_slice() else { panic!("one message") };
    let (session, content) = &back_msg.new[0];
    assert_eq!(session, s(wb, "sessionID"));
    assert_eq!(content.new_transactions, *txs, "the human's transactions are cojson's");
    // The server verifies and decrypts them.
    ingest_ok(&mut server, &back[0]);
    assert_eq!(server.read(&m1).unwrap(), object(&wb["decrypted"]));
}

#[test]
fn key_rotation_is_cojsons_and_locks_the_human_out_of_new_content_only() {
    let v = vectors();
    let sg = &v["serverGroupAndMap"];
    let (_, account_msgs) = server_with_account(&v);
    let (mut server, msgs, g1, m1) = server_after_group_and_map(&v);
    // The human's write-back first, as in the vectors.
    let mut human = human_with(&v, &[&account_msgs, &msgs]);
    let txs = sg["humanWriteBack"]["transactions"].as_array().unwrap();
    human
        .set(&m1, "fromHuman", json!("hello server"), WritePrivacy::Private, txs[0]["madeAt"].as_u64().unwrap())
        .unwrap();
    human.set(&m1, "humanTrusting", json!(42), WritePrivacy::Trusting, txs[1]["madeAt"].as_u64().unwrap()).unwrap();
    let back = human.take_content();
    ingest_ok(&mut server, &back[0]);

    let human_account = s(&v["agents"]["human"], "accountID");
    let mut entropy = VectorEntropy { next_k: 19 };
    server.remove_member(&g1, human_account, ROTATION_MADE_AT, &mut entropy).unwrap();
    assert_eq!(entropy.next_k, 21);
    server
        .set(&m1, "afterRotation", json!("only the server can read this"), WritePrivacy::Private, ROTATION_MADE_AT + 1)
        .unwrap();
    let rotation = server.take_content();
    assert_eq!(rotation.len(), 2);
    let g1_entries = sg["group"]["sessions"].as_object().unwrap().values().next().unwrap().as_array().unwrap();
    let m1_entries = sg["map"]["sessions"].as_object().unwrap().values().next().unwrap().as_array().unwrap();
    for (msg, entries, after) in [(&rotation[0], g1_entries, 6), (&rotation[1], m1_entries, 5)] {
        let SyncMessage::Content(c) = msg else { panic!("content") };
        let (_, content) = &c.new[0];
        assert_eq!(content.after, after as u64);
        let expected: Vec<Value> = entries[after..].iter().map(|e| e["tx"].clone()).collect();
        assert_eq!(
            serde_json::to_string(&content.new_transactions).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
        assert_eq!(content.last_signature, s(entries.last().unwrap(), "signatureAfter"));
    }
    // keyRotation's key-for-key entry is in it.
    let kfk = &v["keyRotation"]["keyForKey"];
    assert_eq!(server.read(&g1).unwrap()[s(kfk, "field")], kfk["value"]);
    assert_eq!(server.read(&g1).unwrap()["readKey"], v["keyRotation"]["newReadKey"]["id"]);

    // The server reads everything, old values through the key-for-key entry included.
    let mut all = object(&v["keyRotation"]["humanViewAfter"]);
    all.insert("afterRotation".into(), json!("only the server can read this"));
    assert_eq!(server.read(&m1).unwrap(), all);
    // The human still reads the old values but not the new one, and has no role any more.
    for m in &rotation {
        ingest_ok(&mut human, m);
    }
    assert_eq!(human.read(&m1).unwrap(), object(&v["keyRotation"]["humanViewAfter"]));
    assert_eq!(human.role_of(&g1, human_account), Ok(None));
    assert!(matches!(
        human.set(&m1, "late", json!(1), WritePrivacy::Trusting, ROTATION_MADE_AT + 10),
        Err(ParticipantError::NotPermitted(_))
    ));
}

/// The server's node holding the human's G2 and M2 (real cojson content) and its account header.
fn server_in_human_group(v: &Value) -> Participant {
    let (mut server, _) = participant(v, "server", 1);
    ingest_ok(&mut server, &account_header_message(v, "human"));
    let join = &v["joinHumanGroup"];
    for m in join["groupContent"].as_array().unwrap().iter().chain(join["mapContent"].as_array().unwrap()) {
        assert_eq!(ingest_ok(&mut server, &message(m)).sessions_extended, 1, "signatures verify");
    }
    server
}

#[test]
fn join_human_group_roles_key_map_and_the_servers_write() {
    let v = vectors();
    let join = &v["joinHumanGroup"];
    let g2 = s(&join["groupContent"][0], "id");
    let m2 = s(&join["mapContent"][0], "id");
    let mut server = server_in_human_group(&v);
    for (member, role) in join["groupState"]["roles"].as_object().unwrap() {
        assert_eq!(server.role_of(g2, member).unwrap().map(Role::as_str), role.as_str(), "{member}");
    }
    assert_eq!(server.read(g2).unwrap()["readKey"], join["groupState"]["readKey"]);
    // The key revealed to the server, unsealed with the revealer's (the human's) sealer.
    let rev = &join["revelationForServer"];
    {
        let reader = server.reader();
        let g2_id = crate::ids::CoId::parse(g2).unwrap();
        let view = reader.groups.view(&g2_id).unwrap();
        let edit = view.get(s(rev, "field"), None).unwrap();
        assert_eq!(edit.value, rev["sealed"]);
        assert_eq!(edit.author(), s(rev, "revealerAccount"));
        assert_eq!(json!({"sessionID": edit.session.as_str(), "txIndex": edit.index}), rev["txID"]);
        assert_eq!(reader.sealer_of(edit.author()).unwrap().to_z_string(), s(rev, "revealerSealerID"));
        let material = super::encoding::tx_nonce_material(&g2_id, &edit.session, edit.index);
        assert_eq!(crate::canonical_json::stable_stringify(&material), s(rev, "nonceMaterial"));
        assert_eq!(super::vectors_tests::hex(&super::encoding::nonce(&material)), s(rev, "nonceHex"));
        let shared =
            super::seal::shared_secret(&server.identity().secret().sealer, &reader.sealer_of(edit.author()).unwrap());
        assert_eq!(super::vectors_tests::hex(&shared), s(rev, "sharedSecretHex"));
        let key = reader.read_key(&g2_id, s(&join["groupState"], "readKey")).unwrap();
        assert_eq!(key.to_z_string(), s(rev, "unsealedKeySecret"));
    }
    assert_eq!(server.read(m2).unwrap(), object(&join["decryptedMap"]));

    // The server's write, byte for byte.
    let entries = join["serverWrite"]["entries"].as_array().unwrap();
    server
        .set(
            m2,
            "reply",
            json!("hi Alice, the server read your doc"),
            WritePrivacy::Private,
            entries[0]["tx"]["madeAt"].as_u64().unwrap(),
        )
        .unwrap();
    server
        .set(m2, "status", json!("seen"), WritePrivacy::Trusting, entries[1]["tx"]["madeAt"].as_u64().unwrap())
        .unwrap();
    let msgs = server.take_content();
    assert_eq!(msgs.len(), 1);
    same_bytes(&msgs[0], &join["serverWrite"]["message"]);

    // The human's node shows it.
    let (mut human, _) = participant(&v, "human", 8);
    ingest_ok(&mut human, &account_header_message(&v, "server"));
    for m in join["groupContent"].as_array().unwrap().iter().chain(join["mapContent"].as_array().unwrap()) {
        ingest_ok(&mut human, &message(m));
    }
    ingest_ok(&mut human, &msgs[0]);
    assert_eq!(human.read(m2).unwrap(), object(&join["humanViewAfterServerWrite"]));
}

#[test]
fn negative_early_write_is_stored_but_ignored_and_the_stamp_avoids_it() {
    let v = vectors();
    let join = &v["joinHumanGroup"];
    let m2 = s(&join["mapContent"][0], "id");
    let mut server = server_in_human_group(&v);
    // Accepted by sync: the signature is valid.
    let early = message(&join["negativeEarlyWrite"]["message"]);
    assert_eq!(ingest_ok(&mut server, &early).sessions_extended, 1);
    // Ignored by the reader: the server was not a member 1 ms before it was added.
    assert_eq!(server.read(m2).unwrap(), object(&join["decryptedMap"]));
    let early_at = join["negativeEarlyWrite"]["message"]["new"]["co_z59T41o3v8kmKGicaPBnmYXFskT_session_zEarlyWrite1"]
        ["newTransactions"][0]["madeAt"]
        .as_u64()
        .unwrap();
    // With the same lagging clock, this participant stamps after the human's newest write
    // (M2's last transaction, at +2 ms) and the write counts.
    server.set(m2, "onTime", json!(true), WritePrivacy::Trusting, early_at).unwrap();
    let value = server.read(m2).unwrap();
    assert_eq!(value["onTime"], json!(true));
    assert!(!value.contains_key("tooEarly"));
    let msgs = server.take_content();
    let SyncMessage::Content(c) = &msgs[0] else { panic!("content") };
    assert_eq!(c.new[0].1.new_transactions[0]["madeAt"], json!(1_767_225_900_003u64));
}

#[test]
fn negative_account_session_reads_as_empty() {
    let v = vectors();
    let neg = &v["negativeAccountSession"];
    let (mut server, _) = participant(&v, "server", 1);
    // Stored and verified like any content…
    assert_eq!(ingest_ok(&mut server, &message(&neg["message"])).sessions_extended, 1);
    // …but none of it is valid: the account-form author has no role in itself.
    assert_eq!(server.read(s(neg, "accountID")).unwrap(), object(&neg["clientView"]));
}

#[test]
fn refusals_happen_before_writing() {
    let v = vectors();
    let join = &v["joinHumanGroup"];
    let g2 = s(&join["groupContent"][0], "id");
    let mut server = server_in_human_group(&v);
    let mut entropy = VectorEntropy { next_k: 200 };
    // A writer cannot manage members.
    assert!(matches!(
        server.add_member(g2, s(&v["agents"]["server"], "accountID"), Role::Admin, 1_767_225_900_100),
        Err(ParticipantError::NotPermitted(_))
    ));
    assert!(matches!(
        server.remove_member(g2, "co_zSomeone", 1_767_225_900_100, &mut entropy),
        Err(ParticipantError::NotPermitted(_))
    ));
    // Nor write a CoMap into a group it cannot write (here: into a group, which is not a map).
    assert!(matches!(server.set(g2, "x", json!(1), WritePrivacy::Trusting, 1), Err(ParticipantError::NotAMap(_))));
    // Nor append to something that is not a CoList.
    assert!(matches!(
        server.append_to_list(g2, json!(1), WritePrivacy::Trusting, 1),
        Err(ParticipantError::NotAList(_))
    ));
    assert!(matches!(server.read("nope"), Err(ParticipantError::BadId(_))));
    assert!(matches!(server.read("co_zUnknown"), Err(ParticipantError::UnknownCoValue(_))));
    assert!(!server.has_pending_content());

    let (mut own, _) = server_with_account(&v);
    let mut entropy = VectorEntropy { next_k: 15 };
    let g = own.create_group(Some("named"), G1_MADE_AT, &mut entropy).unwrap();
    let _ = own.take_content();
    assert!(matches!(
        own.add_member(&g, "co_zUnknownAccount", Role::Reader, G1_MADE_AT),
        Err(ParticipantError::UnknownAccount(_))
    ));
    assert!(matches!(own.add_member(&g, "nobody", Role::Reader, G1_MADE_AT), Err(ParticipantError::BadMember(_))));
    assert!(matches!(own.add_member(&g, "everyone", Role::Admin, G1_MADE_AT), Err(ParticipantError::NotPermitted(_))));
    assert!(matches!(
        own.add_member(&g, "everyone", Role::WriteOnly, G1_MADE_AT),
        Err(ParticipantError::Unsupported(_))
    ));
    assert!(!own.has_pending_content());
    // Adding a member with the role it has writes nothing.
    own.add_member(&g, "everyone", Role::Reader, G1_MADE_AT).unwrap();
    let _ = own.take_content();
    own.add_member(&g, "everyone", Role::Reader, G1_MADE_AT + 1).unwrap();
    assert!(!own.has_pending_content());
    // A named group carries its name in the header.
    let state = own.store.get(&crate::ids::CoId::parse(&g).unwrap()).unwrap();
    assert_eq!(state.header.raw["meta"], json!({"name": "named"}));
}

/// `extend` both ways cojson reveals a child key: under the parent's read key (the server is a
/// member of the parent) and sealed to the parent's group sealer (it is not). The human, admin
/// of both parents and member of neither child, reads the server's maps through the links.
#[test]
fn extend_reveals_the_child_key_to_the_parent_both_ways() {
    let v = vectors();
    let human_account = s(&v["agents"]["human"], "accountID").to_owned();
    let server_account = s(&v["agents"]["server"], "accountID").to_owned();
    let (mut server, account_msgs) = server_with_account(&v);
    ingest_ok(&mut server, &account_header_message(&v, "human"));
    let (mut human, _) = participant(&v, "human", 8);
    ingest_ok(&mut human, &account_header_message(&v, "server"));
    let mut entropy = VectorEntropy { next_k: 300 };
    let at = G1_MADE_AT;

    // The human's two groups: P has the server as reader, Q does not know it.
    let p = human.create_group(None, at, &mut entropy).unwrap();
    human.add_member(&p, &server_account, Role::Reader, at).unwrap();
    let q = human.create_group(None, at, &mut entropy).unwrap();
    for m in human.take_content() {
        ingest_ok(&mut server, &m);
    }

    let c = server.create_group(None, at, &mut entropy).unwrap();
    let m = server.create_map(&c, None, &[("x", json!(1))], WritePrivacy::Private, at, &mut entropy).unwrap();
    server.extend(&c, &p, None, at, &mut entropy).unwrap();
    let c2 = server.create_group(None, at, &mut entropy).unwrap();
    let m2 = server.create_map(&c2, None, &[("y", json!(2))], WritePrivacy::Private, at, &mut entropy).unwrap();
    server.extend(&c2, &q, Some(Role::Reader), at, &mut entropy).unwrap();
    let msgs = server.take_content();
    let text: String = msgs.iter().map(SyncMessage::to_json).collect();
    assert!(text.contains(&format!("parent_{p}")) && text.contains(&format!("parent_{q}")));
    assert!(text.contains("_sealedFor_sealer_z"), "Q's key reveal is sealed to its group sealer");

    for msg in account_msgs.iter().chain(&msgs) {
        ingest_ok(&mut human, msg);
    }
    assert_eq!(human.read(&m).unwrap(), object(&json!({"x": 1})), "through P, under P's key");
    assert_eq!(human.read(&m2).unwrap(), object(&json!({"y": 2})), "through Q, by Q's group sealer");
    assert_eq!(human.role_of(&c, &human_account), Ok(Some(Role::Admin)), "inherit: admin of P is admin of C");
    assert_eq!(human.role_of(&c2, &human_account), Ok(Some(Role::Reader)), "a reader link caps the role");

    // Into itself, or into its own child: nothing written. Not admin of the child: refused.
    server.extend(&c, &c, None, at, &mut entropy).unwrap();
    assert!(!server.has_pending_content());
    let child = server.create_group(None, at, &mut entropy).unwrap();
    server.extend(&child, &c, None, at, &mut entropy).unwrap();
    let _ = server.take_content();
    server.extend(&c, &child, None, at, &mut entropy).unwrap();
    assert!(!server.has_pending_content(), "a cycle is not written");
    assert!(matches!(server.extend(&q, &c, None, at, &mut entropy), Err(ParticipantError::NotPermitted(_))));
    assert!(matches!(
        server.extend(&c, &p, Some(Role::WriteOnly), at, &mut entropy),
        Err(ParticipantError::Unsupported(_))
    ));
}
