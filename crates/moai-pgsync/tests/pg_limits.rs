//! Resource and isolation limits against a real PostgreSQL: snapshot connections are capped
//! and released when a session dies; only accepted positions reach the registry, whose rows
//! are keyed by token subject and bounded per subject; too many shapes end the session.

mod support;

use std::time::Duration;

use moai_pgsync::{PgSync, PgSyncConfig, SessionEnd};
use serde_json::{json, Value};
use support::pg::PgCluster;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

const ITEMS: &str = "public.items";

async fn setup(rows: u32) -> (PgCluster, Client) {
    let cluster = PgCluster::start();
    let c = cluster.sql().await;
    c.batch_execute("CREATE TABLE public.items (id bigint PRIMARY KEY, val int NOT NULL)").await.unwrap();
    if rows > 0 {
        c.batch_execute(&format!("INSERT INTO public.items SELECT i, i FROM generate_series(1, {rows}) i"))
            .await
            .unwrap();
    }
    (cluster, c)
}

fn config(cluster: &PgCluster) -> PgSyncConfig {
    support::sync_config(cluster, &[ITEMS])
}

async fn start(cfg: PgSyncConfig) -> PgSync {
    let sync = PgSync::start(cfg).await.expect("start");
    tokio::time::timeout(Duration::from_secs(60), sync.wait_caught_up()).await.expect("caught up in time").unwrap();
    sync
}

/// A session driven frame by frame; `out_cap` small makes it block mid-snapshot while unread.
struct Raw {
    tx: Option<mpsc::Sender<String>>,
    rx: mpsc::Receiver<String>,
    task: JoinHandle<SessionEnd>,
    snapshot_rows: usize,
}

impl Raw {
    fn open(sync: &PgSync, subject: Option<&str>, out_cap: usize) -> Raw {
        let (itx, irx) = mpsc::channel(16);
        let (otx, orx) = mpsc::channel(out_cap);
        let s = sync.clone();
        let subject = subject.map(str::to_owned);
        let task = tokio::spawn(async move {
            s.run_session(irx, otx, moai_pgsync::Access::all(), subject, std::future::pending()).await
        });
        Raw { tx: Some(itx), rx: orx, task, snapshot_rows: 0 }
    }

    async fn send(&self, v: Value) {
        self.tx.as_ref().expect("open").send(v.to_string()).await.expect("session alive");
    }

    async fn hello(&self, client_id: &str, generation: Option<u64>, position: Value, shapes: usize, batch: u32) {
        let shapes: Vec<Value> = (0..shapes).map(|i| json!({"id": format!("s{i}"), "table": ITEMS})).collect();
        self.send(json!({"type":"hello","protocol":1,"client_id":client_id,"generation":generation,
            "position":position,"shapes":shapes,"max_batch_rows":batch}))
            .await;
    }

    async fn next(&mut self) -> Option<Value> {
        let text = tokio::time::timeout(Duration::from_secs(60), self.rx.recv())
            .await
            .expect("timed out waiting for a server message")?;
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["type"] == "snapshot_batch" {
            self.snapshot_rows += v["rows"].as_array().unwrap().len();
        }
        Some(v)
    }

    async fn until(&mut self, ty: &str) -> Value {
        loop {
            let v = self.next().await.unwrap_or_else(|| panic!("session closed before {ty}"));
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Close the input and wait for the session to end (its last position is written by then).
    async fn close(mut self) -> SessionEnd {
        self.tx = None;
        let drain = async { while self.rx.recv().await.is_some() {} };
        let (end, _) = tokio::join!(tokio::time::timeout(Duration::from_secs(30), self.task), drain);
        end.expect("session ends").expect("no panic")
    }
}

/// Backends running a snapshot's row query on `public.items` (the text of snapshot queries
/// only; page queries read change_history).
async fn snapshot_queries(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'moai-pgsync%' \
         AND state <> 'idle' AND query LIKE '%FROM \"public\".\"items\"%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn snapshot_backends(c: &Client) -> i64 {
    c.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'moai-pgsync-snapshot'", &[])
        .await
        .unwrap()
        .get(0)
}

/// With one snapshot slot, a second client needing a snapshot waits while the first one's
/// snapshot is open (never a second connection), then gets its complete snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_connections_are_capped_and_waiting_clients_still_get_everything() {
    let (cluster, c) = setup(300).await;
    let mut cfg = config(&cluster);
    cfg.max_snapshot_connections = 1;
    let sync = start(cfg).await;

    // A: one row per batch, a 2-frame queue, and nobody reading: its snapshot stays open.
    let mut a = Raw::open(&sync, None, 2);
    a.hello("a", None, Value::Null, 1, 1).await;
    a.until("snapshot_begin").await;
    let mut b = Raw::open(&sync, None, 2);
    b.hello("b", None, Value::Null, 1, 1).await;
    assert_eq!(b.until("welcome").await["mode"], "snapshot");
    // B asked for its snapshot; for a while, it must not get a connection for it.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < deadline {
        let n = snapshot_queries(&c).await;
        assert!(n <= 1, "{n} snapshot queries at once with a cap of 1");
        if let Ok(Some(text)) = tokio::time::timeout(Duration::from_millis(50), b.rx.recv()).await {
            panic!("B got {text} while A held the only snapshot slot");
        }
    }
    assert_eq!(snapshot_queries(&c).await, 1, "A's snapshot is still open");
    assert_eq!(sync.snapshot_connections().open, 1);

    // Read both: A finishes, B gets the slot; both complete.
    let (ra, rb) = tokio::join!(
        async {
            a.until("up_to_date").await;
            a.snapshot_rows
        },
        async {
            b.until("up_to_date").await;
            b.snapshot_rows
        }
    );
    assert_eq!((ra, rb), (300, 300));
    let stats = sync.snapshot_connections();
    assert_eq!(stats.peak, 1, "{stats:?}");
    a.close().await;
    b.close().await;
    sync.shutdown().await;
}

/// A session that dies mid-snapshot (the edge aborts its task at the write deadline) closes
/// the snapshot connection and frees its slot: the REPEATABLE READ snapshot (its xmin) is not
/// pinned, and the next client gets its snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_session_releases_its_snapshot_connection_and_slot() {
    let (cluster, c) = setup(300).await;
    let mut cfg = config(&cluster);
    cfg.max_snapshot_connections = 1;
    let sync = start(cfg).await;

    let mut a = Raw::open(&sync, None, 2);
    a.hello("a", None, Value::Null, 1, 1).await;
    a.until("snapshot_begin").await;
    let xmin_held: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'moai-pgsync-snapshot' AND backend_xmin IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(xmin_held, 1, "the open snapshot holds an xmin");
    a.task.abort();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while snapshot_backends(&c).await > 0 || sync.snapshot_connections().open > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the aborted session's snapshot connection is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut b = Raw::open(&sync, None, 64);
    b.hello("b", None, Value::Null, 1, 100).await;
    b.until("up_to_date").await;
    assert_eq!(b.snapshot_rows, 300);
    b.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while snapshot_backends(&c).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "a finished snapshot's connection is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sync.shutdown().await;
}

/// Wait until the replicator stored every committed row and its watermark covers them.
async fn wait_stored(sync: &PgSync, c: &Client, rows: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .query_one(
                "SELECT count(*), (SELECT watermark FROM moai_sync.replication_state) >= coalesce(max(commit_lsn), '0/0') \
                 FROM moai_sync.change_history",
                &[],
            )
            .await
            .unwrap();
        if r.get::<_, i64>(0) == rows && r.get::<_, bool>(1) && sync.feed().borrow().caught_up {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "history not stored in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn history_rows(c: &Client) -> i64 {
    c.query_one("SELECT count(*) FROM moai_sync.change_history", &[]).await.unwrap().get(0)
}

/// A hello with an ancient position is answered `position_too_old`, and that position never
/// reaches the registry: retention still deletes what it is configured to delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ancient_position_does_not_hold_retention_back() {
    let (cluster, c) = setup(0).await;
    let mut cfg = config(&cluster);
    cfg.retention = Some(Duration::ZERO);
    let sync = start(cfg).await;
    c.batch_execute("INSERT INTO items VALUES (1, 1)").await.unwrap();
    wait_stored(&sync, &c, 1).await;
    sync.run_maintenance().await.unwrap();
    assert_eq!(history_rows(&c).await, 0);
    assert!(sync.feed().borrow().horizon.0 > 0, "the horizon moved past 0/0");

    c.batch_execute("INSERT INTO items VALUES (2, 2); INSERT INTO items VALUES (3, 3)").await.unwrap();
    wait_stored(&sync, &c, 2).await;
    let generation = sync.feed().borrow().generation;
    let mut old = Raw::open(&sync, None, 64);
    old.hello("ancient", Some(generation), json!({"lsn": "0/0", "seq": 0}), 1, 100).await;
    assert_eq!(old.until("must_refetch").await["reason"], "position_too_old");
    // Gone before it could ack anything.
    old.close().await;
    let registered: Option<String> = c
        .query_opt("SELECT pos_lsn::text FROM moai_sync.clients WHERE client_id = 'ancient'", &[])
        .await
        .unwrap()
        .and_then(|r| r.get(0));
    assert_eq!(registered, None, "a refused position is not registered");

    sync.run_maintenance().await.unwrap();
    assert_eq!(history_rows(&c).await, 0, "retention deleted the history despite the ancient hello");
    sync.shutdown().await;
}

/// Registry rows are keyed by (subject, client_id): the same client_id under two subjects is
/// two rows with their own positions; each subject keeps at most `max_clients_per_subject`
/// rows. An installation with the old registry (keyed by client_id alone) is upgraded in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_rows_are_per_subject_bounded_and_upgraded_in_place() {
    let (cluster, c) = setup(3).await;
    // The registry as older versions created it, with one registered client.
    c.batch_execute(
        "CREATE SCHEMA moai_sync; \
         CREATE TABLE moai_sync.clients (client_id text PRIMARY KEY, generation int8 NOT NULL, pos_lsn pg_lsn, \
           pos_seq int8, shapes jsonb NOT NULL, last_seen timestamptz NOT NULL); \
         INSERT INTO moai_sync.clients VALUES ('legacy', 1, '0/1', 0, '[]', now())",
    )
    .await
    .unwrap();
    let mut cfg = config(&cluster);
    cfg.max_clients_per_subject = 3;
    let sync = start(cfg).await;
    let pk: Vec<String> = c
        .query(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = 'moai_sync.clients'::regclass AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pk, ["subject", "client_id"]);
    let legacy: String =
        c.query_one("SELECT subject FROM moai_sync.clients WHERE client_id = 'legacy'", &[]).await.unwrap().get(0);
    assert_eq!(legacy, "", "old rows are kept under the empty subject");

    // Same client_id, two subjects: alice acks, bob only connects afterwards.
    let mut alice = Raw::open(&sync, Some("alice"), 64);
    alice.hello("shared", None, Value::Null, 1, 100).await;
    let done = alice.until("up_to_date").await;
    alice.send(json!({"type":"ack","position":done["position"]})).await;
    alice.close().await;
    let mut bob = Raw::open(&sync, Some("bob"), 64);
    bob.hello("shared", None, Value::Null, 1, 100).await;
    bob.until("up_to_date").await;
    bob.close().await;
    let rows: Vec<(String, Option<String>)> = c
        .query("SELECT subject, pos_lsn::text FROM moai_sync.clients WHERE client_id = 'shared' ORDER BY subject", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].0, "alice");
    assert_eq!(rows[0].1.as_deref(), done["position"]["lsn"].as_str(), "bob did not overwrite alice's position");
    assert_eq!(rows[1], ("bob".to_string(), None));

    // Alice registers four more clients: she keeps her three most recent; bob is untouched.
    for i in 1..=4 {
        let mut s = Raw::open(&sync, Some("alice"), 64);
        s.hello(&format!("a{i}"), None, Value::Null, 1, 100).await;
        s.until("up_to_date").await;
        s.close().await;
    }
    let alice_ids: Vec<String> = c
        .query("SELECT client_id FROM moai_sync.clients WHERE subject = 'alice' ORDER BY client_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(alice_ids, ["a2", "a3", "a4"]);
    let others: i64 =
        c.query_one("SELECT count(*) FROM moai_sync.clients WHERE subject <> 'alice'", &[]).await.unwrap().get(0);
    assert_eq!(others, 2, "bob's row and the legacy row stay");
    sync.shutdown().await;
}

/// Too many shapes or an over-long client_id: a fatal error before anything is served, and
/// nothing registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_shapes_and_long_client_ids_end_the_session() {
    let (cluster, c) = setup(1).await;
    let sync = start(config(&cluster)).await;
    for (client_id, shapes, code) in [("many", 101, "too_many_shapes"), (&*"x".repeat(257), 1, "bad_request")] {
        let mut s = Raw::open(&sync, None, 64);
        s.hello(client_id, None, Value::Null, shapes, 100).await;
        let e = s.next().await.expect("an error");
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["fatal"].as_bool()),
            (Some("error"), Some(code), Some(true)),
            "{e}"
        );
        assert!(s.next().await.is_none(), "the session ends after the error");
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), s.task).await.unwrap().unwrap(), SessionEnd::Closed);
    }
    // 100 shapes are fine.
    let mut s = Raw::open(&sync, None, 1024);
    s.hello("hundred", None, Value::Null, 100, 100).await;
    s.until("up_to_date").await;
    assert_eq!(s.snapshot_rows, 100);
    s.close().await;
    let ids: Vec<String> =
        c.query("SELECT client_id FROM moai_sync.clients", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, ["hundred"]);
    sync.shutdown().await;
}
