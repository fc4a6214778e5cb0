//! The Rust change feed client (crates/moai-pgsync-client) against the real moai binary and a
//! real PostgreSQL cluster: snapshot + stream equal the table under concurrent writes; the
//! client survives `kill -9` of moai (restarted on the same port) and a Postgres restart by
//! itself, ending equal to the table without applying any transaction twice.
//!
//! Waits are on the client's status channel and on log lines, with timeouts; no sleeps.

mod support;

// The throwaway cluster (crates/moai-pgsync/tests/support/pg.rs), included once by support.
use support::pg;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use moai_pgsync_client::{spawn, BackoffConfig, ClientConfig, ClientError, ClientHandle, MemoryStore, Row, Shape};
use serde_json::{json, Value};
use support::Server;
use tokio_postgres::{Client, NoTls};

const ITEMS: &str = "public.items";

async fn sql(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect to postgres");
    tokio::spawn(conn);
    client
}

/// The table as the client's store keys it: canonical key text → row.
async fn table_rows(c: &Client) -> BTreeMap<String, Row> {
    c.query("SELECT to_jsonb(t) FROM public.items t", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| {
            let v: Value = r.get(0);
            let m = v.as_object().unwrap().clone();
            (moai_pgsync_client::key_text(json!({"id": m["id"]}).as_object().unwrap()), m)
        })
        .collect()
}

fn client_config(ws_url: String, client_id: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(ws_url, client_id, vec![Shape::table("items", ITEMS)]);
    cfg.max_batch_rows = Some(200);
    cfg.window = Some(2);
    cfg.backoff = BackoffConfig { initial: Duration::from_millis(20), max: Duration::from_millis(400) };
    cfg.idle_timeout = Duration::from_secs(5);
    cfg
}

/// Wait (on status changes, up to `secs`) until the store holds exactly `expected`.
async fn wait_equal(client: &ClientHandle<MemoryStore>, expected: &BTreeMap<String, Row>, secs: u64) {
    let mut status = client.status();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if client.store().lock().unwrap().table(ITEMS) == *expected {
            return;
        }
        let have = client.store().lock().unwrap().table(ITEMS).len();
        let last = status.borrow().clone();
        match tokio::time::timeout_at(deadline, status.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("client stopped; status {last:?}"),
            Err(_) => panic!("store never equalled the table ({have} vs {} rows); status {last:?}", expected.len()),
        }
    }
}

async fn wait_status(
    client: &ClientHandle<MemoryStore>,
    what: &str,
    cond: impl Fn(&moai_pgsync_client::Status) -> bool,
) {
    let mut status = client.status();
    let ok = matches!(tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| cond(s))).await, Ok(Ok(_)));
    let last = status.borrow().clone();
    assert!(ok, "timed out waiting for {what}; status {last:?}");
}

/// Every applied transaction is applied once, in commit order.
fn assert_no_duplicates(client: &ClientHandle<MemoryStore>) {
    let store = client.store().lock().unwrap();
    let j = store.journal();
    assert!(!j.is_empty());
    if let Some(w) = j.windows(2).find(|w| w[0] >= w[1]) {
        panic!("transaction applied twice or out of order: {} then {}", w[0], w[1]);
    }
}

/// Connects while Postgres may be restarting: retries with a short backoff (20 ms doubling to
/// 200 ms) and fails the test if no connection succeeds before `deadline`.
async fn connect_retrying(url: &str, deadline: tokio::time::Instant) -> Client {
    let mut backoff = Duration::from_millis(20);
    loop {
        let error = match tokio::time::timeout_at(deadline, tokio_postgres::connect(url, NoTls)).await {
            Ok(Ok((client, conn))) => {
                tokio::spawn(conn);
                return client;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect attempt still pending".to_owned(),
        };
        assert!(
            tokio::time::Instant::now() + backoff < deadline,
            "Postgres did not accept connections again before the deadline; last error: {error}"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

/// `n` single-row insert transactions (ids from `first`), each retried until it commits
/// (a Postgres restart breaks the connection mid-way). `at_half` fires after `n / 2`.
fn writer(url: String, first: i64, n: i64, at_half: tokio::sync::oneshot::Sender<()>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut half = Some(at_half);
        let mut conn: Option<Client> = None;
        for i in 0..n {
            if i == n / 2 {
                if let Some(h) = half.take() {
                    let _ = h.send(());
                }
            }
            // Each transaction must commit within a minute of its first attempt, restart included.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let c = match conn.take() {
                    Some(c) if !c.is_closed() => c,
                    _ => connect_retrying(&url, deadline).await,
                };
                let id = first + i;
                let stmt = format!(
                    "INSERT INTO items VALUES ({id}, {i}, 'w') ON CONFLICT (id) DO UPDATE SET val = items.val + 1; \
                     UPDATE items SET val = val + 1 WHERE id = {}",
                    1 + i % 50
                );
                match c.batch_execute(&stmt).await {
                    Ok(()) => {
                        conn = Some(c);
                        break;
                    }
                    Err(e) => assert!(
                        tokio::time::Instant::now() < deadline,
                        "transaction {i} did not commit within 60 s: {e}"
                    ),
                }
            }
        }
    })
}

fn setup_cluster() -> pg::PgCluster {
    pg::PgCluster::start()
}

async fn create_items(url: &str, seed: i64) -> Client {
    let c = sql(url).await;
    c.batch_execute(&format!(
        "CREATE TABLE public.items (id bigint PRIMARY KEY, val int NOT NULL, note text); \
         INSERT INTO public.items SELECT g, 0, 'seed' FROM generate_series(1, {seed}) g;"
    ))
    .await
    .unwrap();
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_stream_equal_the_table_under_concurrent_writes() {
    let cluster = setup_cluster();
    let url = cluster.url();
    let c = create_items(&url, 2000).await;
    let server = Server::start(&["--pg-url", &url, "--pg-tables", ITEMS, "--sync-shared-secret", "pgs"]);
    server.wait_ready();
    let token = moai_server::Auth::with_secret("pgs")
        .mint(&moai_server::auth::Claims {
            sub: "app".into(),
            exp: None,
            docs: None,
            tables: None,
            ..Default::default()
        })
        .unwrap();

    // A wrong token stops the client with a typed error instead of retrying forever.
    let mut bad = client_config(server.ws_url("/api/sync"), "c-bad-token");
    bad.token = Some("not-a-token".into());
    let bad = spawn(bad, MemoryStore::new());
    match tokio::time::timeout(Duration::from_secs(30), bad.join()).await.expect("gives up") {
        Err(ClientError::Unauthorized(m)) => assert!(m.contains("4401"), "{m}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }

    // Writes run while the client takes its snapshot and catches up.
    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let w = writer(url.clone(), 10_000, 400, half_tx);
    let mut cfg = client_config(server.ws_url("/api/sync"), "c-exact");
    cfg.token = Some(token);
    let client = spawn(cfg, MemoryStore::with_journal());
    half_rx.await.unwrap();
    wait_status(&client, "up_to_date", |s| s.up_to_date).await;
    w.await.unwrap();
    let expected = table_rows(&c).await;
    assert_eq!(expected.len(), 2400);
    wait_equal(&client, &expected, 60).await;
    assert_no_duplicates(&client);
    let s = client.status().borrow().clone();
    assert_eq!((s.connections, s.snapshots), (1, 1), "{s:?}");
    // The server holds the client's acked position.
    let pos = s.position.expect("position");
    // The server writes acked positions in the background: poll with a short backoff (20 ms
    // doubling to 200 ms) until the registry holds it, failing after 30 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut backoff = Duration::from_millis(20);
    loop {
        let r =
            c.query_opt("SELECT pos_lsn::text FROM moai_sync.clients WHERE client_id = 'c-exact'", &[]).await.unwrap();
        let registered = r.and_then(|r| r.get::<_, Option<String>>(0));
        if registered.as_ref().is_some_and(|lsn| lsn.parse::<moai_pgsync_client::Lsn>().unwrap() >= pos.lsn) {
            break;
        }
        assert!(
            tokio::time::Instant::now() + backoff < deadline,
            "the acked position {} never reached the registry (it holds {registered:?})",
            pos.lsn
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
    client.stop();
    client.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_moai_mid_stream_the_client_reconnects_and_applies_nothing_twice() {
    let cluster = setup_cluster();
    let url = cluster.url();
    let c = create_items(&url, 100).await;
    let port = free_port().to_string();
    let args = ["--port", port.as_str(), "--pg-url", url.as_str(), "--pg-tables", ITEMS];
    let mut server = Server::start(&args);
    server.wait_ready();
    let ws_url = server.ws_url("/api/sync");
    let client = spawn(client_config(ws_url.clone(), "c-kill"), MemoryStore::with_journal());
    wait_status(&client, "up_to_date", |s| s.up_to_date).await;

    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let w = writer(url.clone(), 10_000, 600, half_tx);
    half_rx.await.unwrap();
    // Mid-stream: the client has applied some of the writes, not all.
    wait_status(&client, "some live transactions", |s| s.applied_txns >= 20).await;
    server.child.kill().expect("kill -9 moai"); // SIGKILL: no shutdown, no close frames
    server.child.wait().unwrap();
    wait_status(&client, "the client to notice", |s| !s.connected).await;

    let server2 = Server::start(&args);
    assert_eq!(server2.ws_url("/api/sync"), ws_url, "same port");
    w.await.unwrap();
    let expected = table_rows(&c).await;
    wait_equal(&client, &expected, 90).await;
    assert_no_duplicates(&client);
    let s = client.status().borrow().clone();
    assert!(s.connections >= 2, "reconnected by itself: {s:?}");
    assert_eq!(s.snapshots, 1, "resumed from its position, no second snapshot: {s:?}");
    client.stop();
    client.join().await.unwrap();
    drop(server2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_the_client_ends_equal_to_the_table() {
    let cluster = Arc::new(setup_cluster());
    let url = cluster.url();
    let _ = create_items(&url, 100).await;
    let server = Server::start(&["--pg-url", &url, "--pg-tables", ITEMS]);
    server.wait_ready();
    let client = spawn(client_config(server.ws_url("/api/sync"), "c-pg-restart"), MemoryStore::with_journal());
    wait_status(&client, "up_to_date", |s| s.up_to_date).await;

    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let w = writer(url.clone(), 10_000, 400, half_tx);
    half_rx.await.unwrap();
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.restart()).await.unwrap();
    w.await.unwrap();

    let c = sql(&url).await;
    let expected = table_rows(&c).await;
    assert_eq!(expected.len(), 500);
    wait_equal(&client, &expected, 90).await;
    assert_no_duplicates(&client);
    let s = client.status().borrow().clone();
    assert_eq!(s.snapshots, 1, "no refetch: {s:?}");
    client.stop();
    client.join().await.unwrap();
}
