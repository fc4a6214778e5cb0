//! The change feed edge's own bounds, through the real binary and a real PostgreSQL cluster: a
//! client message over 1 MiB is refused (1009) whatever `--max-frame-bytes` allows, because
//! change-feed clients only send small messages and every queued one is held in memory.

mod support;

// The throwaway cluster (crates/moai-pgsync/tests/support/pg.rs), included once by support.
use support::pg;

use std::time::Duration;

use futures_util::SinkExt;
use support::ws::closed_within;
use support::Server;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test]
async fn change_feed_messages_are_limited_to_one_mebibyte() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute("CREATE TABLE public.items (id int PRIMARY KEY, name text)").await.unwrap();
    let server = Server::start(&["--pg-url", &url, "--pg-tables", "public.items"]);
    server.wait_ready();
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/api/sync")).await.unwrap();
    let big = format!(r#"{{"type":"ping","t":0,"pad":"{}"}}"#, "x".repeat(1 << 20));
    ws.send(WsMessage::Text(big.into())).await.unwrap();
    let (code, reason) = closed_within(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, 1009, "{reason}");
    // Yjs keeps the configured 16 MiB.
    let mut yjs = support::ws::connect(&server.ws_url("/sync/v1/doc")).await;
    let frame = moai_yjs::protocol::sync_update_frame(&{
        use moai_yjs::yrs::{Doc, Text, Transact};
        let d = Doc::new();
        let t = d.get_or_insert_text("t");
        let mut txn = d.transact_mut();
        t.insert(&mut txn, 0, &"y".repeat(2 << 20));
        txn.encode_update_v1()
    });
    yjs.send(WsMessage::Binary(frame.into())).await.unwrap();
    // The server answers our SyncStep1 after the update (one socket, in order): it went through.
    yjs.send(WsMessage::Binary(moai_yjs::protocol::sync_step1_frame(&[0]).into())).await.unwrap();
    loop {
        match support::ws::next_within(&mut yjs, Duration::from_secs(10)).await {
            WsMessage::Binary(b) if b.len() > 2 << 20 => break,
            WsMessage::Close(f) => panic!("the 2 MiB Yjs update was refused: {f:?}"),
            _ => {}
        }
    }
}

/// Browsers carry the token as a `bearer.…` subprotocol; the change feed selects `moai-sync`
/// when offered next to it, else the bearer entry, so the handshake completes.
#[tokio::test]
async fn the_change_feed_selects_a_subprotocol_for_token_carrying_clients() {
    use base64::Engine;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute("CREATE TABLE public.items (id int PRIMARY KEY, name text)").await.unwrap();
    let server = Server::start(&["--pg-url", &url, "--pg-tables", "public.items", "--sync-shared-secret", "k"]);
    server.wait_ready();
    let token = moai_server::Auth::with_secret("k")
        .mint(&moai_server::auth::Claims { sub: "u".into(), ..Default::default() })
        .unwrap();
    let bearer = format!("bearer.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&token));
    for (offer, expected) in
        [(format!("moai-sync, {bearer}"), "moai-sync".to_owned()), (bearer.clone(), bearer.clone())]
    {
        let mut req = server.ws_url("/api/sync").into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", offer.parse().unwrap());
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), expected.as_str());
        // Authenticated: a hello is answered, not closed with 4401.
        let hello = r#"{"type":"hello","protocol":1,"client_id":"sp","position":null,"shapes":[{"id":"s","table":"public.items"}]}"#;
        ws.send(WsMessage::Text(hello.into())).await.unwrap();
        match support::ws::next_within(&mut ws, Duration::from_secs(10)).await {
            WsMessage::Text(t) => assert!(!t.contains("\"error\""), "{t}"),
            other => panic!("{other:?}"),
        }
    }
}
