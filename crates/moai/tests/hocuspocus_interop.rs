//! Unmodified `@hocuspocus/provider` clients (4.x and 3.x, interop/hocuspocus-driver.mjs) against
//! moai's `/hocuspocus`, alone and together with y-websocket clients on the same documents
//! (docs/protocols/hocuspocus.md).

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::node_driver::NodeDriver;
use support::Server;

fn hp_url(server: &Server) -> String {
    server.ws_url("/hocuspocus")
}

/// No provider threw on a frame from moai.
fn assert_clean(h: &mut NodeDriver, name: &str) -> Value {
    let stats = h.call("stats", json!({"name": name}));
    assert_eq!(stats["messageErrors"], json!([]), "{stats}");
    assert_eq!(stats["uncaughtExceptions"], 0, "{stats}");
    stats
}

fn mint(auth: &moai_server::Auth, f: impl FnOnce(&mut moai_server::auth::Claims)) -> String {
    let mut claims = moai_server::auth::Claims { sub: "u1".into(), ..Default::default() };
    f(&mut claims);
    auth.mint(&claims).unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn providers_3_and_4_converge_and_their_changes_are_acknowledged() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut h = NodeDriver::hocuspocus();
    let url = hp_url(&server);
    h.call("attach", json!({"name": "a", "url": url, "version": 4, "doc": "race"}));
    h.call("attach", json!({"name": "b", "url": url, "version": 3, "doc": "race"}));
    for name in ["a", "b"] {
        h.call("waitSynced", json!({"name": name}));
        // The acknowledgement of its SyncStep2 (the answer to our SyncStep1) brings it to 0.
        h.call("waitSaved", json!({"name": name}));
    }
    // Both edit at the same position before seeing each other's edit.
    let ia = h.send("insertText", json!({"name": "a", "index": 0, "text": "AAA"}));
    let ib = h.send("insertText", json!({"name": "b", "index": 0, "text": "BBB"}));
    h.reply(ia);
    h.reply(ib);
    let wa = h.call("waitText", json!({"name": "a", "contains": "BBB"}));
    let wb = h.call("waitText", json!({"name": "b", "equals": wa["text"]}));
    assert_eq!(wa["text"].as_str().unwrap().len(), 6);
    assert_eq!(wa["text"], wb["text"]);
    for i in 0..20 {
        h.call("insertText", json!({"name": if i % 2 == 0 { "a" } else { "b" }, "text": format!("{i}")}));
    }
    let done = h.call("waitText", json!({"name": "a", "contains": "19"}));
    h.call("waitText", json!({"name": "b", "equals": done["text"]}));
    // Every update was acknowledged once durable: nothing counts as unsaved.
    for name in ["a", "b"] {
        h.call("waitSaved", json!({"name": name}));
        let stats = assert_clean(&mut h, name);
        assert_eq!(stats["authenticated"], json!(["read-write"]), "{stats}");
    }
    // What they agreed on is what the server keeps.
    let (_, body) = server.get("/api/v1/docs/race/update");
    assert!(body.contains("19"), "the server lacks the last edit");
}

#[test]
fn hocuspocus_and_y_websocket_clients_share_edits_and_presence() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut h = NodeDriver::hocuspocus();
    let mut y = NodeDriver::yjs();
    h.call("attach", json!({"name": "h", "url": hp_url(&server), "doc": "shared", "awarenessState": {"user": "hana"}}));
    y.connect("y", &server.ws_url("/sync/v1"), "shared", json!({"awarenessState": {"user": "yuki"}}));
    h.call("waitSynced", json!({"name": "h"}));
    y.call("waitSynced", json!({"name": "y"}));

    h.call("insertText", json!({"name": "h", "text": "from hocuspocus. "}));
    y.call("waitText", json!({"name": "y", "contains": "from hocuspocus"}));
    y.call("insertText", json!({"name": "y", "text": "from y-websocket."}));
    h.call("waitText", json!({"name": "h", "equals": "from hocuspocus. from y-websocket."}));
    h.call("waitSaved", json!({"name": "h"}));

    h.call("waitAwareness", json!({"name": "h", "hasStateWith": {"user": "yuki"}}));
    y.call("waitAwareness", json!({"name": "y", "hasStateWith": {"user": "hana"}}));
    h.call("setAwareness", json!({"name": "h", "state": {"user": "hana", "cursor": 7}}));
    y.call("waitAwareness", json!({"name": "y", "hasStateWith": {"user": "hana", "cursor": 7}}));

    // The Hocuspocus socket drops without a goodbye: the server removes its presence for the
    // y-websocket client, and the provider comes back by itself with its state.
    h.call("dropSocket", json!({"name": "h"}));
    y.call("waitAwareness", json!({"name": "y", "lacksStateWith": {"user": "hana"}, "timeoutMs": 5000}));
    y.call("waitAwareness", json!({"name": "y", "hasStateWith": {"user": "hana"}, "timeoutMs": 15000}));
    h.call("waitSynced", json!({"name": "h"}));
    // And the other way: y-websocket leaves, the provider sees it go.
    y.call("disconnect", json!({"name": "y"}));
    h.call("waitAwareness", json!({"name": "h", "lacksStateWith": {"user": "yuki"}, "timeoutMs": 5000}));
    assert_clean(&mut h, "h");
    let ys = y.call("stats", json!({"name": "y"}));
    assert_eq!(ys["messageErrors"], json!([]), "{ys}");
}

#[test]
fn several_documents_share_one_socket() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut h = NodeDriver::hocuspocus();
    let url = hp_url(&server);
    h.call("socket", json!({"socket": "s4", "url": url, "version": 4}));
    h.call("socket", json!({"socket": "s3", "url": url, "version": 3}));
    for doc in ["d1", "d2", "d3"] {
        h.call("attach", json!({"name": format!("{doc}@4"), "socket": "s4", "doc": doc}));
    }
    for doc in ["d1", "d2"] {
        h.call("attach", json!({"name": format!("{doc}@3"), "socket": "s3", "doc": doc}));
    }
    for name in ["d1@4", "d2@4", "d3@4", "d1@3", "d2@3"] {
        h.call("waitSynced", json!({"name": name}));
    }
    h.call("insertText", json!({"name": "d1@4", "text": "one"}));
    h.call("insertText", json!({"name": "d2@3", "text": "two"}));
    h.call("insertText", json!({"name": "d3@4", "text": "three"}));
    h.call("waitText", json!({"name": "d1@3", "equals": "one"}));
    h.call("waitText", json!({"name": "d2@4", "equals": "two"}));
    for name in ["d1@4", "d2@3", "d3@4"] {
        h.call("waitSaved", json!({"name": name}));
    }
    // Each document kept to itself.
    assert_eq!(h.call("getText", json!({"name": "d1@4"}))["text"], "one");
    assert_eq!(h.call("getText", json!({"name": "d3@4"}))["text"], "three");
    // One connection per socket.
    assert_eq!(h.call("socketStats", json!({"socket": "s4"}))["opens"], 1);
    assert_eq!(h.call("socketStats", json!({"socket": "s3"}))["opens"], 1);

    // Provider 4's session awareness: two providers of one document on one socket.
    h.call("attach", json!({"name": "x1", "socket": "s4", "doc": "d1", "sessionAwareness": true}));
    h.call("attach", json!({"name": "x2", "socket": "s4", "doc": "d1", "sessionAwareness": true}));
    h.call("waitText", json!({"name": "x1", "equals": "one"}));
    // x2 appends after what it has: it must have "one" first, or its "+" lands before it.
    h.call("waitText", json!({"name": "x2", "equals": "one"}));
    h.call("insertText", json!({"name": "x2", "text": "+"}));
    h.call("waitText", json!({"name": "x1", "equals": "one+"}));
    h.call("waitText", json!({"name": "d1@3", "equals": "one+"}));

    // A detached document is left; the others go on.
    h.call("detach", json!({"name": "d2@4"}));
    h.call("insertText", json!({"name": "d3@4", "text": "!"}));
    h.call("waitSaved", json!({"name": "d3@4"}));
    for name in ["d1@4", "d3@4", "d1@3", "x1"] {
        assert_clean(&mut h, name);
    }
}

#[test]
fn tokens_are_checked_per_document_and_a_refusal_does_not_reconnect() {
    let server = Server::start(&["--sync-shared-secret", "topsecret", "--yjs-keepalive", "300ms"]);
    server.wait_ready();
    let auth = moai_server::Auth::with_secret("topsecret");
    let mut h = NodeDriver::hocuspocus();
    // The provider reconnects a socket silent for 2 s (30 s by default): only moai's keepalive,
    // also sent for a refused document, keeps it from reconnecting to be refused again.
    h.call("socket", json!({"socket": "s", "url": hp_url(&server), "messageReconnectTimeout": 2000}));
    // A socket whose only document is refused.
    h.call(
        "socket",
        json!({"socket": "lonely", "url": hp_url(&server), "version": 3, "messageReconnectTimeout": 2000}),
    );
    h.call("attach", json!({"name": "lonely", "socket": "lonely", "doc": "doc", "token": "nope"}));
    let good = mint(&auth, |_| {});
    h.call("attach", json!({"name": "good", "socket": "s", "doc": "doc", "token": good}));
    h.call("attach", json!({"name": "none", "socket": "s", "doc": "doc2", "token": null}));
    h.call("attach", json!({"name": "forged", "socket": "s", "doc": "doc3", "token": "u1:00ff"}));
    let expired = mint(&auth, |c| c.exp = Some(1));
    h.call("attach", json!({"name": "expired", "socket": "s", "doc": "doc4", "token": expired}));
    let other = mint(&auth, |c| c.docs = Some(vec!["other-*".into()]));
    h.call("attach", json!({"name": "scope", "socket": "s", "doc": "doc5", "token": other}));
    h.call("attach", json!({"name": "scoped", "socket": "s", "doc": "other-1", "token": other}));

    h.call("waitSynced", json!({"name": "good"}));
    h.call("waitSynced", json!({"name": "scoped"}));
    let scope = h.call("waitAuthenticated", json!({"name": "good"}))["scope"].clone();
    assert_eq!(scope, "read-write");
    for (name, expect) in [
        ("none", "unauthorized: missing token"),
        ("forged", "unauthorized: invalid token signature"),
        ("expired", "forbidden: token expired"),
        ("scope", "forbidden: token does not grant access to this resource"),
    ] {
        let failed = h.call("waitAuthFailed", json!({"name": name}));
        assert_eq!(failed["reason"], expect, "{name}: {failed}");
    }
    // The refused documents changed nothing for the others on the socket, and nobody reconnects.
    h.call("insertText", json!({"name": "good", "text": "still here"}));
    h.call("waitSaved", json!({"name": "good"}));
    std::thread::sleep(Duration::from_secs(5));
    for socket in ["s", "lonely"] {
        let s = h.call("socketStats", json!({"socket": socket}));
        assert_eq!((s["opens"].as_u64(), s["closes"].as_array().map(Vec::len)), (Some(1), Some(0)), "{socket}: {s}");
    }
    for name in ["none", "forged", "expired", "scope", "lonely"] {
        let stats = assert_clean(&mut h, name);
        assert_eq!(stats["authFailures"].as_array().map(Vec::len), Some(1), "refused once only: {stats}");
        assert_eq!(stats["synced"], false, "{stats}");
    }
}

#[test]
fn a_read_only_token_syncs_and_reads_but_its_edits_are_refused() {
    let server = Server::start(&["--sync-shared-secret", "topsecret"]);
    server.wait_ready();
    let auth = moai_server::Auth::with_secret("topsecret");
    let mut h = NodeDriver::hocuspocus();
    let url = hp_url(&server);
    let writer = mint(&auth, |_| {});
    let reader = mint(&auth, |c| c.read_only = true);
    h.call("attach", json!({"name": "w", "url": url, "doc": "doc", "token": writer}));
    h.call("waitSynced", json!({"name": "w"}));
    h.call("insertText", json!({"name": "w", "text": "written"}));
    h.call("waitSaved", json!({"name": "w"}));
    h.call("attach", json!({"name": "r", "url": url, "version": 3, "doc": "doc", "token": reader}));
    assert_eq!(h.call("waitAuthenticated", json!({"name": "r"}))["scope"], "readonly");
    h.call("waitSynced", json!({"name": "r"}));
    // Its answer to our SyncStep1 holds nothing new: acknowledged, so it counts as saved.
    h.call("waitSaved", json!({"name": "r"}));
    h.call("waitText", json!({"name": "r", "equals": "written"}));
    h.call("insertText", json!({"name": "w", "text": " more"}));
    h.call("waitText", json!({"name": "r", "equals": "written more"}));

    // Its own edit is refused (sync status 0): it stays unsaved and nobody else sees it.
    h.call("insertText", json!({"name": "r", "index": 0, "text": "NO "}));
    std::thread::sleep(Duration::from_millis(500));
    let stats = assert_clean(&mut h, "r");
    assert!(stats["unsyncedChanges"].as_u64() >= Some(1), "{stats}");
    assert_eq!(stats["authFailures"], json!([]), "a read-only edit is not an authentication failure: {stats}");
    assert_eq!(h.call("getText", json!({"name": "w"}))["text"], "written more");
    let (_, body) = server.get(&format!("/api/v1/docs/doc/update?token={writer}"));
    assert!(!body.contains("NO "), "the read-only edit was stored");
}

#[test]
fn an_expiring_token_is_refreshed_or_the_document_is_refused() {
    let server = Server::start(&["--sync-shared-secret", "topsecret"]);
    server.wait_ready();
    let auth = moai_server::Auth::with_secret("topsecret");
    let mut h = NodeDriver::hocuspocus();
    h.call("socket", json!({"socket": "s", "url": hp_url(&server)}));
    // Six seconds (`exp` is whole seconds): moai asks for a fresh token halfway, at least 2.5 s
    // from now, well after `fresh` has its long token even on a slow machine.
    let short = |auth: &moai_server::Auth| mint(auth, |c| c.exp = Some(unix_now() + 6));
    // `stale` keeps answering with its short token; `fresh` has a long one by the time moai asks.
    h.call("attach", json!({"name": "stale", "socket": "s", "doc": "a", "token": short(&auth)}));
    h.call("attach", json!({"name": "fresh", "socket": "s", "doc": "b", "token": short(&auth)}));
    h.call("waitSynced", json!({"name": "stale"}));
    h.call("waitSynced", json!({"name": "fresh"}));
    h.call("setToken", json!({"name": "fresh", "token": mint(&auth, |c| c.exp = Some(unix_now() + 3600))}));

    let failed = h.call("waitAuthFailed", json!({"name": "stale", "timeoutMs": 15000}));
    assert_eq!(failed["reason"], "forbidden: token expired");
    // The refreshed document outlives the first token: edits after it are still saved.
    std::thread::sleep(Duration::from_secs(1));
    h.call("insertText", json!({"name": "fresh", "text": "after expiry"}));
    h.call("waitSaved", json!({"name": "fresh"}));
    let stats = assert_clean(&mut h, "fresh");
    assert_eq!(stats["authFailures"], json!([]), "{stats}");
    assert!(stats["authenticated"].as_array().unwrap().len() >= 2, "re-authenticated: {stats}");
    // The expired one is cut off: its edits go nowhere, and the socket stays for the other.
    h.call("insertText", json!({"name": "stale", "text": "too late"}));
    let s = h.call("socketStats", json!({"socket": "s"}));
    assert_eq!(s["opens"], 1, "{s}");
    std::thread::sleep(Duration::from_millis(300));
    let (_, body) = server.get(&format!("/api/v1/docs/a/update?token={}", mint(&auth, |_| {})));
    assert!(!body.contains("too late"), "an edit after expiry was stored");
}

#[test]
fn stateless_messages_reach_the_documents_other_providers() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut h = NodeDriver::hocuspocus();
    let mut y = NodeDriver::yjs();
    let url = hp_url(&server);
    h.call("attach", json!({"name": "a", "url": url, "doc": "room"}));
    h.call("attach", json!({"name": "b", "url": url, "version": 3, "doc": "room"}));
    h.call("attach", json!({"name": "c", "url": url, "doc": "elsewhere"}));
    y.connect("y", &server.ws_url("/sync/v1"), "room", json!({}));
    for name in ["a", "b", "c"] {
        h.call("waitSynced", json!({"name": name}));
    }
    y.call("waitSynced", json!({"name": "y"}));
    h.call("sendStateless", json!({"name": "a", "payload": "{\"type\":\"ping\"}"}));
    h.call("waitStateless", json!({"name": "b", "equals": "{\"type\":\"ping\"}"}));
    h.call("sendStateless", json!({"name": "b", "payload": "pong"}));
    h.call("waitStateless", json!({"name": "a", "equals": "pong"}));
    std::thread::sleep(Duration::from_millis(300));
    // Not back to the sender, not to another document.
    assert_eq!(assert_clean(&mut h, "a")["stateless"], json!(["pong"]));
    assert_eq!(assert_clean(&mut h, "c")["stateless"], json!([]));
    // A y-websocket client of the document is not sent them.
    let ys = y.call("stats", json!({"name": "y"}));
    assert_eq!(ys["messageErrors"], json!([]), "{ys}");
}
