//! Attacks a single client can make on everyone else, performed against the real binary: the
//! server's memory must stay bounded (its RSS, sampled through the attack) and a bystander on
//! the same server must keep being served. (Silent sockets and per-IP / per-user caps are in
//! security.rs; the change feed's bounds in pgsync_endpoint.rs.)

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use moai_yjs::protocol::{sync_step1_frame, sync_update_frame};
use moai_yjs::yrs::{Doc, Text, Transact};
use moai_yjs::{Message, SyncMessage};
use support::ws::{closed_within, connect, next_within, Ws};
use support::yjs::text_of_update;
use support::{http, Server};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(20);

/// The server's resident memory in MiB.
fn rss_mib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

/// Samples the server's RSS every 20 ms until `done` resolves; returns the peak.
async fn peak_rss_during<F: std::future::Future>(server: &Server, done: F) -> (F::Output, u64) {
    tokio::pin!(done);
    let mut peak = rss_mib(server);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            out = &mut done => return (out, peak.max(rss_mib(server))),
            _ = tick.tick() => peak = peak.max(rss_mib(server)),
        }
    }
}

/// A bystander edits and reads its edit back through the server: it is being served.
async fn bystander_round_trip(ws: &mut Ws, doc: &Doc, word: &str) {
    let t = doc.get_or_insert_text("t");
    let update = {
        let mut txn = doc.transact_mut();
        t.insert(&mut txn, 0, word);
        txn.encode_update_v1()
    };
    ws.send(WsMessage::Binary(sync_update_frame(&update).into())).await.unwrap();
    // Ask for everything and look for the word.
    ws.send(WsMessage::Binary(sync_step1_frame(&[0]).into())).await.unwrap();
    loop {
        if let WsMessage::Binary(b) = next_within(ws, WAIT).await {
            if let Ok(Message::Sync(SyncMessage::Step2(u))) = Message::decode(&b) {
                if text_of_update(u).contains(word) {
                    return;
                }
            }
        }
    }
}

/// Item 7 of the security issue: a tiny SyncStep1 makes the server encode the whole document.
/// An attacker that asks for a 1 MB document a thousand times (each request different, so no
/// two answers are the same) and reads nothing used to make the server queue 1024 answers (1 GB)
/// for it. The outbox is now bounded in bytes: the attacker is closed, memory stays bounded.
#[tokio::test]
async fn state_requests_from_a_client_that_never_reads_cannot_grow_memory() {
    let server = Server::start(&["--yjs-outbox-bytes", "8MiB"]);
    server.wait_ready();
    // A 1 MB document.
    let writer = Doc::new();
    let body = {
        let t = writer.get_or_insert_text("t");
        let mut txn = writer.transact_mut();
        t.insert(&mut txn, 0, &"x".repeat(1 << 20));
        txn.encode_update_v1()
    };
    assert_eq!(http(server.addr, "POST", "/api/v1/docs/big/update", &[], &body).0, 204);
    let mut bystander = connect(&server.ws_url("/sync/v1/big")).await;
    let by_doc = Doc::new();
    bystander_round_trip(&mut bystander, &by_doc, "warm").await;
    let baseline = rss_mib(&server);

    let mut attacker = connect(&server.ws_url("/sync/v1/big")).await;
    let attack = async {
        for i in 0..1000u64 {
            // State vector {client i+1000: clock 0}: different bytes, the whole doc as answer.
            let mut sv = vec![1];
            let mut id = i + 1000;
            while id >= 0x80 {
                sv.push((id as u8 & 0x7f) | 0x80);
                id >>= 7;
            }
            sv.extend([id as u8, 0]);
            if attacker.send(WsMessage::Binary(sync_step1_frame(&sv).into())).await.is_err() {
                break; // closed by the server
            }
        }
    };
    let ((), peak) = peak_rss_during(&server, attack).await;
    // The server closed the attacker as too slow.
    let (code, _) = closed_within(&mut attacker, WAIT).await;
    assert_eq!(code, 1013);
    assert!(peak < baseline + 200, "RSS grew from {baseline} MiB to {peak} MiB");
    // And served the bystander throughout.
    let started = Instant::now();
    bystander_round_trip(&mut bystander, &by_doc, "after").await;
    assert!(started.elapsed() < WAIT);
}

/// Item 9: one 9 MB CoJSON frame of 100 000 loads of unknown CoValues grew the server by about
/// 270 MiB, and every socket could do it. A connection may now hold 20 000 CoValues (here 1 000):
/// the attacker is closed with 1008 and memory stays bounded.
#[tokio::test]
async fn loads_of_unknown_covalues_cannot_grow_memory() {
    let server = Server::start(&["--cojson-max-covalues-per-peer", "1000"]);
    server.wait_ready();
    let baseline = rss_mib(&server);
    let mut attacker = connect(&server.ws_url("/sync")).await;
    let frame: String = (0..100_000)
        .map(|i| format!(r#"{{"action":"load","id":"co_zAttack{i:08}","header":false,"sessions":{{}}}}"#))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(frame.len() > 7_000_000);
    let send = async {
        attacker.send(WsMessage::Text(frame.into())).await.unwrap();
        closed_within(&mut attacker, WAIT).await
    };
    let ((code, reason), peak) = peak_rss_during(&server, send).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too many CoValues"), "{reason}");
    // The frame itself is held while it is parsed (~10 MB of text, ~100 MB of parsed JSON).
    assert!(peak < baseline + 200, "RSS grew from {baseline} MiB to {peak} MiB");
    // Another client is served.
    let mut other = connect(&server.ws_url("/sync")).await;
    match next_within(&mut other, WAIT).await {
        WsMessage::Text(t) => assert!(t.contains("\"ping\""), "{t}"),
        other => panic!("{other:?}"),
    }
}

/// Item 8: presence from one socket is bounded in client ids and in bytes per state.
#[tokio::test]
async fn an_awareness_flood_closes_the_flooder_only() {
    let server = Server::start(&[]);
    server.wait_ready();
    let mut bystander = connect(&server.ws_url("/sync/v1/aw")).await;
    let by_doc = Doc::new();
    bystander_round_trip(&mut bystander, &by_doc, "hi").await;
    let mut flooder = connect(&server.ws_url("/sync/v1/aw")).await;
    let entries = (1..=10_000u64)
        .map(|id| moai_yjs::AwarenessEntry { client_id: id, clock: 1, state: Some("{}".into()) })
        .collect();
    let update = moai_yjs::AwarenessUpdate { entries }.encode();
    flooder.send(WsMessage::Binary(Message::Awareness(&update).encode().into())).await.unwrap();
    let (code, reason) = closed_within(&mut flooder, WAIT).await;
    assert_eq!(code, 1008, "{reason}");
    bystander_round_trip(&mut bystander, &by_doc, "still").await;
}

/// Item 9, the relay's queue: the relay handles (and verifies) every client's messages on one
/// task, in queue order. One client pipelining large frames without waiting used to fill that
/// queue (8192 frames of up to the frame limit each) with parsed messages, growing memory and
/// putting everyone else behind it. Each connection now has a 4 MiB share of the queue: its
/// socket is read no faster than the relay handles its frames, memory stays bounded, and a
/// bystander is answered while the flood goes on.
#[tokio::test]
async fn a_client_pipelining_large_frames_cannot_fill_the_relay_queue() {
    let server = Server::start(&[]);
    server.wait_ready();
    let baseline = rss_mib(&server);
    let url = server.ws_url("/sync");
    // ~2 MB frames of `known` messages about one CoValue: valid, cheap each, never ending.
    let line = r#"{"action":"known","id":"co_zFlood","header":false,"sessions":{}}"#;
    let frame: String = std::iter::repeat_n(line, 2_000_000 / line.len()).collect::<Vec<_>>().join("\n");
    let (tx, mut rx) = futures_util::StreamExt::split(connect(&url).await);
    let flood = tokio::spawn(async move {
        let mut tx = tx;
        // 100 MB in all: the sends complete only as fast as the server takes them in.
        for _ in 0..50 {
            if tx.send(WsMessage::Text(frame.clone().into())).await.is_err() {
                break;
            }
        }
    });
    // The attacker reads nothing (its answers pile up in its own bounded outbox).
    let keep_rx_alive =
        tokio::spawn(async move { while let Some(Ok(_)) = futures_util::StreamExt::next(&mut rx).await {} });
    let bystander = async {
        let mut other = connect(&url).await;
        // The first frame of a fresh connection is the server's ping; then a load is answered.
        let load = r#"{"action":"load","id":"co_zNothingHere","header":false,"sessions":{}}"#;
        other.send(WsMessage::Text(load.into())).await.unwrap();
        loop {
            if let WsMessage::Text(t) = next_within(&mut other, WAIT).await {
                if t.contains("co_zNothingHere") {
                    return t.to_string();
                }
            }
        }
    };
    // Memory is sampled until the whole flood went through the server, the bystander's
    // request in the middle of it.
    let during = async {
        let answered = bystander.await;
        tokio::time::timeout(Duration::from_secs(120), flood).await.expect("the flood went through").unwrap();
        answered
    };
    let (answered, peak) = peak_rss_during(&server, during).await;
    assert!(answered.contains("\"known\""), "{answered}");
    assert!(peak < baseline + 250, "RSS grew from {baseline} MiB to {peak} MiB");
    keep_rx_alive.abort();
}
