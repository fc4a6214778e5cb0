//! `/hocuspocus` at the protocol level, with a raw WebSocket client: queueing before the token,
//! the order of answers, a bad update ending only its document, bad frames, the bounds, the
//! keepalive (docs/protocols/hocuspocus.md).

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use moai_yjs::hocuspocus::{self as wire, MSG_AUTH, MSG_CLOSE, MSG_SYNC_STATUS};
use moai_yjs::yrs::Doc;
use moai_yjs::{Message, SyncMessage};
use support::ws::{closed_within, connect, next_within, Ws};
use support::yjs::edit;
use support::Server;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(10);

fn token(address: &str, token: &str) -> Vec<u8> {
    let mut m = vec![MSG_AUTH as u8, 0];
    m.extend(wire::address_prefix(token)); // a lib0 string, like the address
    wire::frame(&wire::address_prefix(address), &m)
}

fn to(address: &str, message: &[u8]) -> Vec<u8> {
    wire::frame(&wire::address_prefix(address), message)
}

async fn send(ws: &mut Ws, frame: Vec<u8>) {
    ws.send(WsMessage::Binary(frame.into())).await.unwrap();
}

/// The next frame's address and message.
async fn next(ws: &mut Ws) -> (String, Vec<u8>) {
    match next_within(ws, WAIT).await {
        WsMessage::Binary(f) => {
            let (address, message) = wire::split_server_frame(&f).expect("an addressed frame");
            (address.to_owned(), message.to_vec())
        }
        other => panic!("expected a frame, got {other:?}"),
    }
}

fn step1() -> Vec<u8> {
    Message::Sync(SyncMessage::Step1(&[0])).encode()
}

fn is_authenticated(message: &[u8], scope: &str) -> bool {
    let mut expect = vec![MSG_AUTH as u8, 2];
    expect.extend(wire::address_prefix(scope));
    message == expect
}

#[tokio::test]
async fn messages_before_the_token_wait_and_are_answered_in_order() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut ws = connect(&server.ws_url("/hocuspocus")).await;
    // SyncStep1 before the token (allowed: Hocuspocus queues it), then the token.
    send(&mut ws, to("notes", &step1())).await;
    send(&mut ws, token("notes", "")).await;
    let (address, m) = next(&mut ws).await;
    assert_eq!(address, "notes");
    assert!(is_authenticated(&m, "read-write"), "{m:?}");
    // The queued SyncStep1's answer: SyncStep2 (empty document), then our SyncStep1.
    assert_eq!(next(&mut ws).await, ("notes".into(), vec![0, 1, 2, 0, 0]));
    assert_eq!(next(&mut ws).await, ("notes".into(), vec![0, 0, 1, 0]));
    // An update is acknowledged once stored.
    let writer = Doc::new();
    send(&mut ws, to("notes", &moai_yjs::protocol::sync_update_frame(&edit(&writer, "hi")))).await;
    assert_eq!(next(&mut ws).await, ("notes".into(), vec![MSG_SYNC_STATUS as u8, 1]));
    let (_, body) = server.get("/api/v1/docs/notes/update");
    assert!(body.contains("hi"));
}

#[tokio::test]
async fn a_bad_update_ends_only_its_document() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut ws = connect(&server.ws_url("/hocuspocus")).await;
    for doc in ["d1", "d2"] {
        send(&mut ws, token(doc, "")).await;
        let (address, m) = next(&mut ws).await;
        assert!(address == doc && is_authenticated(&m, "read-write"), "{address} {m:?}");
    }
    send(&mut ws, to("d1", &moai_yjs::protocol::sync_update_frame(b"\xff\xff garbage"))).await;
    let (address, m) = next(&mut ws).await;
    assert_eq!(address, "d1");
    assert_eq!(m[0], MSG_CLOSE as u8, "{m:?}");
    assert!(String::from_utf8_lossy(&m).contains("update"), "{}", String::from_utf8_lossy(&m));
    // d1's later messages go nowhere; d2 goes on.
    send(&mut ws, to("d1", &step1())).await;
    send(&mut ws, to("d2", &moai_yjs::protocol::sync_update_frame(&edit(&Doc::new(), "ok")))).await;
    assert_eq!(next(&mut ws).await, ("d2".into(), vec![MSG_SYNC_STATUS as u8, 1]));
}

#[tokio::test]
async fn bad_frames_close_the_socket() {
    let server = Server::start(&[]);
    server.wait_ready();
    let url = server.ws_url("/hocuspocus");
    let mut ws = connect(&url).await;
    ws.send(WsMessage::Text("hello".into())).await.unwrap();
    assert_eq!(closed_within(&mut ws, WAIT).await.0, 1007);
    let mut ws = connect(&url).await;
    send(&mut ws, vec![5, b'a']).await; // an address longer than the frame
    assert_eq!(closed_within(&mut ws, WAIT).await.0, 1002);
    // Provider 4's one-byte pong is fine.
    let mut ws = connect(&url).await;
    send(&mut ws, vec![wire::MSG_PONG]).await;
    send(&mut ws, token("d", "")).await;
    assert!(is_authenticated(&next(&mut ws).await.1, "read-write"));
}

#[tokio::test]
async fn documents_per_socket_and_names_are_bounded() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut ws = connect(&server.ws_url("/hocuspocus")).await;
    let max = 256;
    for i in 0..max {
        send(&mut ws, token(&format!("doc-{i}"), "")).await;
    }
    let mut authenticated = 0;
    while authenticated < max {
        if is_authenticated(&next(&mut ws).await.1, "read-write") {
            authenticated += 1;
        }
    }
    send(&mut ws, token("one-too-many", "")).await;
    let (address, m) = next(&mut ws).await;
    assert_eq!(address, "one-too-many");
    assert_eq!(&m[..2], &[MSG_AUTH as u8, 1], "permission denied: {m:?}");
    assert!(String::from_utf8_lossy(&m).contains("too many documents"));
    // A name no document may have (control characters) is refused the same way.
    let mut ws = connect(&server.ws_url("/hocuspocus")).await;
    send(&mut ws, token("bad\u{7}name", "")).await;
    let (_, m) = next(&mut ws).await;
    assert!(String::from_utf8_lossy(&m).contains("invalid document name"), "{m:?}");
}

#[tokio::test]
async fn an_idle_socket_gets_the_keepalive_for_its_document() {
    let server = Server::start(&["--yjs-keepalive", "200ms"]);
    server.wait_ready();
    let mut ws = connect(&server.ws_url("/hocuspocus")).await;
    send(&mut ws, token("quiet", "")).await;
    assert!(is_authenticated(&next(&mut ws).await.1, "read-write"));
    assert_eq!(next(&mut ws).await, ("quiet".into(), vec![1, 1, 0]));
    assert_eq!(next(&mut ws).await, ("quiet".into(), vec![1, 1, 0]));
}

#[tokio::test]
async fn an_empty_token_falls_back_to_the_sockets_own() {
    let server = Server::start(&["--sync-shared-secret", "topsecret"]);
    server.wait_ready();
    let auth = moai_server::Auth::with_secret("topsecret");
    let good = auth.mint(&moai_server::auth::Claims { sub: "u1".into(), ..Default::default() }).unwrap();
    // The token in the URL opens what the Auth messages leave empty.
    let mut ws = connect(&format!("{}?token={good}", server.ws_url("/hocuspocus"))).await;
    send(&mut ws, token("d", "")).await;
    assert!(is_authenticated(&next(&mut ws).await.1, "read-write"));
    // An Auth message's own token still counts first.
    send(&mut ws, token("e", "u1:00")).await;
    let (address, m) = next(&mut ws).await;
    assert_eq!(address, "e");
    assert_eq!(&m[..2], &[MSG_AUTH as u8, 1], "permission denied: {m:?}");
    // Without either, the document is refused.
    let mut bare = connect(&server.ws_url("/hocuspocus")).await;
    send(&mut bare, token("d", "")).await;
    let (_, m) = next(&mut bare).await;
    assert!(String::from_utf8_lossy(&m).contains("unauthorized: missing token"), "{m:?}");
}
