//! Unmodified npm `yjs` + `y-websocket` clients against moai: the behaviour app users rely on.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::node_driver::NodeDriver;
use support::{closed_port, Server};

fn base(server: &Server) -> String {
    server.ws_url("/sync/v1")
}

#[test]
fn late_joiner_gets_the_full_state_and_live_edits_flow_both_ways() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut c = NodeDriver::yjs();
    let url = base(&server);
    c.connect("a", &url, "notes", json!({}));
    c.call("waitSynced", json!({"name": "a"}));
    c.call("insertText", json!({"name": "a", "text": "hello"}));
    // The writer goes offline once the server holds its edit, so the late joiner can only have
    // it from the server.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !support::http(server.addr, "GET", "/api/v1/docs/notes/update", &[], b"").1.contains("hello") {
        assert!(std::time::Instant::now() < deadline, "the server never had the edit");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.call("disconnect", json!({"name": "a"}));
    c.connect("b", &url, "notes", json!({}));
    c.call("waitText", json!({"name": "b", "equals": "hello"}));
    c.call("reconnect", json!({"name": "a"}));
    c.call("waitSynced", json!({"name": "a"}));
    c.call("insertText", json!({"name": "b", "text": " world"}));
    c.call("waitText", json!({"name": "a", "equals": "hello world"}));
    c.call("setMap", json!({"name": "a", "key": "k", "value": {"n": 1}}));
    c.call("waitMap", json!({"name": "b", "key": "k", "equals": {"n": 1}}));
}

#[test]
fn concurrent_edits_converge() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut c = NodeDriver::yjs();
    let url = base(&server);
    for name in ["a", "b"] {
        c.connect(name, &url, "race", json!({}));
        c.call("waitSynced", json!({"name": name}));
    }
    // Both edit at the same position before seeing each other's edit.
    let ia = c.send("insertText", json!({"name": "a", "index": 0, "text": "AAA"}));
    let ib = c.send("insertText", json!({"name": "b", "index": 0, "text": "BBB"}));
    c.reply(ia);
    c.reply(ib);
    c.call("waitText", json!({"name": "a", "contains": "AAA"}));
    let wa = c.call("waitText", json!({"name": "a", "contains": "BBB"}));
    let wb = c.call("waitText", json!({"name": "b", "equals": wa["text"]}));
    assert_eq!(wa["text"].as_str().unwrap().len(), 6);
    assert_eq!(wa["text"], wb["text"]);
}

#[test]
fn awareness_flows_both_ways_and_an_abrupt_drop_removes_presence() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut c = NodeDriver::yjs();
    let url = base(&server);
    c.connect("a", &url, "room", json!({"awarenessState": {"user": "ann"}}));
    c.connect("b", &url, "room", json!({"awarenessState": {"user": "bob"}}));
    c.call("waitAwareness", json!({"name": "a", "hasStateWith": {"user": "bob"}}));
    c.call("waitAwareness", json!({"name": "b", "hasStateWith": {"user": "ann"}}));
    c.call("setAwareness", json!({"name": "a", "state": {"user": "ann", "cursor": 3}}));
    c.call("waitAwareness", json!({"name": "b", "hasStateWith": {"user": "ann", "cursor": 3}}));
    // The network drops A: no close frame, no goodbye. The server must tell B.
    c.call("dropSocket", json!({"name": "a", "mode": "reset", "stayOffline": true}));
    c.call("waitAwareness", json!({"name": "b", "lacksStateWith": {"user": "ann"}, "timeoutMs": 5000}));
    // And when A comes back its presence is accepted at once, not after a 15 s renewal.
    c.call("reconnect", json!({"name": "a"}));
    c.call("waitAwareness", json!({"name": "b", "hasStateWith": {"user": "ann"}, "timeoutMs": 5000}));
}

#[test]
fn simultaneous_first_connections_share_one_document() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut c = NodeDriver::yjs();
    let url = base(&server);
    for round in 0..20 {
        let room = format!("fresh-{round}");
        let names: Vec<String> = (0..3).map(|i| format!("r{round}c{i}")).collect();
        for n in &names {
            c.send("connect", json!({"name": n, "url": url, "room": room}));
        }
        let waits: Vec<u64> = names.iter().map(|n| c.send("waitSynced", json!({"name": n}))).collect();
        for w in waits {
            assert_eq!(c.reply(w)["ok"], true);
        }
        for (i, n) in names.iter().enumerate() {
            c.call("insertText", json!({"name": n, "index": 0, "text": format!("{i}")}));
        }
        for n in &names {
            let v = c.call("waitText", json!({"name": n, "contains": "0", "timeoutMs": 5000}));
            let v2 = c.call("waitText", json!({"name": n, "contains": "1", "timeoutMs": 5000}));
            let v3 = c.call("waitText", json!({"name": n, "contains": "2", "timeoutMs": 5000}));
            assert!(v["ok"] == true && v2["ok"] == true && v3["ok"] == true, "round {round}: {n} diverged");
        }
        for n in &names {
            c.call("destroy", json!({"name": n}));
        }
    }
}

/// Stops `server` with `signal` and starts a new one on the same port and database.
fn restart(mut server: Server, signal: &str, db: &std::path::Path, port: &str) -> Server {
    server.signal(signal);
    server.wait_exit(Duration::from_secs(15)).expect("server stopped");
    drop(server);
    let server = Server::start_in(tempfile::tempdir().unwrap(), db, &["--port", port]);
    server.wait_ready();
    server
}

/// Restart the server on the same port and database, by signal or by kill -9.
fn restart_keeps_what_clients_saw(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let port = closed_port().to_string();
    let server = Server::start_in(tempfile::tempdir().unwrap(), &db, &["--port", &port]);
    server.wait_ready();
    let mut c = NodeDriver::yjs();
    let url = base(&server);
    c.connect("a", &url, "doc", json!({}));
    c.connect("b", &url, "doc", json!({}));
    c.call("waitSynced", json!({"name": "b"}));
    for i in 0..20 {
        c.call("insertText", json!({"name": "a", "text": format!("{i},")}));
    }
    let seen = c.call("waitText", json!({"name": "b", "contains": "19,"}))["text"].clone();
    // Every client goes away before the restart, so nobody can re-upload what the server lost:
    // a fresh client after the restart sees everything B saw only if the server kept it.
    c.call("destroy", json!({"name": "a"}));
    c.call("destroy", json!({"name": "b"}));
    let _server = restart(server, signal, &db, &port);
    c.connect("fresh", &url, "doc", json!({}));
    c.call("waitSynced", json!({"name": "fresh"}));
    assert_eq!(c.text("fresh"), seen.as_str().unwrap());
}

#[test]
fn sigterm_restart_keeps_every_update_another_client_saw() {
    restart_keeps_what_clients_saw("TERM");
}

#[test]
fn kill_9_restart_keeps_every_update_another_client_saw() {
    restart_keeps_what_clients_saw("KILL");
}

#[test]
fn offline_edits_of_two_clients_merge_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let port = closed_port().to_string();
    let mut server = Server::start_in(tempfile::tempdir().unwrap(), &db, &["--port", &port]);
    server.wait_ready();
    let mut c = NodeDriver::yjs();
    let url = base(&server);
    c.connect("a", &url, "trip", json!({"maxBackoffTime": 300}));
    c.connect("b", &url, "trip", json!({"maxBackoffTime": 300}));
    c.call("waitSynced", json!({"name": "a"}));
    c.call("insertText", json!({"name": "a", "text": "base."}));
    c.call("waitText", json!({"name": "b", "equals": "base."}));

    // Both go offline (the server is stopped) and edit; the edits meet after the restart.
    let wa = c.send("waitClosed", json!({"name": "a"}));
    let wb = c.send("waitClosed", json!({"name": "b"}));
    server.signal("TERM");
    server.wait_exit(Duration::from_secs(15)).expect("stopped");
    assert_eq!(c.reply(wa)["ok"], true);
    assert_eq!(c.reply(wb)["ok"], true);
    c.call("insertText", json!({"name": "a", "text": "A-offline."}));
    c.call("insertText", json!({"name": "b", "text": "B-offline."}));
    let server = Server::start_in(tempfile::tempdir().unwrap(), &db, &["--port", &port]);
    server.wait_ready();
    for n in ["a", "b"] {
        c.call("waitText", json!({"name": n, "contains": "A-offline.", "timeoutMs": 15000}));
        c.call("waitText", json!({"name": n, "contains": "B-offline.", "timeoutMs": 15000}));
    }
    assert_eq!(c.text("a"), c.text("b"));
    assert!(c.text("a").starts_with("base."));
}

#[test]
fn auth_accepts_good_tokens_and_stops_clients_with_4401_and_4403() {
    let server = Server::start(&["--sync-shared-secret", "topsecret"]);
    server.wait_ready();
    let auth = moai_server::Auth::with_secret("topsecret");
    let mint = |exp: Option<u64>, docs: Option<Vec<&str>>| {
        auth.mint(&moai_server::auth::Claims {
            sub: "u1".into(),
            exp,
            docs: docs.map(|d| d.into_iter().map(String::from).collect()),
            ..Default::default()
        })
        .unwrap()
    };
    let mut c = NodeDriver::yjs();
    let url = base(&server);
    let good = mint(None, None);
    c.connect("query", &url, "doc", json!({"params": {"token": good}}));
    c.call("waitSynced", json!({"name": "query"}));
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&good);
    c.connect("proto", &url, "doc", json!({"protocols": ["yjs", format!("bearer.{b64}")]}));
    c.call("waitSynced", json!({"name": "proto"}));

    c.connect("none", &url, "doc", json!({}));
    let closed = c.call("waitClosed", json!({"name": "none"}));
    assert_eq!((closed["code"].as_u64(), closed["terminal"].as_bool()), (Some(4401), Some(true)), "{closed}");

    c.connect("expired", &url, "doc", json!({"params": {"token": mint(Some(1), None)}}));
    let closed = c.call("waitClosed", json!({"name": "expired"}));
    assert_eq!((closed["code"].as_u64(), closed["terminal"].as_bool()), (Some(4403), Some(true)), "{closed}");

    c.connect("scope", &url, "doc", json!({"params": {"token": mint(None, Some(vec!["other"]))}}));
    let closed = c.call("waitClosed", json!({"name": "scope"}));
    assert_eq!(closed["code"].as_u64(), Some(4403), "{closed}");
    // A refused client does not keep retrying.
    let stats = c.call("stats", json!({"name": "none"}));
    assert_eq!(stats["closeCount"], 1, "{stats}");
}

#[test]
fn a_silent_dead_peer_is_closed_by_the_ping_timeout() {
    let server = Server::start(&["--yjs-ping-interval", "200ms"]);
    server.wait_ready();
    let mut c = NodeDriver::yjs();
    // The ghost connects alone first, so the first session opened is its: that gives its peer
    // address, to tell its close from any other.
    c.connect("ghost", &base(&server), "doc", json!({"awarenessState": {"user": "ghost"}}));
    c.call("waitSynced", json!({"name": "ghost"}));
    let opened = server.wait_log("session open", Duration::from_secs(10)).expect("the ghost's session open");
    let ghost_peer = serde_json::from_str::<serde_json::Value>(&opened).unwrap()["peer"].clone();
    assert!(ghost_peer.as_str().is_some_and(|p| p.contains("127.0.0.1")), "no peer address: {opened}");
    let watcher_connected = Instant::now();
    c.connect("watcher", &base(&server), "doc", json!({}));
    c.call("waitAwareness", json!({"name": "watcher", "hasStateWith": {"user": "ghost"}}));
    c.call("dropSocket", json!({"name": "ghost", "mode": "silent", "stayOffline": true}));

    // The ghost's session is closed for missing pongs (two pings, about 3 intervals). The bound
    // is generous (150 intervals, for a busy machine) yet far below the 60 s or more it would
    // take if the 200 ms interval were not applied (default 30 s).
    let is_ghost_close = |l: &str| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["message"] == "session closed" && v["peer"] == ghost_peer)
    };
    let line = server
        .wait_log_where(is_ghost_close, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the silent ghost was not closed within 30 s: {:#?}", server.logs()));
    let close: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(close["reason"], "no pong to two pings", "{line}");
    assert_eq!(close["code"], 1001, "{line}");

    // The server tells the watcher the ghost is gone. The watcher's own awareness timeout
    // (y-protocols: 30 s after it received the ghost's state, so after `watcher_connected`) would
    // remove the ghost too; the wait ends well before that, so only the server can satisfy it.
    let left = Duration::from_secs(27).saturating_sub(watcher_connected.elapsed());
    assert!(left >= Duration::from_secs(2), "too slow to tell the server's removal from the client's own timeout");
    c.call(
        "waitAwareness",
        json!({"name": "watcher", "lacksStateWith": {"user": "ghost"}, "timeoutMs": left.as_millis() as u64}),
    );
}
