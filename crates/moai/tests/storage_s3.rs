//! The binary with Yjs snapshots in object storage (`--s3-url`), against a real S3-compatible
//! server (moto, crates/moai-storage/tests/support/moto.rs): Yjs clients edit, compaction writes
//! each document's snapshot as one object (a full Yjs update any Yjs tool reads), `kill -9` and a
//! restart lose nothing; while the object store does not answer, editing goes on and compaction
//! is retried later, and a document whose snapshot cannot be read (store paused or gone, object
//! corrupt) is refused with 1011, never served empty.

mod support;

use std::io::{Read, Write};
use std::sync::Once;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use moai_storage::object_store::aws::{AmazonS3, AmazonS3Builder};
use moai_storage::object_store::path::Path as ObjectPath;
use moai_storage::object_store::{ObjectStoreExt, PutPayload};
use moai_yjs::protocol::sync_update_frame;
use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::{Doc, GetString, Transact, Update};
use moai_yjs::{Message, SyncMessage};
use support::ws::{closed_within, connect, next_within, Ws};
use support::yjs::{edit, sync, text_of_update};
use support::{moto, Server};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const BUCKET: &str = "moai-e2e";

/// moai takes credentials from the standard AWS variables, as in production. Every test of this
/// binary sets the same values, before it starts a server.
fn aws_credentials() {
    static SET: Once = Once::new();
    SET.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY);
    });
}

fn start_moto() -> moto::Moto {
    aws_credentials();
    let moto = moto::Moto::start();
    moto.create_bucket(BUCKET);
    moto
}

/// moai on the SQLite file `db` (kept across restarts) with snapshots in the bucket.
fn start(db: &std::path::Path, moto: &moto::Moto, extra: &[&str]) -> Server {
    let endpoint = moto.endpoint();
    let mut args = vec![
        "--s3-url",
        "s3://moai-e2e/yjs",
        "--s3-endpoint",
        &endpoint,
        "--s3-region",
        moto::REGION,
        "--yjs-compact-bytes",
        "2KiB",
    ];
    args.extend_from_slice(extra);
    let server = Server::start_in(tempfile::tempdir().unwrap(), db, &args);
    server.wait_ready();
    server
}

/// A client of the bucket, as a backup tool would read it.
fn bucket(moto: &moto::Moto) -> AmazonS3 {
    moai_storage::install_tls_provider();
    AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_region(moto::REGION)
        .with_bucket_name(BUCKET)
        .with_access_key_id(moto::ACCESS_KEY_ID)
        .with_secret_access_key(moto::SECRET_ACCESS_KEY)
        .build()
        .unwrap()
}

/// The object of `key`, if there is one.
async fn object(moto: &moto::Moto, key: &str) -> Option<Vec<u8>> {
    let path = ObjectPath::parse(key).unwrap();
    match bucket(moto).get(&path).await {
        Ok(found) => Some(found.bytes().await.unwrap().to_vec()),
        Err(moai_storage::object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("{e}"),
    }
}

/// Waits until `key` holds a snapshot whose text passes `done`; returns that text.
async fn wait_object(moto: &moto::Moto, key: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(bytes) = object(moto, key).await {
            let text = text_of_update(&bytes);
            if done(&text) {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "no snapshot of {key} in the bucket");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two Yjs clients of one new document: `a` writes, `b` watches.
struct Clients {
    a: Ws,
    b: Ws,
    writer: Doc,
    seen: Doc,
}

impl Clients {
    async fn open(url: &str) -> Clients {
        Clients { a: connect(url).await, b: connect(url).await, writer: Doc::new(), seen: Doc::new() }
    }

    /// Sends `words` as separate edits from `a`, and waits until `b` has received all of them:
    /// the server broadcasts an update only once it is durable, so they are acknowledged then.
    async fn edit(&mut self, words: &[String]) {
        for w in words {
            self.a.send(WsMessage::Binary(sync_update_frame(&edit(&self.writer, w)).into())).await.unwrap();
        }
        let want = text(&self.writer);
        while text(&self.seen) != want {
            if let WsMessage::Binary(frame) = next_within(&mut self.b, Duration::from_secs(20)).await {
                if let Ok(Message::Sync(SyncMessage::Update(u) | SyncMessage::Step2(u))) = Message::decode(&frame) {
                    self.seen.transact_mut().apply_update(Update::decode_v1(u).unwrap()).unwrap();
                }
            }
        }
    }

    fn text(&self) -> String {
        text(&self.writer)
    }
}

fn text(doc: &Doc) -> String {
    let t = doc.get_or_insert_text("t");
    let s = t.get_string(&doc.transact());
    s
}

/// The document's text as the HTTP API serves it, or the error status.
fn read(server: &Server, doc: &str) -> Result<String, u16> {
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /api/v1/docs/{doc}/update HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let status: u16 = String::from_utf8_lossy(&raw[9..12]).parse().unwrap();
    match status {
        200 => Ok(text_of_update(&raw[split..])),
        other => Err(other),
    }
}

fn words(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}-{} ", "x".repeat(60))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_go_to_the_bucket_and_nothing_is_lost_across_kill_9() {
    let moto = start_moto();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let mut server = start(&db, &moto, &[]);
    let line = server.wait_log("Yjs snapshots in object storage", Duration::from_secs(5)).unwrap();
    assert!(line.contains("s3://moai-e2e/yjs"), "{line}");

    // Two Yjs clients; one writes well past the 2 KiB compaction threshold.
    let doc = "team/notes 1"; // not a plain key: stored percent-encoded
    let url = server.ws_url("/sync/v1/team%2Fnotes%201");
    let mut clients = Clients::open(&url).await;
    clients.edit(&words("a", 60)).await;
    // The compaction wrote the snapshot as one object: a full Yjs update with the edits.
    let key = "yjs/team%2Fnotes%201.bin";
    let snapshot = wait_object(&moto, key, |t| t.len() > 1000).await;
    assert!(clients.text().starts_with(&snapshot), "the snapshot holds the first edits: {snapshot:?}");

    // More edits after the compaction (in the journal), then kill -9.
    clients.edit(&words("b", 5)).await;
    let all = clients.text();
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).unwrap();
    drop(clients);

    // The database holds the journal tail and no snapshot (looked at on SQLite, the default; the
    // test servers run on PostgreSQL under MOAI_TEST_STORAGE=postgres).
    if std::env::var("MOAI_TEST_STORAGE").is_ok_and(|s| s == "postgres") {
        return finish(&db, &moto, &all).await;
    }
    let sqlite = moai_storage::SqliteStorage::open(
        &db,
        moai_storage::SqliteOptions::default(),
        std::sync::Arc::new(moai_storage::NoopObserver),
    )
    .unwrap();
    let stored = moai_storage::DocJournal::load(&sqlite, doc).await.unwrap();
    assert_eq!(stored.snapshot, None, "no snapshot in the database");
    assert!(!stored.updates.is_empty(), "the journal tail is in the database");
    sqlite.close().await.unwrap();
    finish(&db, &moto, &all).await;
}

/// Restart: a reader finds everything, over HTTP and over WebSocket.
async fn finish(db: &std::path::Path, moto: &moto::Moto, all: &str) {
    let server = start(db, moto, &[]);
    assert_eq!(read(&server, "team%2Fnotes%201").unwrap(), all);
    let mut reader = connect(&server.ws_url("/sync/v1/team%2Fnotes%201")).await;
    assert_eq!(sync(&mut reader).await, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_object_store_fails_compaction_not_editing_and_unreadable_snapshots_are_refused() {
    let mut moto = start_moto();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let mut server = start(&db, &moto, &["--s3-timeout", "1s", "--yjs-idle-evict", "300ms"]);

    // "cold" gets a snapshot, and is evicted once its clients leave.
    let cold_url = server.ws_url("/sync/v1/cold");
    let mut cold = Clients::open(&cold_url).await;
    cold.edit(&words("c", 40)).await;
    let cold_text = cold.text();
    wait_object(&moto, "yjs/cold.bin", |t| t == cold_text).await;
    drop(cold);

    // "live" has a snapshot and stays open.
    let live_url = server.ws_url("/sync/v1/live");
    let mut live = Clients::open(&live_url).await;
    live.edit(&words("l", 40)).await;
    wait_object(&moto, "yjs/live.bin", |t| t.len() > 1000).await;
    // Well past --yjs-idle-evict: "cold" is no longer in memory.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The object store stops answering. Editing goes on: every edit is durable and broadcast.
    moto.pause();
    let started = Instant::now();
    live.edit(&words("m", 40)).await;
    assert!(started.elapsed() < Duration::from_secs(10), "editing was held up: {:?}", started.elapsed());
    let failed = server.wait_log("compaction failed", Duration::from_secs(10)).expect("a compaction failed");
    assert!(failed.contains("object storage"), "{failed}");

    // A document whose snapshot cannot be read is refused (1011), within the timeout, not served
    // empty; the HTTP API answers 503.
    let started = Instant::now();
    let mut refused = connect(&cold_url).await;
    let (code, reason) = closed_within(&mut refused, Duration::from_secs(10)).await;
    assert_eq!((code, reason.as_str()), (1011, "document could not be loaded"));
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(server.wait_log("document failed to load; refusing it", Duration::from_secs(1)).is_some());
    assert_eq!(read(&server, "cold"), Err(503));

    // The store is back: the cold document loads whole, compaction catches up (retried after a
    // write once its pause is over), and a restart after kill -9 finds everything.
    moto.resume();
    let mut reader = connect(&cold_url).await;
    assert_eq!(sync(&mut reader).await, cold_text);
    let before_resume = live.text();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        live.edit(&[format!("z{i} ")]).await;
        let snapshot = object(&moto, "yjs/live.bin").await.map(|o| text_of_update(&o)).unwrap_or_default();
        if snapshot.starts_with(&before_resume) {
            break;
        }
        assert!(Instant::now() < deadline, "compaction never caught up: {} bytes", snapshot.len());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    live.edit(&words("n", 3)).await;
    let all = live.text();
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).unwrap();
    drop(live);
    let server = start(&db, &moto, &["--s3-timeout", "1s"]);
    assert_eq!(read(&server, "live").unwrap(), all);

    // A corrupt object: refused, never served as if the document were empty.
    let key = ObjectPath::parse("yjs/cold.bin").unwrap();
    bucket(&moto).put(&key, PutPayload::from(b"not a yjs update".to_vec())).await.unwrap();
    let mut refused = connect(&server.ws_url("/sync/v1/cold")).await;
    assert_eq!(closed_within(&mut refused, Duration::from_secs(10)).await.0, 1011);

    // The store is gone (connections refused): every document that is not in memory is refused,
    // even one that never had a snapshot (nothing can tell that it has none).
    moto.kill();
    let mut refused = connect(&server.ws_url("/sync/v1/brand-new")).await;
    assert_eq!(closed_within(&mut refused, Duration::from_secs(10)).await.0, 1011);
    assert_eq!(read(&server, "brand-new"), Err(503));
    // A document already in memory is still served.
    assert_eq!(read(&server, "live").unwrap(), all);
}

#[test]
fn object_storage_flags_that_do_not_fit_fail_the_start() {
    aws_credentials();
    for (args, message) in [
        (&["--s3-url", "gs://bucket"][..], "expected s3://bucket"),
        (&["--s3-url", "s3://a/p", "--s3-bucket", "b"][..], "both given"),
        (&["--s3-url", "s3://a/p", "--s3-prefix", "q"][..], "goes with --s3-bucket"),
        (&["--s3-endpoint", "http://127.0.0.1:1"][..], "need a bucket"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("moai.db");
        let mut server = Server::start_in(dir, &db, args);
        let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
        assert_eq!(status.code(), Some(1), "{args:?}");
        let logs = server.logs().join("\n");
        assert!(logs.contains(message), "{args:?}: {logs}");
    }
    // A bucket that does not exist fails the start too (the reason on /health and in the log).
    let moto = start_moto();
    let endpoint = moto.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let args = ["--s3-url", "s3://no-such-bucket", "--s3-endpoint", &endpoint, "--s3-timeout", "5s"];
    let mut server = Server::start_in(dir, &db, &args);
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(1));
    let logs = server.logs().join("\n");
    assert!(logs.contains("NoSuchBucket") && logs.contains("s3://no-such-bucket"), "{logs}");
    assert!(!logs.contains(moto::SECRET_ACCESS_KEY), "a credential was logged");
}
