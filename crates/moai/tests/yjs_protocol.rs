//! The Yjs endpoint at the protocol level, with a raw WebSocket client: what the server sends on
//! connect, close codes for bad input and auth, keepalives, shutdown, durability across
//! `kill -9`, and the HTTP document API.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use moai_yjs::protocol::sync_update_frame;
use moai_yjs::yrs::Doc;
use moai_yjs::{Message, SyncMessage};
use support::yjs::{edit, sync, text_of_update};
use support::{http, Server};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.expect("connect").0
}

/// Next binary frame or close, skipping pings; fails the test after 10 s.
async fn next(ws: &mut Ws) -> WsMessage {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("timed out waiting for the server")
            .expect("stream ended")
            .expect("websocket error");
        if !matches!(msg, WsMessage::Ping(_) | WsMessage::Pong(_)) {
            return msg;
        }
    }
}

/// Reads until the server closes; returns the close code and reason.
async fn closed(ws: &mut Ws) -> (u16, String) {
    loop {
        match next(ws).await {
            WsMessage::Close(Some(frame)) => return (u16::from(frame.code), frame.reason.to_string()),
            WsMessage::Close(None) => return (1005, String::new()),
            _ => {}
        }
    }
}

#[tokio::test]
async fn connect_gets_sync_step1_and_an_update_reaches_the_other_client() {
    let server = Server::start(&[]);
    server.wait_ready();
    let url = server.ws_url("/sync/v1/doc-a");
    let mut a = connect(&url).await;
    let mut b = connect(&url).await;
    for ws in [&mut a, &mut b] {
        match next(ws).await {
            WsMessage::Binary(f) => assert!(matches!(Message::decode(&f), Ok(Message::Sync(SyncMessage::Step1(_))))),
            other => panic!("expected the server's SyncStep1, got {other:?}"),
        }
    }
    let writer = Doc::new();
    a.send(WsMessage::Binary(sync_update_frame(&edit(&writer, "hello")).into())).await.unwrap();
    match next(&mut b).await {
        WsMessage::Binary(f) => match Message::decode(&f) {
            Ok(Message::Sync(SyncMessage::Update(u))) => assert_eq!(text_of_update(u), "hello"),
            other => panic!("expected an update, got {other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_invalid_update_closes_1007_and_changes_nothing() {
    let server = Server::start(&[]);
    server.wait_ready();
    let url = server.ws_url("/sync/v1/doc-b");
    let mut a = connect(&url).await;
    let writer = Doc::new();
    a.send(WsMessage::Binary(sync_update_frame(&edit(&writer, "good")).into())).await.unwrap();
    assert_eq!(sync(&mut a).await, "good");
    a.send(WsMessage::Binary(sync_update_frame(&[0xff, 0xff, 0xff, 0x01, 0x02]).into())).await.unwrap();
    let (code, reason) = closed(&mut a).await;
    assert_eq!(code, 1007, "{reason}");
    let mut b = connect(&url).await;
    assert_eq!(sync(&mut b).await, "good");
}

#[tokio::test]
async fn an_oversized_frame_closes_1009() {
    let server = Server::start(&["--max-frame-bytes", "64KiB"]);
    server.wait_ready();
    let mut a = connect(&server.ws_url("/sync/v1/doc-c")).await;
    a.send(WsMessage::Binary(vec![0u8; 200 * 1024].into())).await.unwrap();
    let (code, _) = closed(&mut a).await;
    assert_eq!(code, 1009);
    let line = server.wait_log("session closed", Duration::from_secs(5)).expect("close is logged");
    assert!(line.contains("1009") && line.contains("message larger than"), "{line}");
}

#[tokio::test]
async fn idle_sockets_get_the_empty_awareness_keepalive() {
    let server = Server::start(&["--yjs-keepalive", "200ms"]);
    server.wait_ready();
    let mut a = connect(&server.ws_url("/sync/v1/doc-d")).await;
    let _step1 = next(&mut a).await;
    match next(&mut a).await {
        WsMessage::Binary(f) => assert_eq!(&f[..], &[1, 1, 0]),
        other => panic!("expected a keepalive, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001() {
    let mut server = Server::start(&[]);
    server.wait_ready();
    let mut a = connect(&server.ws_url("/sync/v1/doc-e")).await;
    let _step1 = next(&mut a).await;
    server.signal("TERM");
    let (code, _) = closed(&mut a).await;
    assert_eq!(code, 1001);
    assert_eq!(server.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0));
}

/// What one client saw survives `kill -9` of the server.
#[tokio::test]
async fn an_update_another_client_saw_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let server = Server::start_in(tempfile::tempdir().unwrap(), &db, &[]);
    server.wait_ready();
    let url = server.ws_url("/sync/v1/doc-f");
    let mut a = connect(&url).await;
    let mut b = connect(&url).await;
    let _ = next(&mut b).await; // step1
    let writer = Doc::new();
    for word in ["one ", "two ", "three"] {
        a.send(WsMessage::Binary(sync_update_frame(&edit(&writer, word)).into())).await.unwrap();
        loop {
            if let WsMessage::Binary(f) = next(&mut b).await {
                if matches!(Message::decode(&f), Ok(Message::Sync(SyncMessage::Update(_)))) {
                    break;
                }
            }
        }
    }
    server.signal("KILL");
    drop(server);
    let server = Server::start_in(tempfile::tempdir().unwrap(), &db, &[]);
    server.wait_ready();
    let mut c = connect(&server.ws_url("/sync/v1/doc-f")).await;
    assert_eq!(sync(&mut c).await, "one two three");
}

#[tokio::test]
async fn tokens_are_required_when_a_secret_is_set() {
    let server = Server::start(&["--sync-shared-secret", "s3cret"]);
    server.wait_ready();
    let url = server.ws_url("/sync/v1/private");
    let mint = |args: &[&str]| {
        let out = std::process::Command::new(support::BIN)
            .arg("token")
            .args(args)
            .env("SYNC_SHARED_SECRET", "s3cret")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };

    // No token, and a forged one: 4401.
    let mut ws = connect(&url).await;
    assert_eq!(closed(&mut ws).await.0, 4401);
    let mut ws = connect(&format!("{url}?token=alice:{}", "0".repeat(64))).await;
    assert_eq!(closed(&mut ws).await.0, 4401);

    // A valid plain token in the query string.
    let token = mint(&["alice"]);
    let mut ws = connect(&format!("{url}?token={token}")).await;
    assert_eq!(sync(&mut ws).await, "");

    // In the Authorization header.
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let mut ws = tokio_tungstenite::connect_async(req).await.unwrap().0;
    assert_eq!(sync(&mut ws).await, "");

    // As a subprotocol, and the server selects `yjs`, not the token.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&token);
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", format!("yjs, bearer.{b64}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "yjs");
    assert_eq!(sync(&mut ws).await, "");

    // Scoped to another document, and expired: 4403.
    let other = mint(&["alice", "--doc", "public-*"]);
    let mut ws = connect(&format!("{url}?token={other}")).await;
    assert_eq!(closed(&mut ws).await.0, 4403);
    let scoped = mint(&["alice", "--doc", "priv*", "--ttl", "1h"]);
    let mut ws = connect(&format!("{url}?token={scoped}")).await;
    assert_eq!(sync(&mut ws).await, "");
    let expired = moai_server::Auth::with_secret("s3cret")
        .mint(&moai_server::auth::Claims {
            sub: "alice".into(),
            exp: Some(1),
            docs: None,
            tables: None,
            ..Default::default()
        })
        .unwrap();
    let mut ws = connect(&format!("{url}?token={expired}")).await;
    assert_eq!(closed(&mut ws).await.0, 4403);

    // /health says the server is not open.
    assert_eq!(support::json(&server.get("/health").1)["auth"], "token");
}

/// GET `path` and return status and the raw body bytes (support's `http` returns the body as
/// lossy UTF-8, which mangles a binary update). One request, `Connection: close`; a chunked body
/// is decoded.
fn http_get_bytes(addr: std::net::SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let (mut rest, mut out) = (&body[..], Vec::new());
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
            let size = std::str::from_utf8(&rest[..eol]).unwrap().split(';').next().unwrap().trim();
            let size = usize::from_str_radix(size, 16).expect("chunk size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    (status, body)
}

#[tokio::test]
async fn the_http_api_reads_and_writes_documents() {
    let server = Server::start(&["--sync-shared-secret", "k"]);
    server.wait_ready();
    let token = moai_server::Auth::with_secret("k")
        .mint(&moai_server::auth::Claims {
            sub: "svc".into(),
            exp: None,
            docs: None,
            tables: None,
            ..Default::default()
        })
        .unwrap();
    let auth = format!("Bearer {token}");
    let path = "/api/v1/docs/http-doc/update";
    let writer = Doc::new();
    let (status, _) = http(server.addr, "POST", path, &[("Authorization", &auth)], &edit(&writer, "via http"));
    assert_eq!(status, 204);
    let mut ws = connect(&server.ws_url(&format!("/sync/v1/http-doc?token={token}"))).await;
    assert_eq!(sync(&mut ws).await, "via http");

    assert_eq!(http(server.addr, "GET", path, &[], b"").0, 401);
    assert_eq!(http(server.addr, "POST", path, &[("Authorization", &auth)], b"\xff\xfe garbage").0, 400);
    // GET returns the document's state as a Yjs v1 update: it holds what the POST wrote.
    let (status, body) = http_get_bytes(server.addr, &format!("{path}?token={token}"));
    assert_eq!(status, 200);
    assert_eq!(text_of_update(&body), "via http");
}

#[tokio::test]
async fn unknown_message_types_are_ignored_and_counted() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut a = connect(&server.ws_url("/sync/v1/doc-u")).await;
    a.send(WsMessage::Binary(vec![42, 1, 2, 3].into())).await.unwrap();
    // The connection still works after it.
    let writer = Doc::new();
    a.send(WsMessage::Binary(sync_update_frame(&edit(&writer, "still here")).into())).await.unwrap();
    assert_eq!(sync(&mut a).await, "still here");
    let metrics = server.get("/metrics").1;
    assert!(metrics.contains("moai_unknown_messages_total{protocol=\"yjs\"} 1"), "{metrics}");
}
