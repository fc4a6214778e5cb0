//! Agent mode (docs/participant.md): moai A runs with `PEER_MODE=agent` and `PEER_MOAI` naming
//! moai B, the hub. With real cojson clients on both: the agent's account reaches the hub;
//! content a client of B shares with the agent reaches a client of A and back, live; and when
//! B is killed and restarted, A links again and what was written meanwhile crosses.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::node_driver::NodeDriver;
use support::{closed_port, json, Server, BIN};

fn generate() -> (String, String) {
    let out = Command::new(BIN).args(["agent", "generate"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let value = |key: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap().to_owned();
    (value("PEER_ID"), value("PEER_SECRET"))
}

fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = support::http(server.addr, "POST", path, &[], body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Polls the agent's `/profile` until its upstream link matches `want` (the link's own report;
/// polling is how a client would watch it too).
fn wait_upstream(agent: &Server, want: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let profile = json(&agent.get("/profile").1);
        if want(&profile["upstream"]) {
            return profile;
        }
        assert!(Instant::now() < deadline, "agent never {what}: {profile}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Hub {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    port: String,
    server: Option<Server>,
}

impl Hub {
    fn start() -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hub.db");
        let mut hub = Hub { _dir: dir, db, port: closed_port().to_string(), server: None };
        hub.up();
        hub
    }

    fn up(&mut self) {
        let server = Server::start_in(tempfile::tempdir().unwrap(), &self.db, &["--port", &self.port]);
        server.wait_ready();
        self.server = Some(server);
    }

    fn kill(&mut self) {
        let mut server = self.server.take().unwrap();
        server.signal("KILL");
        server.wait_exit(Duration::from_secs(15)).expect("hub stopped");
    }

    fn url(&self) -> String {
        self.server.as_ref().unwrap().ws_url("/sync")
    }
}

#[test]
fn an_agent_and_its_hub_share_content_both_ways_and_relink_after_the_hub_restarts() {
    let mut hub = Hub::start();
    let (agent_id, secret) = generate();
    let keep = tempfile::tempdir().unwrap();
    let agent_db = keep.path().join("agent.db");
    let peer_moai = format!("127.0.0.1:{}", hub.port);
    let agent = Server::start_with_env(
        keep,
        &agent_db,
        &["--peer-name", "the agent"],
        &[
            ("PEER_ID", agent_id.as_str()),
            ("PEER_SECRET", secret.as_str()),
            ("PEER_MODE", "agent"),
            ("PEER_MOAI", peer_moai.as_str()),
        ],
    );
    agent.wait_ready();
    let profile = wait_upstream(&agent, |u| u["connected"] == true, "linked");
    assert_eq!(profile["upstream"]["url"], format!("ws://{peer_moai}/sync"), "{profile}");
    let agent_url = agent.ws_url("/sync");

    // The agent's account (created locally) reached the hub: a client there loads it and reads
    // the agent's profile name.
    let mut c = NodeDriver::cojson();
    c.call("createAccount", json!({"name": "alice", "url": hub.url()}));
    let account = c.call("load", json!({"name": "alice", "coId": agent_id}));
    assert_eq!(account["available"], true, "{account}");
    let profile_id = profile["profileId"].as_str().unwrap();
    let read = c.call("getMap", json!({"name": "alice", "coId": profile_id}));
    assert_eq!(read["map"]["name"], "the agent", "{read}");

    // Alice (a client of the hub) shares a map with the agent: a group anyone may write, the
    // agent added as writer by name.
    let group =
        c.call("createGroup", json!({"name": "alice", "everyone": "writer"}))["groupId"].as_str().unwrap().to_owned();
    c.call("addMember", json!({"name": "alice", "groupId": group, "memberAccountId": agent_id, "role": "writer"}));
    let map = c.call("createMap", json!({"name": "alice", "groupId": group, "init": {"title": "from the hub"}}))
        ["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "alice"}));

    // Told about it, the agent brings it from the hub and finds its role there.
    let (status, body) = post(&agent, "/on-added", json!({"coId": map}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["record"]["role"], "writer", "{body}");

    // Carol, a client of the agent, reads what Alice wrote on the hub…
    c.call("createAccount", json!({"name": "carol", "url": agent_url}));
    let read = c.call("getMap", json!({"name": "carol", "coId": map}));
    assert_eq!(read["map"]["title"], "from the hub", "{read}");
    // …and writes back: the hub verifies Carol's session (her account, which only the agent
    // had, crosses as the dependency the hub asks for) and Alice sees it.
    c.call("setKey", json!({"name": "carol", "coId": map, "key": "fromAgent", "value": "carol"}));
    c.call("waitMap", json!({"name": "alice", "coId": map, "key": "fromAgent", "equals": "carol", "timeoutMs": 20000}));
    // The agent's own write crosses too, and Alice's live edits reach Carol.
    let (status, body) = post(&agent, "/trigger", json!({"coId": map, "key": "agent", "value": "hi"}));
    assert_eq!(status, 200, "{body}");
    c.call("waitMap", json!({"name": "alice", "coId": map, "key": "agent", "equals": "hi", "timeoutMs": 20000}));
    c.call("setKey", json!({"name": "alice", "coId": map, "key": "live", "value": 1}));
    c.call("waitMap", json!({"name": "carol", "coId": map, "key": "live", "equals": 1, "timeoutMs": 20000}));

    // The hub dies. The agent notices, keeps serving its own clients, and links again once the
    // hub is back on the same address; what was written on either side meanwhile crosses.
    hub.kill();
    wait_upstream(&agent, |u| u["connected"] == false, "noticed the hub is gone");
    c.call("setKey", json!({"name": "carol", "coId": map, "key": "whileDown", "value": 2}));
    c.call("waitSynced", json!({"name": "carol"}));
    hub.up();
    wait_upstream(&agent, |u| u["connected"] == true && u["links"].as_u64() >= Some(2), "linked again");
    c.call("waitMap", json!({"name": "alice", "coId": map, "key": "whileDown", "equals": 2, "timeoutMs": 30000}));
    c.call("setKey", json!({"name": "alice", "coId": map, "key": "afterRestart", "value": 3}));
    c.call("waitMap", json!({"name": "carol", "coId": map, "key": "afterRestart", "equals": 3, "timeoutMs": 30000}));
}

#[test]
fn agent_mode_settings_that_cannot_work_refuse_the_start() {
    let (id, secret) = generate();
    let dir = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .args(["serve", "--port", "0", "--db-path"])
            .arg(dir.path().join("db"))
            .env_remove("PEER_MODE")
            .env_remove("PEER_MOAI")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env:?} must refuse the start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let creds = [("PEER_ID", id.as_str()), ("PEER_SECRET", secret.as_str())];
    let err = run(&[creds[0], creds[1], ("PEER_MODE", "agent")]);
    assert!(err.contains("PEER_MOAI"), "{err}");
    let err = run(&[("PEER_MODE", "agent"), ("PEER_MOAI", "127.0.0.1:9")]);
    assert!(err.contains("PEER_SECRET"), "{err}");
    let err = run(&[creds[0], creds[1], ("PEER_MOAI", "127.0.0.1:9")]);
    assert!(err.contains("PEER_MODE=agent"), "{err}");
    let err = run(&[creds[0], creds[1], ("PEER_MODE", "agent"), ("PEER_MOAI", "http://x/y")]);
    assert!(err.contains("PEER_MOAI"), "{err}");
    assert!(!err.contains(&secret), "the secret is never echoed");
}

/// A hub that requires tokens: the agent links with `PEER_MOAI_TOKEN` (sent as a bearer
/// token), and one with a wrong token stays unlinked and says why on `/profile`.
#[test]
fn the_agent_presents_its_token_to_a_hub_that_requires_one() {
    let hub = Server::start(&["--sync-shared-secret", "hub-secret"]);
    hub.wait_ready();
    let token = {
        let out = Command::new(BIN).args(["token", "agent", "--secret", "hub-secret"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let agent = |token: &str| {
        let (id, secret) = generate();
        let keep = tempfile::tempdir().unwrap();
        let db = keep.path().join("agent.db");
        let peer_moai = format!("127.0.0.1:{}", hub.addr.port());
        let s = Server::start_with_env(
            keep,
            &db,
            &[],
            &[
                ("PEER_ID", id.as_str()),
                ("PEER_SECRET", secret.as_str()),
                ("PEER_MODE", "agent"),
                ("PEER_MOAI", peer_moai.as_str()),
                ("PEER_MOAI_TOKEN", token),
            ],
        );
        s.wait_ready();
        (s, id)
    };
    let (good, good_id) = agent(&token);
    wait_upstream(&good, |u| u["connected"] == true, "linked with its token");
    // Its account is on the hub: a client there (with a token of its own) loads it.
    let mut c = NodeDriver::cojson();
    let client_token = {
        let out = Command::new(BIN).args(["token", "carol", "--secret", "hub-secret"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    c.call("createAccount", json!({"name": "carol", "url": format!("{}?token={client_token}", hub.ws_url("/sync"))}));
    assert_eq!(c.call("load", json!({"name": "carol", "coId": good_id}))["available"], true);

    let (bad, _) = agent("not-a-token");
    // moai answers the upgrade and closes with 4401 and the reason.
    let profile = wait_upstream(&bad, |u| u["lastError"].as_str().is_some_and(|e| e.contains("4401")), "refused");
    assert_eq!(
        (&profile["upstream"]["connected"], &profile["upstream"]["links"]),
        (&json!(false), &json!(0)),
        "{profile}"
    );
    assert!(!profile.to_string().contains("not-a-token"), "the token is never shown: {profile}");
}

/// An upstream that sends a message larger than the agent's `--max-frame-bytes` ends the link
/// (the agent never holds more from upstream than from a local client) and is retried.
#[test]
fn an_upstream_message_over_the_frame_limit_ends_the_link() {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::{accept, Message};

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let links = Arc::new(AtomicUsize::new(0));
    let counted = links.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let Ok(mut ws) = accept(stream) else { return };
                // 2 MiB of one line, over the agent's 1 MiB limit.
                let _ = ws.send(Message::text("x".repeat(2 << 20)));
                while ws.read().is_ok() {}
            });
        }
    });

    let (id, secret) = generate();
    let keep = tempfile::tempdir().unwrap();
    let db = keep.path().join("agent.db");
    let peer_moai = format!("127.0.0.1:{port}");
    let agent = Server::start_with_env(
        keep,
        &db,
        &["--max-frame-bytes", "1MiB"],
        &[
            ("PEER_ID", id.as_str()),
            ("PEER_SECRET", secret.as_str()),
            ("PEER_MODE", "agent"),
            ("PEER_MOAI", peer_moai.as_str()),
        ],
    );
    agent.wait_ready();
    let profile = wait_upstream(
        &agent,
        |u| u["lastError"].as_str().is_some_and(|e| e.contains("too long")),
        "refused the oversized message",
    );
    assert_eq!(
        (&profile["upstream"]["connected"], &profile["upstream"]["links"]),
        (&json!(false), &json!(0)),
        "{profile}"
    );
    // It keeps trying (with backoff), and stays ready for its own clients.
    let deadline = Instant::now() + Duration::from_secs(20);
    while links.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the agent never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(agent.get("/health").0, 200);
}
