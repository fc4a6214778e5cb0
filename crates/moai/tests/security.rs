//! What a token opens and for how long, and what one client can hold, tried as an attacker
//! would against the real binary: scopes that do not cross engines, sessions closed when their
//! token expires, read-only tokens, the metrics token, silent connections, and per-IP and
//! per-user limits. (The change feed's side of scopes and expiry is in pgsync_endpoint.rs.)

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use moai_server::auth::Claims;
use moai_server::Auth;
use moai_yjs::protocol::{sync_step1_frame, sync_update_frame};
use moai_yjs::yrs::Doc;
use moai_yjs::{AuthMessage, Message, SyncMessage};
use support::ws::{closed_within, connect, next_within};
use support::yjs::{edit, sync};
use support::{http, json, Server};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "s3cret";
const WAIT: Duration = Duration::from_secs(10);

fn mint(claims: Claims) -> String {
    Auth::with_secret(SECRET).mint(&claims).unwrap()
}

fn claims(f: impl FnOnce(&mut Claims)) -> Claims {
    let mut c = Claims { sub: "alice".into(), ..Claims::default() };
    f(&mut c);
    c
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn secured(extra: &[&str]) -> Server {
    let mut args = vec!["--sync-shared-secret", SECRET];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    server.wait_ready();
    server
}

#[tokio::test]
async fn a_scope_on_one_engine_opens_nothing_of_the_others() {
    let server = secured(&[]);
    let table_token =
        mint(claims(|c| c.tables = Some([("public.todos".to_string(), Some("owner_id = 'bob'".to_string()))].into())));
    let doc_token = mint(claims(|c| c.docs = Some(vec!["team-*".into()])));
    let cojson_token = mint(claims(|c| c.cojson = true));

    // A table-scoped token opens no Yjs document, over HTTP or WebSocket, and not CoJSON.
    let auth = format!("Bearer {table_token}");
    assert_eq!(http(server.addr, "GET", "/api/v1/docs/anything/update", &[("Authorization", &auth)], b"").0, 403);
    let mut ws = connect(&server.ws_url(&format!("/sync/v1/anything?token={table_token}"))).await;
    assert_eq!(closed_within(&mut ws, WAIT).await.0, 4403);
    let mut ws = connect(&server.ws_url(&format!("/sync?token={table_token}"))).await;
    assert_eq!(closed_within(&mut ws, WAIT).await.0, 4403);

    // A document-scoped token opens its documents and not CoJSON.
    let mut ws = connect(&server.ws_url(&format!("/sync/v1/team-1?token={doc_token}"))).await;
    assert_eq!(sync(&mut ws).await, "");
    let mut ws = connect(&server.ws_url(&format!("/sync?token={doc_token}"))).await;
    assert_eq!(closed_within(&mut ws, WAIT).await.0, 4403);

    // A CoJSON token opens /sync (the server greets it with a ping) and no document.
    let mut ws = connect(&server.ws_url(&format!("/sync?token={cojson_token}"))).await;
    match next_within(&mut ws, WAIT).await {
        WsMessage::Text(t) => assert!(t.contains("\"ping\""), "{t}"),
        other => panic!("expected the cojson ping, got {other:?}"),
    }
    let mut ws = connect(&server.ws_url(&format!("/sync/v1/team-1?token={cojson_token}"))).await;
    assert_eq!(closed_within(&mut ws, WAIT).await.0, 4403);
    let auth = format!("Bearer {cojson_token}");
    assert_eq!(http(server.addr, "GET", "/api/v1/docs/team-1/update", &[("Authorization", &auth)], b"").0, 403);

    // The CLI mints the same scopes.
    let out = std::process::Command::new(support::BIN)
        .args(["token", "carol", "--cojson", "--read-only", "--ttl", "1h"])
        .env("SYNC_SHARED_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("mt2."), "{token}");
    let mut ws = connect(&server.ws_url(&format!("/sync/v1/team-1?token={token}"))).await;
    assert_eq!(closed_within(&mut ws, WAIT).await.0, 4403, "--cojson names CoJSON only");
}

#[tokio::test]
async fn sessions_are_closed_when_their_token_expires() {
    let server = secured(&[]);
    let exp = unix_now() + 2;
    let token = mint(claims(|c| c.exp = Some(exp)));
    let mut yjs = connect(&server.ws_url(&format!("/sync/v1/doc?token={token}"))).await;
    assert_eq!(sync(&mut yjs).await, "");
    let mut cojson = connect(&server.ws_url(&format!("/sync?token={token}"))).await;
    for ws in [&mut yjs, &mut cojson] {
        let (code, reason) = closed_within(ws, WAIT).await;
        assert_eq!((code, reason.as_str()), (4403, "token expired"));
        assert!(unix_now() >= exp, "closed before the token expired");
    }
    // And a new connection with it is refused.
    let mut ws = connect(&server.ws_url(&format!("/sync/v1/doc?token={token}"))).await;
    assert_eq!(closed_within(&mut ws, WAIT).await.0, 4403);
}

#[tokio::test]
async fn mt1_tokens_signed_like_plain_ones_are_refused() {
    // An application that mints plain tokens for user-chosen names must not be turned into a
    // minter of scoped tokens: the signature of a plain token for the name "mt1.<payload>" is
    // exactly what an mt1 token with that payload carried.
    use base64::Engine;
    let server = secured(&[]);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory"}"#);
    for prefix in ["mt1.", "mt2."] {
        let name = format!("{prefix}{payload}");
        let plain = mint(Claims { sub: name.clone(), ..Claims::default() });
        let sig = plain.rsplit_once(':').unwrap().1;
        let forged = format!("{name}.{sig}");
        let mut ws = connect(&server.ws_url(&format!("/sync/v1/doc?token={forged}"))).await;
        assert_eq!(closed_within(&mut ws, WAIT).await.0, 4401, "{prefix}");
    }
}

#[tokio::test]
async fn read_only_tokens_read_and_show_presence_but_never_write() {
    let server = secured(&[]);
    let writer_token = mint(claims(|_| {}));
    let viewer_token = mint(claims(|c| {
        c.sub = "viewer".into();
        c.read_only = true;
    }));
    let url = |t: &str| server.ws_url(&format!("/sync/v1/ro-doc?token={t}"));
    let mut writer = connect(&url(&writer_token)).await;
    let w = Doc::new();
    writer.send(WsMessage::Binary(sync_update_frame(&edit(&w, "by writer")).into())).await.unwrap();
    assert_eq!(sync(&mut writer).await, "by writer");

    // The viewer loads the document and receives live updates.
    let mut viewer = connect(&url(&viewer_token)).await;
    assert_eq!(sync(&mut viewer).await, "by writer");
    writer.send(WsMessage::Binary(sync_update_frame(&edit(&w, "!")).into())).await.unwrap();
    loop {
        if let WsMessage::Binary(b) = next_within(&mut viewer, WAIT).await {
            if let Ok(Message::Sync(SyncMessage::Update(_))) = Message::decode(&b) {
                break;
            }
        }
    }
    assert_eq!(sync(&mut viewer).await, "by writer!");

    // Its own update is refused with y-protocols' permission-denied message, and the socket stays.
    let v = Doc::new();
    viewer.send(WsMessage::Binary(sync_update_frame(&edit(&v, "by viewer")).into())).await.unwrap();
    loop {
        if let WsMessage::Binary(b) = next_within(&mut viewer, WAIT).await {
            if let Ok(Message::Auth(AuthMessage::PermissionDenied { reason })) = Message::decode(&b) {
                assert!(reason.starts_with("read-only"), "{reason}");
                break;
            }
        }
    }
    // Presence from the viewer reaches the writer (awareness is not a document write).
    let awareness = moai_yjs::AwarenessUpdate {
        entries: vec![moai_yjs::AwarenessEntry { client_id: 77, clock: 1, state: Some(r#"{"name":"viewer"}"#.into()) }],
    };
    viewer.send(WsMessage::Binary(Message::Awareness(&awareness.encode()).encode().into())).await.unwrap();
    loop {
        if let WsMessage::Binary(b) = next_within(&mut writer, WAIT).await {
            if let Ok(Message::Awareness(bytes)) = Message::decode(&b) {
                let update = moai_yjs::AwarenessUpdate::decode(bytes).unwrap();
                if update.entries.iter().any(|c| c.client_id == 77) {
                    break;
                }
            }
        }
    }
    // The viewer's update reached neither storage nor the writer: a fresh reader and the HTTP
    // API see only the writer's text.
    let mut reader = connect(&url(&writer_token)).await;
    assert_eq!(sync(&mut reader).await, "by writer!");
    let auth = format!("Bearer {viewer_token}");
    let path = "/api/v1/docs/ro-doc/update";
    let (status, body) = http(server.addr, "POST", path, &[("Authorization", &auth)], &edit(&v, " more"));
    assert_eq!(status, 403, "{body}");
    assert_eq!(json(&body)["error"], "token is read-only");
    assert_eq!(http(server.addr, "GET", path, &[("Authorization", &auth)], b"").0, 200, "a viewer may read over HTTP");
    let mut reader = connect(&url(&writer_token)).await;
    assert_eq!(sync(&mut reader).await, "by writer!");
}

#[test]
fn metrics_require_the_metrics_token_when_one_is_set() {
    let server = Server::start(&["--metrics-token", "m3trics"]);
    server.wait_ready();
    let (status, body) = http(server.addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 401);
    assert_eq!(json(&body)["status"], 401);
    assert_eq!(http(server.addr, "GET", "/metrics", &[("Authorization", "Bearer wrong")], b"").0, 401);
    let (status, body) = http(server.addr, "GET", "/metrics", &[("Authorization", "Bearer m3trics")], b"");
    assert_eq!(status, 200);
    assert!(body.contains("moai_rejected_total{reason=\"metrics_auth\"} 2"), "{body}");
    // Health stays open for orchestration.
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get("/healthz").0, 200);
}

/// Opens a TCP connection that sends nothing; returns how long until the server closed it.
fn silent_connection_lifetime(server: &Server) -> Duration {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server sent something to a silent connection");
    started.elapsed()
}

#[test]
fn silent_connections_do_not_hold_slots() {
    let server = Server::start(&["--max-connections", "3", "--handshake-timeout", "1s"]);
    server.wait_ready();
    // Three connections that never send a byte take every slot...
    let silent: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn({
                let addr = server.addr;
                move || {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let started = Instant::now();
                    let n = s.read(&mut [0u8; 64]).unwrap_or(0);
                    (n, started.elapsed())
                }
            })
        })
        .collect();
    // ...and are closed after the handshake timeout, which frees the slots.
    for t in silent {
        let (n, lived) = t.join().unwrap();
        assert_eq!(n, 0);
        assert!(lived < Duration::from_secs(5), "a silent connection lived {lived:?}");
    }
    assert_eq!(server.get("/health").0, 200);
    let lived = silent_connection_lifetime(&server);
    assert!(lived >= Duration::from_millis(900), "closed before the timeout: {lived:?}");
}

#[tokio::test]
async fn a_websocket_that_never_speaks_is_closed() {
    let server = Server::start(&["--first-message-timeout", "1s"]);
    server.wait_ready();
    for path in ["/sync/v1/quiet", "/sync"] {
        let started = Instant::now();
        let mut ws = connect(&server.ws_url(path)).await;
        let (code, reason) = closed_within(&mut ws, WAIT).await;
        assert_eq!(code, 1008, "{path}: {reason}");
        assert!(started.elapsed() >= Duration::from_millis(900), "{path}");
    }
    // A client that speaks is not affected.
    let mut ws = connect(&server.ws_url("/sync/v1/talker")).await;
    assert_eq!(sync(&mut ws).await, "");
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the timeout, by design
    assert_eq!(sync(&mut ws).await, "", "a socket that spoke stays open");
}

#[test]
fn connections_per_ip_are_capped() {
    let server = Server::start(&["--max-connections-per-ip", "2"]);
    server.wait_ready();
    // Two connections that have started a request hold this address's slots.
    let hold = || {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
        s
    };
    let a = hold();
    let b = hold();
    let (status, body) = support::try_http(server.addr, "GET", "/health", &[], b"").unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(json(&body)["error"], "Too many connections");
    drop((a, b));
    // Slots come back when the connections close.
    let deadline = Instant::now() + WAIT;
    while support::try_http(server.addr, "GET", "/health", &[], b"").map(|r| r.0).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "slots never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sessions_per_user_are_capped() {
    let server = secured(&["--max-sessions-per-user", "2"]);
    let alice = mint(claims(|_| {}));
    let bob = mint(claims(|c| c.sub = "bob".into()));
    let url = |t: &str| server.ws_url(&format!("/sync/v1/doc?token={t}"));
    let mut a1 = connect(&url(&alice)).await;
    assert_eq!(sync(&mut a1).await, "");
    let mut a2 = connect(&url(&alice)).await;
    assert_eq!(sync(&mut a2).await, "");
    let mut a3 = connect(&url(&alice)).await;
    let (code, reason) = closed_within(&mut a3, WAIT).await;
    assert_eq!((code, reason.as_str()), (1013, "too many open sessions for this user"));
    // Another user is not affected.
    let mut b1 = connect(&url(&bob)).await;
    assert_eq!(sync(&mut b1).await, "");
    // A closed session gives its unit back.
    a1.close(None).await.unwrap();
    drop(a1);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = connect(&url(&alice)).await;
        again.send(WsMessage::Binary(sync_step1_frame(&[0]).into())).await.unwrap();
        match next_within(&mut again, WAIT).await {
            WsMessage::Close(_) => assert!(Instant::now() < deadline, "the unit never came back"),
            _ => break,
        }
    }
}

/// A Yjs update whose values nest 100 000 levels deep (200 KB). yrs decodes such values
/// recursively: before moai refused them up front, this one frame overflowed the stack and
/// aborted the whole server. (Found by the `yjs_frame` fuzz target's sibling checks; see
/// docs/fuzzing.md.)
#[tokio::test]
async fn a_deeply_nested_update_is_refused_and_the_server_lives() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut update = vec![1, 1, 1, 0, 8, 1, 1, b't', 1];
    for _ in 0..100_000 {
        update.extend([117, 1]);
    }
    update.extend([126, 0]);
    let mut bystander = connect(&server.ws_url("/sync/v1/deep")).await;
    assert_eq!(sync(&mut bystander).await, "");
    let mut attacker = connect(&server.ws_url("/sync/v1/deep")).await;
    attacker.send(WsMessage::Binary(sync_update_frame(&update).into())).await.unwrap();
    let (code, reason) = closed_within(&mut attacker, WAIT).await;
    assert_eq!(code, 1007, "{reason}");
    // Over HTTP too.
    assert_eq!(http(server.addr, "POST", "/api/v1/docs/deep/update", &[], &update).0, 400);
    // The server and the bystander's session are alive.
    let w = Doc::new();
    bystander.send(WsMessage::Binary(sync_update_frame(&edit(&w, "still here")).into())).await.unwrap();
    assert_eq!(sync(&mut bystander).await, "still here");
}

/// A panic of the Yjs library costs only its document, which is closed and reloaded from
/// storage; the server, its other documents and later clients of the same document are served.
/// The updates that made yrs panic (found by fuzzing) are all refused before yrs sees them now
/// (docs/fuzzing.md), so the panic comes from the debug-build test hook that panics where yrs
/// did, on updates holding a marker.
#[tokio::test]
async fn a_yrs_panic_costs_only_its_document() {
    let server = Server::start(&["--test-yrs-panic-marker", "PANIC-HERE"]);
    server.wait_ready();
    let mut other = connect(&server.ws_url("/sync/v1/other")).await;
    assert_eq!(sync(&mut other).await, "");
    let w = Doc::new();
    assert_eq!(http(server.addr, "POST", "/api/v1/docs/p/update", &[], &edit(&w, "kept")).0, 204);
    let mut watcher = connect(&server.ws_url("/sync/v1/p")).await;
    assert_eq!(sync(&mut watcher).await, "kept");
    let poison = edit(&Doc::new(), "PANIC-HERE");
    let (status, _) = http(server.addr, "POST", "/api/v1/docs/p/update", &[], &poison);
    assert_eq!(status, 503, "the document failed");
    // Its session was closed so that the client reloads.
    let (code, _) = closed_within(&mut watcher, Duration::from_secs(10)).await;
    assert_eq!(code, 1011);
    // A client of the same document gets what was durable.
    let mut fresh = connect(&server.ws_url("/sync/v1/p")).await;
    assert_eq!(sync(&mut fresh).await, "kept");
    // The other document's session was not touched.
    other.send(WsMessage::Binary(sync_update_frame(&edit(&Doc::new(), "fine")).into())).await.unwrap();
    assert_eq!(sync(&mut other).await, "fine");
    assert!(
        server.logs().iter().any(|l| l.contains("the Yjs library failed on a document")),
        "the contained panic is logged"
    );
}
