//! Several engines on one database (docs/pgsync-protocol.md §14): one holds the slot and
//! replicates, the others follow the history it commits and serve sessions from it, and take the
//! slot over when it is released. Against a real PostgreSQL (tests/support/pg.rs); the end-to-end
//! version with `kill -9` of the binary is crates/moai/tests/cluster_pgsync.rs.
//!
//! Waits are on conditions with deadlines, never sleeps. The test client applies whatever the
//! server sends (no deduplication), so "applied LSNs strictly increase" is exactly-once delivery.

mod support;

use std::time::{Duration, Instant};

use moai_pgsync::{Lsn, PgSync, PgSyncConfig, Phase};
use serde_json::json;
use support::client::{table_rows, TestClient};
use support::pg::PgCluster;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

const ITEMS: &str = "public.items";

fn config(cluster: &PgCluster) -> PgSyncConfig {
    support::sync_config(cluster, &[ITEMS])
}

/// A follower that re-reads the shared state only on notifications (the periodic poll is an
/// hour away): whatever reaches its sessions within a test's deadline came through NOTIFY.
fn notified_only(cluster: &PgCluster) -> PgSyncConfig {
    let mut cfg = config(cluster);
    cfg.follow_poll_interval = Duration::from_secs(3600);
    cfg
}

async fn setup() -> (PgCluster, Client) {
    support::init_tracing();
    let cluster = PgCluster::start();
    let c = cluster.sql().await;
    c.batch_execute(
        "CREATE TABLE public.items (id bigint PRIMARY KEY, val int NOT NULL, note text); \
         INSERT INTO public.items SELECT g, 0, 'seed' FROM generate_series(1, 100) g; \
         CREATE TABLE public.unsynced (id bigserial PRIMARY KEY, note text);",
    )
    .await
    .unwrap();
    (cluster, c)
}

/// The first engine (it takes the slot), then a second one with `b`: ready while the first
/// replicates, as a follower.
async fn two_engines(cluster: &PgCluster, b: PgSyncConfig) -> (PgSync, PgSync) {
    let a = PgSync::start(config(cluster)).await.expect("start a");
    tokio::time::timeout(Duration::from_secs(60), a.wait_caught_up()).await.expect("a caught up").unwrap();
    assert_eq!(a.role(), "replicating");
    let b = PgSync::start(b).await.expect("a standby starts");
    tokio::time::timeout(Duration::from_secs(60), b.wait_caught_up())
        .await
        .expect("a standby is ready while the other instance replicates")
        .unwrap();
    assert_eq!((a.role(), b.role()), ("replicating", "following"));
    assert_eq!(a.feed().borrow().generation, b.feed().borrow().generation);
    (a, b)
}

/// Waits until `cond` holds for the engine's feed.
async fn wait_feed(sync: &PgSync, what: &str, cond: impl Fn(&moai_pgsync::FeedState) -> bool) {
    let mut feed = sync.feed();
    let ok = matches!(tokio::time::timeout(Duration::from_secs(60), feed.wait_for(|s| cond(s))).await, Ok(Ok(_)));
    assert!(ok, "timed out waiting for {what}; feed {:?}", feed.borrow().clone());
}

/// Every transaction the client applied, it applied once, in commit order.
fn assert_exactly_once_in_order(client: &TestClient) {
    let lsns: Vec<Lsn> = client.applied.iter().map(|(l, _)| l.parse().expect("lsn")).collect();
    if let Some(w) = lsns.windows(2).find(|w| w[0] >= w[1]) {
        panic!("{}: transaction {} delivered after {} (twice or out of order)", client.client_id, w[1], w[0]);
    }
}

/// The ids of the rows the client's applied transactions inserted, in the order applied.
fn inserted_ids(client: &TestClient) -> Vec<i64> {
    client
        .applied
        .iter()
        .flat_map(|(_, ops)| ops.iter())
        .filter(|op| op["op"] == "insert")
        .map(|op| op["row"]["id"].as_i64().expect("id"))
        .collect()
}

async fn durable_watermark(c: &Client) -> Lsn {
    let w: PgLsn = c.query_one("SELECT watermark FROM moai_sync.replication_state", &[]).await.unwrap().get(0);
    Lsn(u64::from(w))
}

/// `n` transactions, one after the other, each inserting row `first + i` and bumping a seed row.
/// `at_half` fires after `n / 2`.
fn writer(c: Client, first: i64, n: i64, at_half: tokio::sync::oneshot::Sender<()>) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        let mut half = Some(at_half);
        for i in 0..n {
            if i == n / 2 {
                if let Some(h) = half.take() {
                    let _ = h.send(());
                }
            }
            c.batch_execute(&format!(
                "INSERT INTO items VALUES ({}, {i}, 'w'); UPDATE items SET val = val + 1 WHERE id = {}",
                first + i,
                1 + i % 100
            ))
            .await
            .unwrap();
        }
        c
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_is_ready_and_serves_what_the_replicator_commits_through_notifications() {
    let (cluster, c) = setup().await;
    let mut a_cfg = config(&cluster);
    // Small chunks: the big transaction below is written in parts before its commit.
    a_cfg.chunk_rows = 100;
    let a = PgSync::start(a_cfg).await.expect("start a");
    tokio::time::timeout(Duration::from_secs(60), a.wait_caught_up()).await.expect("a caught up").unwrap();
    let b = PgSync::start(notified_only(&cluster)).await.expect("start b");
    tokio::time::timeout(Duration::from_secs(60), b.wait_caught_up()).await.expect("b ready").unwrap();
    assert_eq!((a.role(), b.role()), ("replicating", "following"));

    // A new client of the follower: snapshot, then the handoff waits for the watermark the
    // follower learns from the replicator (which stores it when the follower's logical message
    // arrives, then notifies).
    let mut client = TestClient::connect(&b, "on-b");
    client.hello(&[ITEMS], 1000, 4).await;
    let welcome = client.expect_type("welcome").await;
    assert_eq!(welcome["mode"], "snapshot");
    client.expect_type("up_to_date").await;
    assert_eq!(client.table(ITEMS).len(), 100);

    // Live: each transaction reaches the follower's client; the follower polls once an hour, so
    // each one came through a notification.
    let mut latencies = Vec::new();
    for i in 0..30i64 {
        c.batch_execute(&format!("INSERT INTO items VALUES ({}, {i}, 'live')", 1000 + i)).await.unwrap();
        let t0 = Instant::now();
        client
            .until("a live insert on the follower", |cl| {
                cl.table(ITEMS).contains_key(&json!({"id": 1000 + i}).to_string())
            })
            .await;
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    eprintln!(
        "commit → follower's client: median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );

    // A transaction bigger than a chunk: written in parts, reaches the client whole, once.
    c.batch_execute("INSERT INTO items SELECT g, 0, 'big' FROM generate_series(5000, 5999) g").await.unwrap();
    client.until("the big transaction", |cl| cl.table(ITEMS).len() == 1130).await;
    let expected = table_rows(&c, ITEMS).await;
    assert_eq!(client.table(ITEMS), expected);
    assert_exactly_once_in_order(&client);
    assert_eq!(client.applied.len(), 31, "30 live transactions and the big one");
    assert_eq!(client.applied.last().unwrap().1.len(), 1000);
    assert_eq!((a.role(), b.role()), ("replicating", "following"));
    b.shutdown().await;
    a.shutdown().await;
}

/// A client moves from the replicating instance to a follower with a position the replicator
/// issued from its in-memory (idle) watermark, above what the follower has seen: it is served
/// from there once the follower's watermark catches up, neither refused nor refetched. A position
/// beyond the end of the WAL is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_above_the_followers_watermark_is_served_once_it_catches_up() {
    let (cluster, c) = setup().await;
    let (a, b) = two_engines(&cluster, notified_only(&cluster)).await;
    let mut client = TestClient::connect(&a, "mover");
    client.hello(&[ITEMS], 1000, 4).await;
    client.expect_type("up_to_date").await;
    c.batch_execute("INSERT INTO items VALUES (1000, 0, 'on a')").await.unwrap();
    client.until("the insert on a", |cl| cl.table(ITEMS).len() == 101).await;
    // The follower has read the state that commit notified it of; nothing wakes it after this.
    let commit: Lsn = client.applied.last().unwrap().0.parse().unwrap();
    wait_feed(&b, "the follower to see the insert", |s| s.watermark >= commit).await;
    let b_watermark = b.feed().borrow().watermark;

    // WAL outside the publication: the replicator's watermark moves past it in memory only (a
    // keepalive proves nothing was committed before it), and the follower, woken by nothing,
    // stays behind.
    c.batch_execute("INSERT INTO unsynced (note) VALUES ('x')").await.unwrap();
    let unsynced: PgLsn = c.query_one("SELECT pg_current_wal_insert_lsn()", &[]).await.unwrap().get(0);
    // The end of the commit record: an idle point there proves every commit before it.
    let unsynced = Lsn(u64::from(unsynced) - 1);
    wait_feed(&a, "the replicator's idle watermark to pass the unsynced commit", |s| s.watermark >= unsynced).await;
    assert_eq!(b.feed().borrow().watermark, b_watermark, "nothing woke the follower");
    let issued = a.feed().borrow().watermark;
    assert!(durable_watermark(&c).await < issued, "the idle watermark is in memory only");
    assert!(b.feed().borrow().watermark < issued);

    // The replicator hands out `(issued, MAX)` as the end of a burst would; the client takes it
    // to the follower.
    client.disconnect().await;
    client.position = Some(json!({"lsn": issued.to_string(), "seq": u32::MAX}));
    client.reconnect(&b);
    client.hello(&[ITEMS], 1000, 4).await;
    let welcome = client.expect_type("welcome").await;
    assert_eq!(welcome["mode"], "catchup", "{welcome}");
    let served_from: Lsn = welcome["watermark"].as_str().unwrap().parse().unwrap();
    assert!(served_from >= issued, "welcome only once the follower's watermark reached the position");
    client.expect_type("up_to_date").await;
    for i in 0..5i64 {
        c.batch_execute(&format!("INSERT INTO items VALUES ({}, {i}, 'on b')", 2000 + i)).await.unwrap();
    }
    let expected = table_rows(&c, ITEMS).await;
    client.until("the inserts on b", |cl| cl.table(ITEMS) == expected).await;
    assert_exactly_once_in_order(&client);
    assert_eq!(client.applied.len(), 6);
    assert!(!client.messages.iter().any(|m| m["type"] == "must_refetch" || m["type"] == "error"));

    // A position no history issued: refused after the probe, on the follower as on the replicator.
    for (engine, name) in [(&b, "b"), (&a, "a")] {
        let mut bogus = TestClient::connect(engine, &format!("bogus-{name}"));
        bogus.generation = client.generation;
        bogus.position = Some(json!({"lsn": "FF/0", "seq": 0}));
        bogus.hello(&[ITEMS], 1000, 4).await;
        let e = bogus.expect_type("error").await;
        assert_eq!((e["code"].as_str(), e["fatal"].as_bool()), (Some("position_ahead"), Some(true)), "{e}");
        assert!(e["message"].as_str().unwrap().contains("end of WAL"), "{e}");
    }
    b.shutdown().await;
    a.shutdown().await;
}

/// The replicating instance goes away under a write load: the follower takes the slot over (the
/// same generation, no refetch), its own session streams on without a reconnect, and a client of
/// the instance that went away moves to it. Every transaction reaches both exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_takes_over_and_nothing_is_lost_or_duplicated() {
    let (cluster, c) = setup().await;
    let (a, b) = two_engines(&cluster, config(&cluster)).await;
    let generation = a.feed().borrow().generation;
    let mut on_a = TestClient::connect(&a, "on-a");
    on_a.hello(&[ITEMS], 50, 2).await;
    on_a.expect_type("up_to_date").await;
    let mut on_b = TestClient::connect(&b, "on-b");
    on_b.hello(&[ITEMS], 50, 2).await;
    on_b.expect_type("up_to_date").await;

    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let w = writer(cluster.sql().await, 10_000, 300, half_tx);
    half_rx.await.unwrap();
    on_a.until("some live transactions on a", |cl| cl.applied.len() >= 20).await;
    on_b.until("some live transactions on b", |cl| cl.applied.len() >= 20).await;
    a.shutdown().await; // the slot is released (kill -9 of the binary: crates/moai/tests/cluster_pgsync.rs)
    wait_feed(&b, "the follower to take the slot over", |s| s.phase == Phase::Streaming).await;
    assert_eq!(b.feed().borrow().generation, generation, "the same history: no refetch");

    // The client of the instance that went away moves to the one that replicates now.
    on_a.reconnect(&b);
    on_a.hello(&[ITEMS], 50, 2).await;
    let welcome = on_a.expect_type("welcome").await;
    assert_eq!(welcome["mode"], "catchup");
    w.await.unwrap();
    let expected = table_rows(&c, ITEMS).await;
    assert_eq!(expected.len(), 400);
    for client in [&mut on_a, &mut on_b] {
        client.until("every write", |cl| cl.table(ITEMS) == expected).await;
        assert_exactly_once_in_order(client);
        assert_eq!(inserted_ids(client), (10_000..10_300).collect::<Vec<_>>(), "{}", client.client_id);
    }
    let welcomes = on_b.messages.iter().filter(|m| m["type"] == "welcome").count();
    assert_eq!(welcomes, 1, "the follower's session streamed through the takeover without a reconnect");
    assert!(!on_b.messages.iter().any(|m| m["type"] == "must_refetch" || m["type"] == "error"));
    b.shutdown().await;
}

/// An instance that lost the slot cannot write history any more: once another took over (the
/// fencing epoch moved), its next write is refused, it reconnects, takes the slot again, and the
/// history and the clients hold every transaction once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicator_that_lost_the_slot_is_fenced_and_nothing_is_lost() {
    let (cluster, c) = setup().await;
    let a = PgSync::start(config(&cluster)).await.expect("start");
    tokio::time::timeout(Duration::from_secs(60), a.wait_caught_up()).await.expect("caught up").unwrap();
    let mut client = TestClient::connect(&a, "fenced");
    client.hello(&[ITEMS], 50, 2).await;
    client.expect_type("up_to_date").await;

    // 100 transactions stored and delivered, then what a takeover by another instance does
    // first, then 100 more: the replicator's first write after the bump is refused.
    let (half_tx, _) = tokio::sync::oneshot::channel();
    let writes = writer(cluster.sql().await, 10_000, 100, half_tx).await.unwrap();
    client.until("the first 100", |cl| cl.applied.len() == 100).await;
    let bumped: i64 = c
        .query_one("UPDATE moai_sync.replication_state SET epoch = epoch + 1 RETURNING epoch", &[])
        .await
        .unwrap()
        .get(0);
    let (half_tx, _) = tokio::sync::oneshot::channel();
    writer(writes, 10_100, 100, half_tx).await.unwrap();
    let expected = table_rows(&c, ITEMS).await;
    client.until("every write", |cl| cl.table(ITEMS) == expected).await;
    let epoch: i64 = c.query_one("SELECT epoch FROM moai_sync.replication_state", &[]).await.unwrap().get(0);
    assert!(epoch > bumped, "the fenced replicator took the slot again (epoch {epoch}, bumped to {bumped})");
    assert_exactly_once_in_order(&client);
    assert_eq!(inserted_ids(&client), (10_000..10_200).collect::<Vec<_>>());
    let (rows, distinct): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT pk->>'id') FROM moai_sync.change_history WHERE op = 'I' AND (pk->>'id')::int8 >= 10000",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, distinct), (200, 200), "each insert once in history");
    a.shutdown().await;
}

/// The follower's connection is cut: it reports it, reconnects, LISTENs again and catches up;
/// its sessions get every transaction committed meanwhile, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_loses_its_connection_catches_up() {
    let (cluster, c) = setup().await;
    let (a, b) = two_engines(&cluster, config(&cluster)).await;
    let mut client = TestClient::connect(&b, "on-b");
    client.hello(&[ITEMS], 1000, 4).await;
    client.expect_type("up_to_date").await;

    let follower_pid = "SELECT pid FROM pg_stat_activity WHERE application_name = 'moai-pgsync-follower'";
    let before: i32 = c.query_one(follower_pid, &[]).await.unwrap().get(0);
    let killed: bool = c.query_one("SELECT pg_terminate_backend($1)", &[&before]).await.unwrap().get(0);
    assert!(killed);
    for i in 0..20i64 {
        c.batch_execute(&format!("INSERT INTO items VALUES ({}, {i}, 'meanwhile')", 3000 + i)).await.unwrap();
    }
    let expected = table_rows(&c, ITEMS).await;
    client.until("the transactions committed while reconnecting", |cl| cl.table(ITEMS) == expected).await;
    assert_exactly_once_in_order(&client);
    assert_eq!(inserted_ids(&client), (3000..3020).collect::<Vec<_>>());
    // It reconnected (a follower connection of its own again, a new backend).
    let after: Vec<i32> = c.query(follower_pid, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(after.len() == 1 && after[0] != before, "follower backends {after:?}, the cut one was {before}");
    // A client told of the lost connection is told of its return (the session may also have
    // seen only the state after the reconnect: the feed keeps the latest state).
    let states: Vec<&str> =
        client.messages.iter().filter(|m| m["type"] == "status").filter_map(|m| m["state"].as_str()).collect();
    assert!(states.is_empty() || states == ["replication_reconnecting", "ok"], "{states:?}");
    assert_eq!(b.role(), "following");
    b.shutdown().await;
    a.shutdown().await;
}
