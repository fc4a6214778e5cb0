//! The read path beyond the vectors: roles and keys through parent groups (extend, a fixed
//! role, revoked, `_sealedFor_` reveals), `everyone`, transactions clients treat as invalid, and
//! cycles (docs/protocols/cojson-participant.md §7, §9). Alice is a second participant; where
//! moai has no API for a write (parent links), the test appends the raw transaction.

use super::cipher::encrypt_key_secret;
use super::encoding::tx_nonce_material;
use super::entropy::VectorEntropy;
use super::seal::{group_sealer_from_read_key, seal_for_group};
use super::session_writer::TxPrivacy;
use super::{AgentIdentity, Participant, ParticipantError, WritePrivacy};
use crate::group_roles::Role;
use crate::ids::CoId;
use serde_json::{json, Value};

const T: u64 = 1_800_000_000_000;

struct World {
    alice: Participant,
    server: Participant,
    entropy: VectorEntropy,
}

impl World {
    fn new() -> Self {
        let alice = Participant::new(AgentIdentity::from_random(&[1; 64]), [1; 8]);
        let server = Participant::new(AgentIdentity::from_random(&[2; 64]), [2; 8]);
        let mut w = World { alice, server, entropy: VectorEntropy { next_k: 1000 } };
        // Each knows the other's account (as a relay would deliver it as a dependency).
        let a = header_only(&w.alice);
        let s = header_only(&w.server);
        w.server.store.ingest(&a).unwrap();
        w.alice.store.ingest(&s).unwrap();
        w
    }

    fn server_account(&self) -> String {
        self.server.identity().account_id().to_string()
    }

    /// Everything Alice wrote, delivered to the server.
    fn sync(&mut self) {
        for m in self.alice.take_content() {
            let report = self.server.ingest(&m).unwrap();
            assert!(report.rejected.is_empty(), "{report:?}");
        }
        for m in self.server.take_content() {
            let report = self.alice.ingest(&m).unwrap();
            assert!(report.rejected.is_empty(), "{report:?}");
        }
    }

    fn group(&mut self) -> CoId {
        CoId::parse(&self.alice.create_group(None, T, &mut self.entropy).unwrap()).unwrap()
    }

    fn map(&mut self, group: &CoId, init: Value) -> String {
        let init: Vec<(&str, Value)> = init.as_object().unwrap().iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        self.alice.create_map(group.as_str(), None, &init, WritePrivacy::Private, T, &mut self.entropy).unwrap()
    }

    /// Alice links `child` to `parent` and reveals the child's key to the parent's key.
    fn extend(&mut self, child: &CoId, parent: &CoId, link: &str, at: u64) {
        self.alice.append_set(child, &format!("parent_{parent}"), json!(link), at).unwrap();
        let reader = self.alice.reader();
        let (child_id, child_key) = reader.current_read_key(child).unwrap();
        let (parent_id, parent_key) = reader.current_read_key(parent).unwrap();
        drop(reader);
        let value = encrypt_key_secret((&child_id, &child_key), (&parent_id, &parent_key));
        self.alice.append_set(child, &format!("{child_id}_for_{parent_id}"), json!(value), at).unwrap();
    }
}

fn header_only(p: &Participant) -> crate::message::ContentMessage {
    let SyncMessage::Content(c) = crate::message::SyncMessage::from_value(&json!({
        "action": "content", "id": p.identity().account_id(), "header": p.identity().account_header(), "new": {}
    }))
    .unwrap() else {
        unreachable!()
    };
    c
}

use crate::message::SyncMessage;

#[test]
fn a_parent_group_gives_role_and_key() {
    let mut w = World::new();
    let server = w.server_account();
    let parent = w.group();
    let child = w.group();
    w.alice.add_member(parent.as_str(), &server, Role::Writer, T).unwrap();
    w.extend(&child, &parent, "extend", T);
    let map = w.map(&child, json!({"a": 1}));
    w.sync();
    // No direct membership in the child: role and key come through the parent.
    assert_eq!(w.server.role_of(child.as_str(), &server), Ok(Some(Role::Writer)));
    assert_eq!(w.server.read(&map).unwrap(), json!({"a": 1}).as_object().unwrap().clone());
    w.server.set(&map, "b", json!(2), WritePrivacy::Private, T + 1).unwrap();
    w.sync();
    assert_eq!(w.alice.read(&map).unwrap()["b"], json!(2));

    // A fixed `reader` link caps the role: the server can no longer write.
    w.alice.append_set(&child, &format!("parent_{parent}"), json!("reader"), T + 2).unwrap();
    w.sync();
    assert_eq!(w.server.role_of(child.as_str(), &server), Ok(Some(Role::Reader)));
    assert!(matches!(
        w.server.set(&map, "c", json!(3), WritePrivacy::Trusting, T + 3),
        Err(ParticipantError::NotPermitted(_))
    ));
    // Its earlier write stays valid: roles are checked at each write's own time.
    assert_eq!(w.server.read(&map).unwrap()["b"], json!(2));

    // Revoked in the parent: no role there, so none in the child either (a revoked entry reads
    // as no role, as in the client), and no more writes.
    w.alice.append_set(&child, &format!("parent_{parent}"), json!("extend"), T + 4).unwrap();
    w.alice.remove_member(parent.as_str(), &server, T + 5, &mut w.entropy).unwrap();
    w.sync();
    assert_eq!(w.server.role_of(child.as_str(), &server), Ok(None));
    assert!(matches!(
        w.server.set(&map, "d", json!(4), WritePrivacy::Trusting, T + 6),
        Err(ParticipantError::NotPermitted(_))
    ));
    // Rotation happened in the parent only (child groups are not rotated, docs §12): the server
    // still holds the child's key and reads on.
    assert_eq!(w.server.read(&map).unwrap()["a"], json!(1));
}

#[test]
fn a_key_sealed_for_the_parent_group_opens_with_the_parent_key() {
    let mut w = World::new();
    let server = w.server_account();
    let parent = w.group();
    let child = w.group();
    w.alice.add_member(parent.as_str(), &server, Role::Reader, T).unwrap();
    // Instead of key-for-key: the child key sealed to the parent's group sealer.
    w.alice.append_set(&child, &format!("parent_{parent}"), json!("extend"), T).unwrap();
    let (child_id, child_key, parent_sealer) = {
        let reader = w.alice.reader();
        let (child_id, child_key) = reader.current_read_key(&child).unwrap();
        let (_, parent_key) = reader.current_read_key(&parent).unwrap();
        (child_id, child_key, group_sealer_from_read_key(&parent_key).1)
    };
    let material = tx_nonce_material(&child, w.alice.session_for(&child), w.alice.next_index(&child));
    let sealed = seal_for_group(&json!(child_key.to_z_string()), &parent_sealer, &material, &[9; 32]);
    w.alice
        .append_set(&child, &format!("{child_id}_sealedFor_{}", parent_sealer.to_z_string()), json!(sealed), T)
        .unwrap();
    let map = w.map(&child, json!({"hidden": "yes"}));
    w.sync();
    assert_eq!(w.server.role_of(child.as_str(), &server), Ok(Some(Role::Reader)));
    assert_eq!(w.server.read(&map).unwrap()["hidden"], json!("yes"));
}

#[test]
fn everyone_as_writer_lets_any_account_read_and_write() {
    let mut w = World::new();
    let group = w.group();
    w.alice.add_member(group.as_str(), "everyone", Role::Writer, T).unwrap();
    let map = w.map(&group, json!({"open": true}));
    w.sync();
    let server = w.server_account();
    assert_eq!(w.server.role_of(group.as_str(), &server), Ok(Some(Role::Writer)));
    assert_eq!(w.server.read(&map).unwrap()["open"], json!(true));
    w.server.set(&map, "from", json!("server"), WritePrivacy::Private, T + 1).unwrap();
    w.sync();
    assert_eq!(w.alice.read(&map).unwrap()["from"], json!("server"));
    // `everyone` does not let anyone edit the group itself.
    assert!(matches!(
        w.server.add_member(group.as_str(), "everyone", Role::Reader, T + 2),
        Err(ParticipantError::NotPermitted(_))
    ));
}

#[test]
fn transactions_clients_reject_are_ignored() {
    let mut w = World::new();
    let server = w.server_account();
    let group = w.group();
    w.alice.add_member(group.as_str(), &server, Role::Writer, T).unwrap();
    let map = w.map(&group, json!({"k": "v"}));
    w.sync();
    let key_before = w.alice.read(group.as_str()).unwrap()["readKey"].clone();
    // A writer making itself admin, setting readKey, or revealing keys: stored, not valid.
    w.server.append_set(&group, &server, json!("admin"), T + 1).unwrap();
    w.server.append_set(&group, "readKey", json!("key_zForged"), T + 1).unwrap();
    // Alice: two sets in one transaction, and a private transaction, in a group.
    let two = [super::changes::set_op("x", json!(1)), super::changes::set_op("y", json!(2))];
    w.alice.append(&group, &two, TxPrivacy::Trusting, T + 1).unwrap();
    let (id, key) = w.alice.reader().current_read_key(&group).unwrap();
    w.alice
        .append(&group, &[super::changes::set_op("z", json!(1))], TxPrivacy::Private { key_id: &id, key: &key }, T + 1)
        .unwrap();
    // A write stamped before the server was added.
    w.server
        .append(&CoId::parse(&map).unwrap(), &[super::changes::set_op("early", json!(1))], TxPrivacy::Trusting, T - 1)
        .unwrap();
    w.sync();
    for p in [&w.alice, &w.server] {
        let g = p.read(group.as_str()).unwrap();
        assert_eq!(g[&server], json!("writer"));
        assert_eq!(g["readKey"], key_before);
        assert!(!g.contains_key("x") && !g.contains_key("y") && !g.contains_key("z"));
        assert!(!p.read(&map).unwrap().contains_key("early"));
    }
    // Admins cannot demote each other; the refusal comes before writing.
    w.alice.add_member(group.as_str(), &server, Role::Admin, T + 2).unwrap();
    w.sync();
    let alice = w.alice.identity().account_id().to_string();
    assert!(matches!(
        w.server.add_member(group.as_str(), &alice, Role::Reader, T + 3),
        Err(ParticipantError::NotPermitted(_))
    ));
    assert!(matches!(
        w.server.remove_member(group.as_str(), &alice, T + 3, &mut w.entropy),
        Err(ParticipantError::NotPermitted(_))
    ));
    // …and an admin can leave by itself.
    w.server.remove_member(group.as_str(), &server, T + 4, &mut w.entropy).unwrap();
    w.sync();
    assert_eq!(w.alice.role_of(group.as_str(), &server), Ok(None));
}

#[test]
fn parent_cycles_are_broken_and_reading_terminates() {
    let mut w = World::new();
    let server = w.server_account();
    let a = w.group();
    let b = w.group();
    w.alice.add_member(a.as_str(), &server, Role::Reader, T).unwrap();
    w.extend(&b, &a, "extend", T);
    // The link back closes a cycle (clients never write one: `extend` refuses it).
    w.alice.append_set(&a, &format!("parent_{b}"), json!("extend"), T + 1).unwrap();
    let map = w.map(&b, json!({"deep": 1}));
    w.sync();
    // Within one evaluation the cycle is broken at the link met last: reading from `b` keeps
    // `b`'s link, so the server's role and key come through `a`.
    assert_eq!(w.server.read(&map).unwrap()["deep"], json!(1));
    assert_eq!(w.server.role_of(b.as_str(), &server), Ok(Some(Role::Reader)));
    let from_a = w.server.read(a.as_str()).unwrap();
    assert_eq!(from_a[&server], json!("reader"));
}

#[test]
fn a_long_parent_chain_gives_nothing_beyond_the_depth_limit() {
    let mut w = World::new();
    let server = w.server_account();
    let top = w.group();
    w.alice.add_member(top.as_str(), &server, Role::Reader, T).unwrap();
    let mut below = top.clone();
    let mut chain = vec![top.clone()];
    for _ in 0..(super::group_view::MAX_GROUP_DEPTH + 2) {
        let g = w.group();
        w.extend(&g, &below, "extend", T);
        chain.push(g.clone());
        below = g;
    }
    w.sync();
    assert_eq!(w.server.role_of(chain[3].as_str(), &server), Ok(Some(Role::Reader)));
    // Far below the limit the membership is not seen (and nothing overflows).
    assert_eq!(w.server.role_of(below.as_str(), &server), Ok(None));
}

#[test]
fn key_for_key_chains_are_followed_and_bounded() {
    use super::encoding::{KeyId, KeySecret};
    use super::read_key::MAX_KEY_CHAIN;
    for (length, readable) in [(40usize, true), (MAX_KEY_CHAIN + 50, false)] {
        let mut w = World::new();
        let group = w.group();
        let map = w.map(&group, json!({"old": "value"}));
        // A chain of keys, each stored under the next; only the last is sealed to the server.
        let (mut id, mut key) = w.alice.reader().current_read_key(&group).unwrap();
        for i in 0..length {
            let next_id = KeyId::from_random(&[(i % 251) as u8, (i / 251) as u8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
            let next_key = KeySecret([(i % 251) as u8 + 1; 32]);
            let value = encrypt_key_secret((&id, &key), (&next_id, &next_key));
            w.alice.append_set(&group, &format!("{id}_for_{next_id}"), json!(value), T).unwrap();
            (id, key) = (next_id, next_key);
        }
        let server = w.server_account();
        let sealer = w.server.identity().secret().sealer.sealer_id();
        w.alice.reveal_key(&group, &server, &sealer, (&id, &key), T).unwrap();
        w.sync();
        let value = w.server.read(&map).unwrap();
        assert_eq!(value.contains_key("old"), readable, "chain of {length}");
    }
}
