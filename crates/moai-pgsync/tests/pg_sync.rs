//! The engine against a real PostgreSQL (see tests/support/pg.rs for how it is started).
//! Waits are on conditions with timeouts, never sleeps.

mod support;

use std::time::Duration;

use moai_pgsync::{PgSync, PgSyncConfig, Phase};
use serde_json::json;
use support::client::{table_rows, TestClient};
use support::pg::PgCluster;
use tokio_postgres::{Client, NoTls};

const ITEMS: &str = "public.items";

fn config(cluster: &PgCluster) -> PgSyncConfig {
    support::sync_config(cluster, &[ITEMS])
}

async fn setup() -> (PgCluster, Client) {
    support::init_tracing();
    let cluster = PgCluster::start();
    let c = cluster.sql().await;
    c.batch_execute("CREATE TABLE public.items (id bigint PRIMARY KEY, val int NOT NULL, note text)").await.unwrap();
    (cluster, c)
}

async fn start(cluster: &PgCluster) -> PgSync {
    let sync = PgSync::start(config(cluster)).await.expect("start");
    tokio::time::timeout(Duration::from_secs(60), sync.wait_caught_up()).await.expect("caught up in time").unwrap();
    sync
}

/// Connects while Postgres may be restarting: retries with a short backoff (20 ms doubling to
/// 200 ms) and fails the test if no connection succeeds before `deadline`.
async fn connect_retrying(url: &str, deadline: tokio::time::Instant) -> Client {
    let mut backoff = Duration::from_millis(20);
    loop {
        let error = match tokio::time::timeout_at(deadline, tokio_postgres::connect(url, NoTls)).await {
            Ok(Ok((client, conn))) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
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

async fn history_count(c: &Client) -> (i64, i64) {
    let r = c
        .query_one("SELECT count(*), count(DISTINCT (pk->>'id')) FROM moai_sync.change_history WHERE op = 'I'", &[])
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_catching_up_with_startup_wal() {
    let (cluster, c) = setup().await;
    // A first run creates publication, slot and generation, then stops. What is committed after
    // that is WAL the next start must consume before it may say it is ready.
    let first = start(&cluster).await;
    let generation = first.feed().borrow().generation;
    first.shutdown().await;

    // The backlog: 50 000 rows in 500 transactions, committed while moai is down.
    const TXNS: i64 = 500;
    const ROWS: i64 = 100;
    c.batch_execute(&format!(
        "DO $$ BEGIN FOR t IN 0..{} LOOP \
           INSERT INTO items SELECT g, t, 'backlog' FROM generate_series(t * {ROWS} + 1, (t + 1) * {ROWS}) g; \
           COMMIT; \
         END LOOP; END $$",
        TXNS - 1
    ))
    .await
    .unwrap();
    assert_eq!(history_count(&c).await, (0, 0), "moai was down: nothing of the backlog is in history yet");

    // Start without waiting: `start` returns once the replicator holds the slot, before it has
    // consumed the backlog.
    let t0 = std::time::Instant::now();
    let sync = PgSync::start(config(&cluster)).await.expect("start");
    let mut feed = sync.feed();
    let mut not_ready_seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let ready = loop {
        let state = feed.borrow_and_update().clone();
        if state.caught_up {
            assert!(sync.is_ready());
            break state;
        }
        assert_ne!(state.phase, Phase::Stopped, "the replicator stopped");
        not_ready_seen += 1;
        match tokio::time::timeout_at(deadline, feed.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the feed closed before catching up"),
            Err(_) => panic!("not caught up within 120 s; last state {:?}", feed.borrow().clone()),
        }
    };
    eprintln!("ready {:?} after start, {not_ready_seen} not-ready states seen", t0.elapsed());
    assert!(not_ready_seen > 0, "ready at once, before consuming a backlog of {} rows", TXNS * ROWS);

    // Readiness came only once the backlog was history: the state that first said ready has a
    // watermark (every commit at or below it is in change_history) at or past the last backlog
    // commit, and every backlog row is there, once.
    assert_eq!(history_count(&c).await, (TXNS * ROWS, TXNS * ROWS), "every backlog change in change_history");
    let last_backlog: String =
        c.query_one("SELECT max(commit_lsn)::text FROM moai_sync.change_history", &[]).await.unwrap().get(0);
    let last_backlog: moai_pgsync::Lsn = last_backlog.parse().unwrap();
    assert!(
        ready.watermark >= last_backlog,
        "ready at watermark {} before the last backlog commit {last_backlog} was in history",
        ready.watermark
    );
    let txns: i64 =
        c.query_one("SELECT count(DISTINCT commit_lsn) FROM moai_sync.change_history", &[]).await.unwrap().get(0);
    assert_eq!(txns, TXNS, "one history transaction per backlog transaction");

    let f = sync.feed().borrow().clone();
    assert_eq!(f.phase, Phase::Streaming);
    assert_eq!(f.generation, generation, "the same generation: the backlog came through the kept slot");
    // The slot and publication exist; the state row carries the generation.
    let g: i64 = c.query_one("SELECT generation FROM moai_sync.replication_state", &[]).await.unwrap().get(0);
    assert_eq!(g as u64, f.generation);
    let n: i64 = c
        .query_one("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'moai_sync'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_stream_are_exact_under_concurrent_writes() {
    let (cluster, c) = setup().await;
    c.batch_execute("INSERT INTO items SELECT g, 0, 'seed' FROM generate_series(1, 2000) g").await.unwrap();
    let sync = start(&cluster).await;

    // A writer keeps changing rows while the client takes its snapshot and catches up.
    let w = cluster.sql().await;
    let writer = tokio::spawn(async move {
        for i in 0..300i64 {
            let id = 1 + (i * 7) % 2000;
            w.batch_execute(&format!(
                "BEGIN; UPDATE items SET val = val + 1, note = 'w{i}' WHERE id = {id}; \
                 INSERT INTO items VALUES ({}, {i}, 'new'); DELETE FROM items WHERE id = {}; COMMIT;",
                10_000 + i,
                1 + (i * 13) % 2000
            ))
            .await
            .unwrap();
        }
    });
    let mut client = TestClient::connect(&sync, "c-exact");
    client.hello(&[ITEMS], 500, 4).await;
    client.expect_type("up_to_date").await;
    writer.await.unwrap();
    let expected = table_rows(&c, ITEMS).await;
    client.until("client state equals the table", |cl| cl.table(ITEMS) == expected).await;
    // Every transaction applied once, in commit order.
    let lsns: Vec<moai_pgsync::Lsn> = client.applied.iter().map(|(l, _)| l.parse().unwrap()).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "transactions out of order or repeated");
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_is_paged_without_loss() {
    let (cluster, c) = setup().await;
    let sync = start(&cluster).await;
    let mut client = TestClient::connect(&sync, "c-big");
    client.hello(&[ITEMS], 5000, 4).await;
    client.expect_type("up_to_date").await;

    const N: i64 = 300_000;
    let t0 = std::time::Instant::now();
    c.batch_execute(&format!("INSERT INTO items SELECT g, g % 100, NULL FROM generate_series(1, {N}) g"))
        .await
        .unwrap();
    eprintln!("insert committed after {:?}", t0.elapsed());
    client.until("all rows", |cl| cl.applied.iter().map(|(_, ops)| ops.len()).sum::<usize>() >= N as usize).await;
    eprintln!("client has all rows after {:?}", t0.elapsed());
    assert_eq!(client.applied.len(), 1, "one transaction, applied once");
    assert_eq!(client.applied[0].1.len(), N as usize);
    assert_eq!(client.table(ITEMS).len(), N as usize);
    // It arrived in several `changes` frames (pages), all but the last with last=false.
    let parts = client.messages.iter().filter(|m| m["type"] == "changes").count();
    assert!(parts >= (N / 5000) as usize, "paged: {parts} frames");
    assert_eq!(history_count(&c).await, (N, N));
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_from_its_position_after_disconnect() {
    let (cluster, c) = setup().await;
    c.batch_execute("INSERT INTO items SELECT g, 0, 'seed' FROM generate_series(1, 100) g").await.unwrap();
    let sync = start(&cluster).await;
    let mut client = TestClient::connect(&sync, "c-resume");
    client.hello(&[ITEMS], 1000, 4).await;
    client.expect_type("up_to_date").await;
    c.batch_execute("INSERT INTO items VALUES (1000, 1, 'live')").await.unwrap();
    client.until("live insert", |cl| cl.table(ITEMS).len() == 101).await;
    let before = client.position.clone().expect("acked position");
    client.disconnect().await;

    // Durable position in the registry equals the acked one.
    let (lsn, seq): (String, i64) = {
        let r = c
            .query_one("SELECT pos_lsn::text, pos_seq FROM moai_sync.clients WHERE client_id = 'c-resume'", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(json!({"lsn": lsn, "seq": seq}), before);
    // What the dashboard shows: the registered client, its position, a lag that closes.
    let status = sync.status().await.expect("status");
    assert_eq!(status.registered_clients, 1);
    assert_eq!(status.oldest_client_position.map(|p| p.to_string()), Some(lsn.clone()));
    assert!(status.wal_end >= sync.feed().borrow().watermark, "{status:?}");

    for i in 0..50 {
        c.batch_execute(&format!("INSERT INTO items VALUES ({}, {i}, 'offline')", 2000 + i)).await.unwrap();
    }
    let applied_before = client.applied.len();
    client.reconnect(&sync);
    client.hello(&[ITEMS], 7, 2).await;
    let welcome = client.expect_type("welcome").await;
    assert_eq!(welcome["mode"], "catchup");
    let expected = table_rows(&c, ITEMS).await;
    client.until("caught up", |cl| cl.table(ITEMS) == expected).await;
    let new: Vec<_> = client.applied[applied_before..].to_vec();
    assert_eq!(new.len(), 50, "exactly the offline transactions, no duplicates");
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_loses_and_duplicates_nothing() {
    let (cluster, _c) = setup().await;
    let sync = start(&cluster).await;
    let mut client = TestClient::connect(&sync, "c-restart");
    client.hello(&[ITEMS], 1000, 4).await;
    client.expect_type("up_to_date").await;

    let cluster = std::sync::Arc::new(cluster);
    let url = cluster.url();
    let (half_tx, half_rx) = tokio::sync::oneshot::channel::<()>();
    // 200 transactions of 50 rows; each retried until it commits (the restart breaks some).
    let writer = tokio::spawn(async move {
        let mut half = Some(half_tx);
        let mut conn: Option<Client> = None;
        for t in 0..200i64 {
            if t == 80 {
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
                let sql = format!(
                    "INSERT INTO items SELECT g, {t}, 'r' FROM generate_series({}, {}) g ON CONFLICT (id) DO NOTHING",
                    t * 50 + 1,
                    t * 50 + 50
                );
                match c.batch_execute(&sql).await {
                    Ok(()) => {
                        conn = Some(c);
                        break;
                    }
                    Err(e) => assert!(
                        tokio::time::Instant::now() < deadline,
                        "transaction {t} did not commit within 60 s: {e}"
                    ),
                }
            }
        }
    });
    half_rx.await.unwrap();
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.restart()).await.unwrap();
    writer.await.unwrap();

    let c = cluster.sql().await;
    let expected = table_rows(&c, ITEMS).await;
    assert_eq!(expected.len(), 10_000);
    client.until("client has every row", |cl| cl.table(ITEMS) == expected).await;
    assert_eq!(history_count(&c).await, (10_000, 10_000), "no gap, no duplicate in change_history");
    let ops: usize = client.applied.iter().map(|(_, o)| o.len()).sum();
    assert_eq!(ops, 10_000, "the client got every change exactly once");
    drop(c);
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_starts_a_new_generation_and_clients_refetch() {
    let (cluster, c) = setup().await;
    c.batch_execute("INSERT INTO items SELECT g, 0, 'seed' FROM generate_series(1, 10) g").await.unwrap();
    let sync = start(&cluster).await;
    let g1 = sync.feed().borrow().generation;
    let mut client = TestClient::connect(&sync, "c-lost");
    client.hello(&[ITEMS], 100, 4).await;
    client.expect_type("up_to_date").await;

    // Lose the slot while the replicator is streaming: kill its walsender (waiting until it is
    // gone) and drop the slot before the replicator reconnects (its backoff is >= 50 ms).
    let mut dropped = false;
    for _ in 0..50 {
        let r = c
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid, 10000) FROM pg_replication_slots \
                 WHERE slot_name = 'moai_sync' AND active_pid IS NOT NULL; \
                 SELECT pg_drop_replication_slot('moai_sync');",
            )
            .await;
        if r.is_ok() {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "could not drop the slot");
    let old_position = client.position.clone();
    // The live session is told to refetch.
    let m = client.expect_type("must_refetch").await;
    assert_eq!(m["reason"], "generation_changed");
    let g2 = sync.feed().borrow().generation;
    assert_ne!(g1, g2);
    client.disconnect().await;

    // A client coming back with the old generation and position is told to refetch, then gets
    // a fresh snapshot.
    client.generation = Some(g1);
    client.position = old_position;
    client.reconnect(&sync);
    client.hello(&[ITEMS], 100, 4).await;
    let m = client.expect_type("must_refetch").await;
    assert_eq!(m["reason"], "generation_changed");
    let w = client.expect_type("welcome").await;
    assert_eq!(w["mode"], "snapshot");
    assert_eq!(w["generation"].as_u64(), Some(g2));
    client.expect_type("up_to_date").await;
    assert_eq!(client.table(ITEMS), table_rows(&c, ITEMS).await);
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_arrive_in_commit_order() {
    let (cluster, _c) = setup().await;
    let sync = start(&cluster).await;
    let mut client = TestClient::connect(&sync, "c-order");
    client.hello(&[ITEMS], 100, 4).await;
    client.expect_type("up_to_date").await;

    let a = cluster.sql().await;
    let b = cluster.sql().await;
    a.batch_execute("BEGIN; INSERT INTO items VALUES (1, 1, 'a1')").await.unwrap();
    b.batch_execute("BEGIN; INSERT INTO items VALUES (2, 2, 'b1')").await.unwrap();
    a.batch_execute("INSERT INTO items VALUES (3, 3, 'a2')").await.unwrap();
    b.batch_execute("INSERT INTO items VALUES (4, 4, 'b2'); COMMIT").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    client.until("both transactions", |cl| cl.applied.len() >= 2).await;
    let ids: Vec<Vec<i64>> =
        client.applied.iter().map(|(_, ops)| ops.iter().map(|o| o["key"]["id"].as_i64().unwrap()).collect()).collect();
    assert_eq!(ids, vec![vec![2, 4], vec![1, 3]], "whole transactions, in commit order");
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_makes_subscribed_clients_refetch() {
    let (cluster, c) = setup().await;
    let sync = start(&cluster).await;
    let mut client = TestClient::connect(&sync, "c-ddl");
    client.hello(&[ITEMS], 100, 4).await;
    client.expect_type("up_to_date").await;
    c.batch_execute("INSERT INTO items VALUES (1, 1, 'x')").await.unwrap();
    client.until("first row", |cl| cl.table(ITEMS).len() == 1).await;
    c.batch_execute("ALTER TABLE items ADD COLUMN extra int; INSERT INTO items VALUES (2, 2, 'y', 7)").await.unwrap();
    let m = client.expect_type("must_refetch").await;
    assert_eq!(m["reason"], "schema_changed");
    assert_eq!(m["shape_ids"], json!([ITEMS]));
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_live_clients_need_and_refuses_older_positions() {
    let (cluster, c) = setup().await;
    let mut cfg = config(&cluster);
    cfg.retention = Some(Duration::ZERO);
    let sync = PgSync::start(cfg).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), sync.wait_caught_up()).await.unwrap().unwrap();
    let mut client = TestClient::connect(&sync, "c-ret");
    client.hello(&[ITEMS], 100, 4).await;
    client.expect_type("up_to_date").await;
    c.batch_execute("INSERT INTO items VALUES (1, 1, 'a')").await.unwrap();
    client.until("first", |cl| cl.table(ITEMS).len() == 1).await;
    let early = client.position.clone();
    c.batch_execute("INSERT INTO items VALUES (2, 2, 'b')").await.unwrap();
    client.until("second", |cl| cl.table(ITEMS).len() == 2).await;
    let latest = client.position.clone();
    client.disconnect().await;

    sync.run_maintenance().await.unwrap();
    let horizon = sync.feed().borrow().horizon;
    assert_eq!(
        horizon.to_string(),
        latest.as_ref().unwrap()["lsn"].as_str().unwrap(),
        "horizon stops at the live client"
    );
    let left: i64 = c.query_one("SELECT count(*) FROM moai_sync.change_history", &[]).await.unwrap().get(0);
    assert_eq!(left, 1, "only the transaction the client still has at its position is kept");

    // The registered client resumes; a client behind the horizon must refetch.
    client.reconnect(&sync);
    client.hello(&[ITEMS], 100, 4).await;
    assert_eq!(client.expect_type("welcome").await["mode"], "catchup");
    client.disconnect().await;
    let mut old = TestClient::connect(&sync, "c-old");
    old.generation = client.generation;
    old.position = early;
    old.hello(&[ITEMS], 100, 4).await;
    assert_eq!(old.expect_type("must_refetch").await["reason"], "position_too_old");
    old.expect_type("up_to_date").await;
    assert_eq!(old.table(ITEMS).len(), 2);
    sync.shutdown().await;
}
