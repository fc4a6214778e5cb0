//! Hellos the engine must refuse, against a real cluster: a position ahead of the watermark
//! (not issued by this history) and garbage (unparseable LSN, wrong JSON types). Each gets one
//! `error` with a code and `fatal: true`, and the session ends (`SessionEnd::Closed`).

mod support;

use std::time::Duration;

use moai_pgsync::{PgSync, PgSyncConfig, SessionEnd};
use serde_json::{json, Value};
use support::pg::PgCluster;
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

async fn start() -> (PgCluster, PgSync) {
    let cluster = PgCluster::start();
    let (c, conn) = tokio_postgres::connect(&cluster.url(), NoTls).await.expect("connect");
    tokio::spawn(conn);
    c.batch_execute("CREATE TABLE public.items (id bigint PRIMARY KEY, val int)").await.unwrap();
    let sync = PgSync::start(PgSyncConfig::new(cluster.url(), vec!["public.items".into()])).await.expect("start");
    tokio::time::timeout(Duration::from_secs(60), sync.wait_caught_up()).await.expect("ready").unwrap();
    (cluster, sync)
}

/// Send one frame; return every message the server sent and how the session ended.
async fn one_frame(sync: &PgSync, frame: String) -> (Vec<Value>, SessionEnd) {
    let (itx, irx) = mpsc::channel(8);
    let (otx, mut orx) = mpsc::channel(64);
    let s = sync.clone();
    let task =
        tokio::spawn(
            async move { s.run_session(irx, otx, moai_pgsync::Access::all(), None, std::future::pending()).await },
        );
    itx.send(frame).await.unwrap();
    // The input stays open: the session must end by itself.
    let end = tokio::time::timeout(Duration::from_secs(30), task).await.expect("session ends by itself").unwrap();
    drop(itx);
    let mut out = Vec::new();
    while let Ok(t) = orx.try_recv() {
        out.push(serde_json::from_str(&t).unwrap());
    }
    (out, end)
}

fn hello(generation: Value, position: Value) -> String {
    json!({"type":"hello","protocol":1,"client_id":"bad","generation":generation,"position":position,
           "shapes":[{"id":"s","table":"public.items"}]})
    .to_string()
}

fn assert_fatal(out: &[Value], end: &SessionEnd, code: &str, needle: &str) {
    assert_eq!(*end, SessionEnd::Closed, "{out:?}");
    let last = out.last().unwrap_or_else(|| panic!("no message; expected error {code}"));
    assert_eq!(last["type"], "error", "{out:?}");
    assert_eq!(last["code"], code, "{last}");
    assert_eq!(last["fatal"], true, "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(message.contains(needle), "message {message:?} should mention {needle:?}");
    assert!(out.iter().all(|m| m["type"] != "welcome"), "nothing is served: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hellos_get_a_coded_fatal_error_and_the_session_closes() {
    let (_cluster, sync) = start().await;
    let feed = sync.feed().borrow().clone();
    let generation = json!(feed.generation);

    // Ahead of the watermark: a position this history never issued.
    let ahead = moai_pgsync::Lsn(feed.watermark.0 + 0x100_0000);
    let (out, end) = one_frame(&sync, hello(generation.clone(), json!({"lsn": ahead.to_string(), "seq": 0}))).await;
    assert_fatal(&out, &end, "position_ahead", &ahead.to_string());
    assert_fatal(&out, &end, "position_ahead", "reconnect with position null");
    let (out, end) = one_frame(&sync, hello(generation.clone(), json!({"lsn": "FFFFFFFF/FFFFFFFF", "seq": 0}))).await;
    assert_fatal(&out, &end, "position_ahead", "FFFFFFFF/FFFFFFFF");

    // Garbage: unparseable LSNs and wrong types.
    for (position, needle) in [
        (json!({"lsn": "not-an-lsn", "seq": 0}), "position: LSN must have the form X/Y"),
        (json!({"lsn": "0/G", "seq": 0}), "position: LSN half"),
        (json!({"lsn": "0/16B3748", "seq": -1}), "position: invalid"),
        (json!({"lsn": "0/16B3748", "seq": "3"}), "position: invalid type"),
        (json!({"lsn": 12345, "seq": 0}), "position: invalid type"),
        (json!("0/16B3748"), "position: invalid type"),
        (json!([1, 2]), "position: invalid type"),
    ] {
        let (out, end) = one_frame(&sync, hello(generation.clone(), position.clone())).await;
        assert_fatal(&out, &end, "bad_request", needle);
    }
    let (out, end) = one_frame(&sync, hello(json!("seven"), json!({"lsn": "0/1", "seq": 0}))).await;
    assert_fatal(&out, &end, "bad_request", "generation: invalid type");
    let (out, end) = one_frame(&sync, "{not json".into()).await;
    assert_fatal(&out, &end, "bad_request", "expected a hello first");

    // The registry holds none of them.
    let (c, conn) = tokio_postgres::connect(&_cluster.url(), NoTls).await.unwrap();
    tokio::spawn(conn);
    let n: i64 = c.query_one("SELECT count(*) FROM moai_sync.clients", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);

    // And a correct hello from the same server still works.
    let (itx, irx) = mpsc::channel(8);
    let (otx, mut orx) = mpsc::channel(64);
    let s = sync.clone();
    tokio::spawn(
        async move { s.run_session(irx, otx, moai_pgsync::Access::all(), None, std::future::pending()).await },
    );
    itx.send(hello(Value::Null, Value::Null)).await.unwrap();
    loop {
        let t = tokio::time::timeout(Duration::from_secs(30), orx.recv()).await.expect("reply").expect("open");
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_ne!(v["type"], "error", "{v}");
        if v["type"] == "up_to_date" {
            break;
        }
    }
    sync.shutdown().await;
}
