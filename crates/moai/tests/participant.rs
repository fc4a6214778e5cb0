//! Participant mode, first slice: `moai agent generate`, the PEER_ID/PEER_SECRET check at start,
//! the server's own account created on first start through the same verified path as client
//! content (a real cojson client loads it and reads the profile name), loaded again on later
//! starts, and `GET /profile`.

mod support;

use std::process::Command;

use serde_json::json;
use support::node_driver::NodeDriver;
use support::{json, Server, BIN};

fn generate() -> (String, String) {
    let out = Command::new(BIN).args(["agent", "generate"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in {text}"))
            .to_owned()
    };
    (value("PEER_ID"), value("PEER_SECRET"))
}

#[test]
fn agent_generate_makes_an_identity_and_writes_it_into_an_env_file_without_printing_the_secret() {
    let (id, secret) = generate();
    assert!(id.starts_with("co_z"), "{id}");
    assert!(secret.starts_with("sealerSecret_z") && secret.contains("/signerSecret_z"), "a cojson agent secret");
    let (id2, _) = generate();
    assert_ne!(id, id2, "fresh randomness each time");

    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join(".env");
    std::fs::write(&env, "KEEP=1\nPEER_ID=co_zold\nexport PEER_SECRET=old\nOTHER=2\n").unwrap();
    let out = Command::new(BIN).args(["agent", "generate", "--write-env"]).arg(&env).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains("Secret_z"), "the secret is never printed with --write-env: {stdout}");
    let written = std::fs::read_to_string(&env).unwrap();
    assert!(written.contains("KEEP=1\n") && written.contains("OTHER=2\n"));
    assert!(!written.contains("co_zold") && !written.contains("=old"));
    assert_eq!(written.matches("PEER_ID=").count(), 1);
    assert_eq!(written.matches("PEER_SECRET=").count(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&env).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_peer_id_that_is_not_the_secrets_account_refuses_the_start() {
    let (id, _) = generate();
    let (_, secret) = generate();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--port", "0", "--db-path"])
        .arg(dir.path().join("db"))
        .env("PEER_ID", &id)
        .env("PEER_SECRET", &secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PEER_ID"), "{stderr}");
    assert!(!stderr.contains(&secret) && !stderr.contains("Secret_z"), "the secret is never echoed: {stderr}");
}

#[test]
fn the_server_creates_its_account_once_and_a_real_cojson_client_reads_its_profile() {
    let (id, secret) = generate();
    let keep = tempfile::tempdir().unwrap();
    let db = keep.path().join("moai.db");
    let start = || {
        let s = Server::start_with_env(
            tempfile::tempdir().unwrap(),
            &db,
            &["--peer-name", "moai test agent"],
            &[("PEER_ID", id.as_str()), ("PEER_SECRET", secret.as_str())],
        );
        s.wait_ready();
        s
    };
    let server = start();
    let profile = json(&server.get("/profile").1);
    assert_eq!(profile["accountId"], id.as_str(), "{profile}");
    assert_eq!(profile["profileName"], "moai test agent", "{profile}");
    let profile_id = profile["profileId"].as_str().unwrap().to_owned();

    // A real cojson client loads the server's account and reads its profile through moai.
    let mut c = NodeDriver::cojson();
    c.call("createAccount", json!({"name": "reader", "url": server.ws_url("/sync")}));
    let account = c.call("load", json!({"name": "reader", "coId": id}));
    assert_eq!(account["available"], true, "{account}");
    let map = c.call("getMap", json!({"name": "reader", "coId": profile_id}));
    assert_eq!(map["map"]["name"], "moai test agent", "{map}");
    drop(c);

    // Restarted: the account is loaded, not created again.
    drop(server);
    let server = start();
    let again = json(&server.get("/profile").1);
    assert_eq!(again["profileId"], profile_id.as_str(), "{again}");
    assert_ne!(again["sessionId"], profile["sessionId"], "a fresh session per start");
}

#[test]
fn without_peer_secret_there_is_no_profile() {
    let server = Server::start(&[]);
    server.wait_ready();
    let (status, body) = server.get("/profile");
    assert_eq!(status, 404);
    assert!(body.contains("PEER_SECRET"), "{body}");
}

fn start_agent(extra: &[&str], env: &[(&str, &str)]) -> (Server, String) {
    let (id, secret) = generate();
    let mut all = vec![("PEER_ID", id.as_str()), ("PEER_SECRET", secret.as_str())];
    all.extend_from_slice(env);
    let keep = tempfile::tempdir().unwrap();
    let db = keep.path().join("moai.db");
    let s = Server::start_with_env(keep, &db, extra, &all);
    s.wait_ready();
    (s, id)
}

fn post(server: &Server, path: &str, headers: &[(&str, &str)], body: serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = support::http(server.addr, "POST", path, headers, body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

#[test]
fn the_agent_api_reads_what_a_client_shares_with_the_server_and_writes_into_it() {
    let (server, server_account) = start_agent(&[], &[]);
    let mut c = NodeDriver::cojson();
    let alice = c.call("createAccount", json!({"name": "alice", "url": server.ws_url("/sync")}))["accountId"]
        .as_str()
        .unwrap()
        .to_owned();
    let group = c.call("createGroup", json!({"name": "alice"}))["groupId"].as_str().unwrap().to_owned();
    c.call(
        "addMember",
        json!({"name": "alice", "groupId": group, "memberAccountId": server_account, "role": "writer"}),
    );
    let map = c.call("createMap", json!({"name": "alice", "groupId": group, "init": {"title": "shared with moai"}}))
        ["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "alice"}));

    // Told about it, the server loads it, finds its role and records it.
    let (status, body) = post(&server, "/on-added", &[], json!({"coId": map}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["record"]["role"], "writer", "{body}");
    let profile = json(&server.get("/profile").1);
    assert_eq!(profile["given"][map.as_str()]["role"], "writer", "{profile}");

    // It writes into the client's (private) map; the client sees and verifies the write.
    let (status, body) = post(&server, "/trigger", &[], json!({"coId": map, "key": "reply", "value": "hi from moai"}));
    assert_eq!(status, 200, "{body}");
    c.call(
        "waitMap",
        json!({"name": "alice", "coId": map, "key": "reply", "equals": "hi from moai", "timeoutMs": 15000}),
    );

    // A map in a group the server is not in: refused.
    let other_group = c.call("createGroup", json!({"name": "alice"}))["groupId"].as_str().unwrap().to_owned();
    let private = c.call("createMap", json!({"name": "alice", "groupId": other_group, "init": {"x": 1}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "alice"}));
    assert_eq!(post(&server, "/on-added", &[], json!({"coId": private})).0, 403);
    assert_eq!(post(&server, "/trigger", &[], json!({"coId": private, "key": "k", "value": 1})).0, 403);

    // Client mistakes are 4xx with a reason, never a 500.
    assert_eq!(post(&server, "/on-added", &[], json!({"coId": "nope"})).0, 400);
    assert_eq!(post(&server, "/on-added", &[], json!({"coId": "co_zDoesNotExist"})).0, 404);
    let (status, _) = support::http(server.addr, "POST", "/on-added", &[], b"{not json");
    assert_eq!(status, 400);
    assert_eq!(post(&server, "/trigger", &[], json!({"coId": map})).0, 400);

    // The username registry: first come first served, idempotent, readable by everyone.
    let (status, body) = post(&server, "/register-human", &[], json!({"username": "alice", "accountId": alice}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(post(&server, "/register-human", &[], json!({"username": "alice", "accountId": alice})).0, 200);
    let (status, body) =
        post(&server, "/register-human", &[], json!({"username": "alice", "accountId": server_account}));
    assert_eq!(status, 409, "{body}");
    assert_eq!(post(&server, "/register-human", &[], json!({"username": "", "accountId": alice})).0, 400);
    assert_eq!(post(&server, "/register-human", &[], json!({"username": "a b", "accountId": alice})).0, 400);
    let registry = json(&server.get("/profile").1)["registryId"].as_str().unwrap().to_owned();
    let read = c.call("getMap", json!({"name": "alice", "coId": registry}));
    assert_eq!(read["map"]["alice"], alice.as_str(), "{read}");
}

#[test]
fn the_agent_api_denies_by_default_when_tokens_are_required() {
    let (server, _) = start_agent(&["--sync-shared-secret", "agent-secret"], &[]);
    let token = |extra: &[&str]| {
        let out = Command::new(BIN).args(["token", "ops", "--secret", "agent-secret"]).args(extra).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let get = |headers: &[(&str, &str)]| support::http(server.addr, "GET", "/profile", headers, b"").0;
    assert_eq!(get(&[]), 401);
    assert_eq!(get(&[("Authorization", "Jazz something")]), 401);
    let docs_only = format!("Bearer {}", token(&["--doc", "notes"]));
    assert_eq!(get(&[("Authorization", docs_only.as_str())]), 403);
    let plain = format!("Bearer {}", token(&[]));
    assert_eq!(get(&[("Authorization", plain.as_str())]), 200);
    let cojson = format!("Bearer {}", token(&["--doc", "notes", "--cojson"]));
    assert_eq!(get(&[("Authorization", cojson.as_str())]), 200);
    // Browser apps: a preflight is answered.
    let (status, _) = support::http(
        server.addr,
        "OPTIONS",
        "/profile",
        &[("Origin", "https://app.example"), ("Access-Control-Request-Method", "GET")],
        b"",
    );
    assert_eq!(status, 200);
}

/// Jazz auth tokens (what jazz-tools' `generateAuthToken` makes) on the agent API: the account
/// they name is the caller; a forged, expired or unknown one is refused; an account may register
/// a name only for itself and trigger writes only where it may write itself.
#[test]
fn jazz_auth_tokens_identify_accounts_on_the_agent_api() {
    let (server, server_account) = start_agent(&["--sync-shared-secret", "jazz-test-secret"], &[]);
    let mut c = NodeDriver::cojson();
    let token = {
        let out = Command::new(BIN).args(["token", "alice", "--secret", "jazz-test-secret"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let url = format!("{}?token={token}", server.ws_url("/sync"));
    let alice = c.call("createAccount", json!({"name": "alice", "url": url}))["accountId"].as_str().unwrap().to_owned();
    let bob = c.call("createAccount", json!({"name": "bob", "url": url}))["accountId"].as_str().unwrap().to_owned();
    let jazz = |c: &mut NodeDriver, name: &str, created_at: Option<u64>| {
        let mut args = json!({"name": name});
        if let Some(at) = created_at {
            args["createdAt"] = json!(at);
        }
        format!("Jazz {}", c.call("authToken", args)["token"].as_str().unwrap())
    };
    let alice_token = jazz(&mut c, "alice", None);
    let get = |auth: &str| support::http(server.addr, "GET", "/profile", &[("Authorization", auth)], b"").0;
    assert_eq!(get(&alice_token), 200);

    // Expired (jazz-tools accepts 60 s), forged (another account's id), garbage: 401.
    let old = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 - 120_000;
    assert_eq!(get(&jazz(&mut c, "alice", Some(old))), 401);
    let forged = alice_token.replace(&alice, &bob);
    assert_eq!(get(&forged), 401);
    assert_eq!(get("Jazz not-a-token"), 401);

    // Registering: for itself only.
    let auth = [("Authorization", alice_token.as_str())];
    assert_eq!(post(&server, "/register-human", &auth, json!({"username": "alice", "accountId": alice})).0, 200);
    assert_eq!(post(&server, "/register-human", &auth, json!({"username": "bobby", "accountId": bob})).0, 403);

    // Triggering: only where the caller may write. Alice's group has the server as writer;
    // Bob is only a reader there.
    let group = c.call("createGroup", json!({"name": "alice"}))["groupId"].as_str().unwrap().to_owned();
    c.call(
        "addMember",
        json!({"name": "alice", "groupId": group, "memberAccountId": server_account, "role": "writer"}),
    );
    c.call("addMember", json!({"name": "alice", "groupId": group, "memberAccountId": bob, "role": "reader"}));
    let map = c.call("createMap", json!({"name": "alice", "groupId": group, "init": {"n": 0}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "alice"}));
    let bob_token = jazz(&mut c, "bob", None);
    let as_bob = [("Authorization", bob_token.as_str())];
    assert_eq!(post(&server, "/trigger", &as_bob, json!({"coId": map, "key": "n", "value": 1})).0, 403);
    let (status, body) = post(&server, "/trigger", &auth, json!({"coId": map, "key": "n", "value": 2}));
    assert_eq!(status, 200, "{body}");
    c.call("waitMap", json!({"name": "alice", "coId": map, "key": "n", "equals": 2, "timeoutMs": 15000}));
}

/// `/trigger` on a CoList appends the value at the end, as the server, encrypted with the owner
/// group's key: a real client sees it after the items already there, and its own later append
/// after that. A key is refused for a list, and a missing key for a map.
#[test]
fn trigger_appends_to_a_colist_a_client_shared_with_the_server() {
    let (server, server_account) = start_agent(&[], &[]);
    let mut c = NodeDriver::cojson();
    c.call("createAccount", json!({"name": "alice", "url": server.ws_url("/sync")}));
    let group = c.call("createGroup", json!({"name": "alice"}))["groupId"].as_str().unwrap().to_owned();
    c.call(
        "addMember",
        json!({"name": "alice", "groupId": group, "memberAccountId": server_account, "role": "writer"}),
    );
    let list = c.call("createList", json!({"name": "alice", "groupId": group, "items": ["a", "b"]}))["listId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "alice"}));

    let (status, body) = post(&server, "/trigger", &[], json!({"coId": list, "value": {"from": "moai"}}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["appended"], true, "{body}");
    c.call(
        "waitList",
        json!({"name": "alice", "coId": list, "equals": ["a", "b", {"from": "moai"}], "timeoutMs": 15000}),
    );
    c.call("append", json!({"name": "alice", "coId": list, "value": "c"}));
    let (status, _) = post(&server, "/trigger", &[], json!({"coId": list, "value": "d"}));
    assert_eq!(status, 200);
    c.call(
        "waitList",
        json!({"name": "alice", "coId": list, "equals": ["a", "b", {"from": "moai"}, "c", "d"], "timeoutMs": 15000}),
    );

    let (status, body) = post(&server, "/trigger", &[], json!({"coId": list, "key": "k", "value": 1}));
    assert_eq!(status, 400, "{body}");
    let map = c.call("createMap", json!({"name": "alice", "groupId": group, "init": {"n": 0}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "alice"}));
    let (status, body) = post(&server, "/trigger", &[], json!({"coId": map, "value": 1}));
    assert_eq!(status, 400, "{body}");
}

/// `/create-map`: the server makes a CoMap in a new group of its own and extends that group into
/// a client's group, both ways cojson does it: sealed to the parent's group sealer when the
/// server is not a member there, under the parent's read key when it is. Real clients read the
/// map through the link, a writer link lets them write, and a Jazz account may do this only
/// for a group it is a member of.
#[test]
fn create_map_shares_a_new_map_with_a_clients_group_through_a_parent_link() {
    let (server, server_account) = start_agent(&[], &[]);
    let mut c = NodeDriver::cojson();
    let url = server.ws_url("/sync");
    c.call("createAccount", json!({"name": "alice", "url": url}));
    let bob = c.call("createAccount", json!({"name": "bob", "url": url}))["accountId"].as_str().unwrap().to_owned();
    let carol = c.call("createAccount", json!({"name": "carol", "url": url}));
    let _ = carol;

    // Alice's group, which the server is not in; Bob reads there.
    let p = c.call("createGroup", json!({"name": "alice"}))["groupId"].as_str().unwrap().to_owned();
    c.call("addMember", json!({"name": "alice", "groupId": p, "memberAccountId": bob, "role": "reader"}));
    c.call("waitSynced", json!({"name": "alice"}));
    let (status, body) =
        post(&server, "/create-map", &[], json!({"parent": p, "role": "writer", "init": {"hello": "from moai"}}));
    assert_eq!(status, 200, "{body}");
    let map = body["mapId"].as_str().unwrap().to_owned();
    let read = c.call("getMap", json!({"name": "alice", "coId": map}));
    assert_eq!(read["map"]["hello"], "from moai", "{read}");
    // The writer link lets Alice write; Bob (a reader of P, capped by the link to writer) sees it.
    c.call("setKey", json!({"name": "alice", "coId": map, "key": "reply", "value": "hi moai"}));
    c.call("waitMap", json!({"name": "bob", "coId": map, "key": "reply", "equals": "hi moai", "timeoutMs": 15000}));

    // A group the server is a member of: the key goes under the group's own read key.
    let p2 = c.call("createGroup", json!({"name": "alice"}))["groupId"].as_str().unwrap().to_owned();
    c.call("addMember", json!({"name": "alice", "groupId": p2, "memberAccountId": server_account, "role": "reader"}));
    c.call("waitSynced", json!({"name": "alice"}));
    let (status, body) = post(&server, "/create-map", &[], json!({"parent": p2, "init": {"n": 2}}));
    assert_eq!(status, 200, "{body}");
    let read = c.call("getMap", json!({"name": "alice", "coId": body["mapId"]}));
    assert_eq!(read["map"]["n"], 2, "{read}");

    // Jazz accounts: only for a group they are in.
    let jazz = |c: &mut NodeDriver, name: &str| {
        format!("Jazz {}", c.call("authToken", json!({"name": name}))["token"].as_str().unwrap())
    };
    let as_bob = jazz(&mut c, "bob");
    let as_carol = jazz(&mut c, "carol");
    assert_eq!(post(&server, "/create-map", &[("Authorization", as_bob.as_str())], json!({"parent": p})).0, 200);
    assert_eq!(post(&server, "/create-map", &[("Authorization", as_carol.as_str())], json!({"parent": p})).0, 403);
    // Client mistakes.
    assert_eq!(post(&server, "/create-map", &[], json!({"parent": p, "role": "owner"})).0, 400);
    assert_eq!(post(&server, "/create-map", &[], json!({"parent": p, "init": [1]})).0, 400);
    assert_eq!(post(&server, "/create-map", &[], json!({"parent": "co_zNotThere"})).0, 404);
}
