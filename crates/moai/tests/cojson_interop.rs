//! Unmodified npm `cojson` 0.20.19 clients against moai's /sync: two fresh nodes with no shared
//! storage sync only through moai, and moai keeps, verifies and forwards what they write.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::node_driver::NodeDriver;
use support::{closed_port, Server};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn sync_url(server: &Server) -> String {
    server.ws_url("/sync")
}

/// A creates an account, a group anyone can write, a map and a list; returns (groupId, mapId,
/// listId) once moai has acknowledged all of it.
fn seed(c: &mut NodeDriver, url: &str) -> (String, String, String) {
    c.call("createAccount", json!({"name": "a", "url": url}));
    let group =
        c.call("createGroup", json!({"name": "a", "everyone": "writer"}))["groupId"].as_str().unwrap().to_owned();
    let map = c.call("createMap", json!({"name": "a", "groupId": group, "init": {"title": "groceries"}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    let list = c.call("createList", json!({"name": "a", "groupId": group, "items": ["milk"]}))["listId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "a"}));
    (group, map, list)
}

#[test]
fn a_second_node_loads_everything_through_moai_and_edits_flow_both_ways() {
    let server = Server::start(&[]);
    server.wait_ready();
    let url = sync_url(&server);
    let mut c = NodeDriver::cojson();
    let (_group, map, list) = seed(&mut c, &url);

    c.call("createAccount", json!({"name": "b", "url": url}));
    assert_eq!(c.call("getMap", json!({"name": "b", "coId": map}))["map"]["title"], "groceries");
    assert_eq!(c.call("getList", json!({"name": "b", "coId": list}))["list"], json!(["milk"]));

    c.call("setKey", json!({"name": "a", "coId": map, "key": "owner", "value": "ann"}));
    c.call("waitMap", json!({"name": "b", "coId": map, "key": "owner", "equals": "ann"}));
    c.call("setKey", json!({"name": "b", "coId": map, "key": "helper", "value": "bob"}));
    c.call("waitMap", json!({"name": "a", "coId": map, "key": "helper", "equals": "bob"}));
    c.call("append", json!({"name": "b", "coId": list, "value": "eggs"}));
    c.call("waitList", json!({"name": "a", "coId": list, "equals": ["milk", "eggs"]}));
}

#[test]
fn concurrent_same_key_edits_converge() {
    let server = Server::start(&[]);
    server.wait_ready();
    let url = sync_url(&server);
    let mut c = NodeDriver::cojson();
    let (_group, map, _list) = seed(&mut c, &url);
    c.call("createAccount", json!({"name": "b", "url": url}));
    c.call("getMap", json!({"name": "b", "coId": map}));
    // B edits offline so neither sees the other's write before both are made.
    c.call("disconnect", json!({"name": "b"}));
    let a_write = c.call("setKey", json!({"name": "a", "coId": map, "key": "k", "value": "from-a"}));
    let mut b_write = c.call("setKey", json!({"name": "b", "coId": map, "key": "k", "value": "from-b"}));
    // cojson orders same-key writes by madeAt; equal timestamps are an undefined tie in cojson
    // itself (not moai's concern), so make B's strictly later. (This compared with `getMap`,
    // which has no `madeAt`, so it never looped, and writes in the same millisecond made the
    // test flaky on a loaded machine.)
    let made_at = |v: &serde_json::Value| v["madeAt"].as_u64().expect("setKey reports madeAt");
    while made_at(&b_write) <= made_at(&a_write) {
        b_write = c.call("setKey", json!({"name": "b", "coId": map, "key": "k", "value": "from-b"}));
    }
    c.call("reconnect", json!({"name": "b"}));
    c.call("waitSynced", json!({"name": "b", "coId": map}));
    c.call("waitSynced", json!({"name": "a", "coId": map}));
    let a_view = c.call("waitMap", json!({"name": "a", "coId": map, "key": "k", "equals": b_write["map"]["k"]}));
    let b_view = c.call("getMap", json!({"name": "b", "coId": map}));
    assert_eq!(a_view["map"], b_view["map"], "both nodes converge to the same map");
}

/// A server on a fixed port and database, so that it can be restarted in place
/// ([`Restartable::restart`]) and clients reconnect to the same URL.
struct Restartable {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    port: String,
    server: Option<Server>,
}

impl Restartable {
    fn start() -> Restartable {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("moai.db");
        let mut r = Restartable { _dir: dir, db, port: closed_port().to_string(), server: None };
        r.up();
        r
    }

    fn up(&mut self) {
        let server = Server::start_in(tempfile::tempdir().unwrap(), &self.db, &["--port", &self.port]);
        server.wait_ready();
        self.server = Some(server);
    }

    fn url(&self) -> String {
        sync_url(self.server.as_ref().expect("running"))
    }

    /// Stop with `signal` (TERM: graceful; KILL: crash).
    fn stop(&mut self, signal: &str) {
        let mut server = self.server.take().expect("running");
        server.signal(signal);
        server.wait_exit(Duration::from_secs(15)).expect("server stopped");
    }

    /// Stop with `signal` and start again on the same database.
    fn restart(&mut self, signal: &str) {
        self.stop(signal);
        self.up();
    }
}

fn restart_keeps_everything_acked(signal: &str) {
    let mut server = Restartable::start();
    let url = server.url();
    let mut c = NodeDriver::cojson();
    let (_group, map, list) = seed(&mut c, &url);
    for i in 0..10 {
        c.call("append", json!({"name": "a", "coId": list, "value": format!("item-{i}")}));
    }
    c.call("setKey", json!({"name": "a", "coId": map, "key": "last", "value": "written before the crash"}));
    c.call("waitSynced", json!({"name": "a"})); // acknowledged by moai
                                                // The writer goes away before the restart, so it cannot re-upload what the server lost.
    c.call("disconnect", json!({"name": "a"}));
    server.restart(signal);
    // A fresh node with no storage of its own gets everything back from moai.
    c.call("createAccount", json!({"name": "fresh", "url": url}));
    assert_eq!(c.call("getMap", json!({"name": "fresh", "coId": map}))["map"]["last"], "written before the crash");
    let list_now = c.call("getList", json!({"name": "fresh", "coId": list}))["list"].clone();
    assert_eq!(list_now.as_array().unwrap().len(), 11, "{list_now}");
}

#[test]
fn sigterm_restart_keeps_everything_acknowledged() {
    restart_keeps_everything_acked("TERM");
}

#[test]
fn kill_9_restart_keeps_everything_acknowledged() {
    restart_keeps_everything_acked("KILL");
}

/// Sends `frames` on a raw connection and returns the non-ping messages moai answered.
fn raw(c: &mut NodeDriver, url: &str, frames: &Value, until: usize) -> Value {
    c.call("sendRaw", json!({"name": "raw", "url": url, "frames": frames, "collectMs": 1500, "untilMessages": until}))
}

#[test]
fn forged_signatures_and_header_mismatches_are_rejected_without_harming_others() {
    let server = Server::start(&[]);
    server.wait_ready();
    let url = sync_url(&server);
    let mut c = NodeDriver::cojson();
    let (group, map, _list) = seed(&mut c, &url);
    c.call("createAccount", json!({"name": "b", "url": url}));
    c.call("getMap", json!({"name": "b", "coId": map}));

    // A transaction appended under the old signature: moai must refuse it and tell nobody.
    let forged = c.call("forgeFrom", json!({"name": "a", "coId": map, "mode": "appendTx"}));
    let answer = raw(&mut c, &url, &forged["frames"], 1);
    assert_eq!(answer["closeCode"], Value::Null, "a forged message does not cost the connection: {answer}");
    let before = c.call("getMap", json!({"name": "b", "coId": map}))["map"].clone();
    // The honest writer is not blocked by the forgery (the reference server's bug, docs/protocols/cojson.md §10.4).
    c.call("setKey", json!({"name": "a", "coId": map, "key": "after", "value": "honest"}));
    c.call("waitSynced", json!({"name": "a", "coId": map}));
    let after = c.call("waitMap", json!({"name": "b", "coId": map, "key": "after", "equals": "honest"}))["map"].clone();
    assert_eq!(
        after.as_object().unwrap().len(),
        before.as_object().unwrap().len() + 1,
        "only the honest key was added: {after}"
    );

    // A header that does not hash to its id, for a CoValue moai does not know.
    c.call("disconnect", json!({"name": "a"})); // keep the new map away from moai
    let fresh = c.call("createMap", json!({"name": "a", "groupId": group, "init": {"x": 1}}));
    let fresh_id = fresh["mapId"].as_str().unwrap().to_owned();
    let forged = c.call("forgeFrom", json!({"name": "a", "coId": fresh_id, "mode": "header"}));
    raw(&mut c, &url, &forged["frames"], 1);
    let probe = raw(&mut c, &url, &json!([{"action": "load", "id": fresh_id, "header": false, "sessions": {}}]), 1);
    let about_fresh: Vec<&Value> =
        probe["messages"].as_array().unwrap().iter().filter(|m| m["id"] == fresh_id).collect();
    assert_eq!(about_fresh.len(), 1, "{probe}");
    assert_eq!(
        (about_fresh[0]["action"].as_str(), about_fresh[0]["header"].as_bool()),
        (Some("known"), Some(false)),
        "moai stored nothing: {probe}"
    );
    // B still works.
    c.call("setKey", json!({"name": "b", "coId": map, "key": "still", "value": "fine"}));
    c.call("waitSynced", json!({"name": "b", "coId": map}));
}

/// Deleting a CoValue (jazz `deleteCoValue`): moai accepts the delete only from an admin of the
/// owner group at the delete's time, keeps it across a restart, and serves the deleted value
/// (header + delete session) to everyone after; a signed delete from a mere writer changes
/// nothing for anyone.
#[test]
fn an_admins_delete_reaches_everyone_and_a_writers_forged_delete_is_refused() {
    let mut server = Restartable::start();
    let url = server.url();
    let mut c = NodeDriver::cojson();
    let (_group, map, list) = seed(&mut c, &url); // a is admin; everyone may write

    // b can write the map but is no admin: cojson itself would refuse, so b skips its checks.
    c.call("createAccount", json!({"name": "b", "url": url}));
    c.call("setKey", json!({"name": "b", "coId": map, "key": "by_b", "value": 1}));
    c.call("waitSynced", json!({"name": "b", "coId": map}));
    let refused = c.try_call("deleteCoValue", json!({"name": "b", "coId": map}));
    assert_eq!(refused["ok"], false, "cojson refuses a writer's delete locally: {refused}");
    assert_eq!(c.call("forgeDelete", json!({"name": "b", "coId": map}))["deleted"], true);
    // moai refuses it: a writer's honest edit made after it still arrives, and a fresh node
    // sees the map whole.
    c.call("setKey", json!({"name": "a", "coId": map, "key": "after_forgery", "value": true}));
    c.call("waitSynced", json!({"name": "a", "coId": map}));
    c.call("createAccount", json!({"name": "c", "url": url}));
    let seen = c.call("load", json!({"name": "c", "coId": map}));
    assert_eq!(seen["deleted"], false, "{seen}");
    assert_eq!(seen["content"]["by_b"], 1, "{seen}");
    assert_eq!(seen["content"]["after_forgery"], true, "{seen}");

    // The admin deletes the map; a node that never saw it gets the deleted value.
    assert_eq!(c.call("deleteCoValue", json!({"name": "a", "coId": map}))["deleted"], true);
    c.call("waitSynced", json!({"name": "a", "coId": map}));
    c.call("createAccount", json!({"name": "d", "url": url}));
    let gone = c.call("load", json!({"name": "d", "coId": map}));
    assert_eq!((gone["available"].as_bool(), gone["deleted"].as_bool()), (Some(true), Some(true)), "{gone}");
    assert_eq!(gone["content"], json!({}), "{gone}");
    // Other CoValues of the group are untouched.
    assert_eq!(c.call("getList", json!({"name": "d", "coId": list}))["list"], json!(["milk"]));

    // The delete survives kill -9, and the deleted content is gone from the database, not
    // just hidden: only the delete session is stored.
    server.stop("KILL");
    let stored = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let db = support::test_storage::Stored::open(&server.db).await;
        let record = db.covalues().load_covalue(&map).await.unwrap().expect("the map is stored");
        db.close().await;
        record
    });
    assert!(stored.deleted);
    let sessions: Vec<&str> = stored.sessions.iter().map(|s| s.session.as_str()).collect();
    assert!(!sessions.is_empty() && sessions.iter().all(|s| s.ends_with('$')), "{sessions:?}");
    server.up();
    c.call("createAccount", json!({"name": "e", "url": url}));
    let after_restart = c.call("load", json!({"name": "e", "coId": map}));
    assert_eq!(after_restart["deleted"], true, "{after_restart}");
    assert_eq!(after_restart["content"], json!({}), "{after_restart}");
}

/// Who may delete follows the owner group's roles at the delete's time, including roles
/// inherited from a parent group: an admin of the parent (through `extend`) may delete, a
/// manager of the owner group may not (cojson requires exactly admin).
#[test]
fn inherited_admins_may_delete_and_managers_may_not() {
    let server = Server::start(&[]);
    server.wait_ready();
    let url = sync_url(&server);
    let mut c = NodeDriver::cojson();
    for name in ["a", "b", "m"] {
        c.call("createAccount", json!({"name": name, "url": url}));
    }
    let account = |c: &mut NodeDriver, name: &str| {
        c.call("stats", json!({"name": name}))["accountId"].as_str().unwrap().to_owned()
    };
    let (b, m) = (account(&mut c, "b"), account(&mut c, "m"));
    // a makes a parent group with b as admin, and a team group extending it with m as manager.
    let parent = c.call("createGroup", json!({"name": "a"}))["groupId"].as_str().unwrap().to_owned();
    c.call("addMember", json!({"name": "a", "groupId": parent, "memberAccountId": b, "role": "admin"}));
    let team =
        c.call("createGroup", json!({"name": "a", "everyone": "reader"}))["groupId"].as_str().unwrap().to_owned();
    c.call("extendGroup", json!({"name": "a", "groupId": team, "parentId": parent}));
    c.call("addMember", json!({"name": "a", "groupId": team, "memberAccountId": m, "role": "manager"}));
    let first = c.call("createMap", json!({"name": "a", "groupId": team, "init": {"n": 1}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = c.call("createMap", json!({"name": "a", "groupId": team, "init": {"n": 2}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "a"}));

    // The manager's delete (cojson refuses it locally, so it is forged) is refused by moai.
    c.call("forgeDelete", json!({"name": "m", "coId": first}));
    // The parent's admin deletes the second map the normal way.
    assert_eq!(c.call("deleteCoValue", json!({"name": "b", "coId": second}))["deleted"], true);
    c.call("waitSynced", json!({"name": "b", "coId": second}));

    c.call("createAccount", json!({"name": "fresh", "url": url}));
    let kept = c.call("load", json!({"name": "fresh", "coId": first}));
    assert_eq!((kept["deleted"].as_bool(), &kept["content"]), (Some(false), &json!({"n": 1})), "{kept}");
    let gone = c.call("load", json!({"name": "fresh", "coId": second}));
    assert_eq!((gone["deleted"].as_bool(), &gone["content"]), (Some(true), &json!({})), "{gone}");
}

/// The API Jazz apps use, not just cojson underneath it: two jazz-tools 0.20.19 workers
/// (`startWorker` with a sync server URL, separate accounts, no shared storage) share a
/// `co.list` of `co.map`s through moai, with live edits both ways
/// (interop/jazz-tools-check.mjs does the steps and reports one JSON line).
#[test]
fn jazz_tools_workers_share_a_list_through_moai() {
    let server = Server::start(&[]);
    server.wait_ready();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/jazz-tools-check.mjs");
    let out = std::process::Command::new("node")
        .arg(&script)
        .args(["--url", &sync_url(&server), "--timeout-ms", "30000"])
        .output()
        .expect("node must be installed to run interop tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!("no JSON report ({e}); stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    assert_eq!(report["ok"], true, "{report}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    assert_eq!(report["versions"]["jazz-tools"], "0.20.19", "{report}");
    for step in ["a.create", "b.load", "b.subscribe", "a.setDone", "b.push"] {
        assert!(!report["steps"][step].is_null(), "step {step} missing: {report}");
    }
}

#[test]
fn malformed_frames_are_ignored_and_pings_arrive() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut c = NodeDriver::cojson();
    let url = sync_url(&server);
    let r = c.call(
        "sendRaw",
        json!({"name": "raw", "url": url, "frames": ["{not json", "[]", "{\"action\":\"nonsense\"}"], "collectMs": 1700, "keepPings": true}),
    );
    assert_eq!(r["closeCode"], Value::Null, "{r}");
    assert!(r["pings"].as_u64().unwrap() >= 2, "a ping at accept and every 1.5 s: {r}");
}

/// A reconnect storm: many clients arrive at once, each asking for a CoValue it already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_reconnecting_clients_are_all_answered() {
    let server = Server::start(&[]);
    server.wait_ready();
    let url = sync_url(&server);
    let (map, known) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            let mut c = NodeDriver::cojson();
            let (_g, map, _l) = seed(&mut c, &url);
            let known = c.call("inspect", json!({"name": "a", "coId": map}))["known"].clone();
            (map, known)
        }
    })
    .await
    .unwrap();
    let load =
        json!({"action": "load", "id": map, "header": known["header"], "sessions": known["sessions"]}).to_string();
    for wave in 0..4 {
        let mut clients = Vec::new();
        for _ in 0..250 {
            let (url, load) = (url.clone(), load.clone());
            clients.push(tokio::spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
                ws.send(WsMessage::Text(load.into())).await.unwrap();
                loop {
                    let msg = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("answered in time");
                    if let Some(Ok(WsMessage::Text(t))) = msg {
                        for line in t.lines() {
                            let v: Value = serde_json::from_str(line).unwrap();
                            if v["action"] == "known" {
                                return v;
                            }
                        }
                    }
                }
            }));
        }
        for client in clients {
            let known_reply = client.await.unwrap();
            assert_eq!(known_reply["header"], true, "wave {wave}: {known_reply}");
        }
    }
}
