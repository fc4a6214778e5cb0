//! The Postgres change feed served by two moai instances on one database (docs/pgsync-protocol.md
//! §14), through the real binary and a real PostgreSQL cluster: one instance holds the slot and
//! replicates, the other is ready too and serves `/api/sync` from the shared history; clients move
//! between them; the replicating one is killed with SIGKILL under a write load and the other takes
//! over. The engine-level version of these tests is crates/moai-pgsync/tests/pg_cluster.rs.
//!
//! Two kinds of client check every transaction:
//! * the reference client (crates/moai-pgsync-client) ends
//!   with a store equal to the table, a journal of applied transactions in strictly increasing
//!   commit order, and one snapshot (every move resumed from its position);
//! * a raw recorder speaks the protocol itself and keeps every transaction the server sent, with
//!   no deduplication: the ids the writer inserted, one per transaction in commit order, must
//!   arrive exactly once each, in order, across every move and the takeover.
//!
//! Waits are on conditions with deadlines (client status, /health, the recorder's progress), no
//! sleeps.

mod support;

use support::pg;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use moai_pgsync_client::{spawn, BackoffConfig, ClientConfig, ClientHandle, MemoryStore, Row, Shape};
use serde_json::{json, Value};
use support::Server;
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const ITEMS: &str = "public.items";

async fn sql(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect to postgres");
    tokio::spawn(conn);
    client
}

async fn create_items(url: &str) -> Client {
    let c = sql(url).await;
    c.batch_execute(
        "CREATE TABLE public.items (id bigint PRIMARY KEY, val int NOT NULL, note text); \
         INSERT INTO public.items SELECT g, 0, 'seed' FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    c
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

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

/// An instance of the cluster: the change feed on `url`, on `port` (so a restart keeps it).
fn instance(url: &str, port: &str) -> Server {
    Server::start(&["--port", port, "--pg-url", url, "--pg-tables", ITEMS])
}

/// `/health`'s status code and its `pgsync.role`.
fn health(server: &Server) -> (u16, Option<String>) {
    let (code, body) = server.get("/health");
    let v = support::json(&body);
    (code, v["pgsync"]["role"].as_str().map(str::to_owned))
}

/// Polls `/health` (every 20 ms, up to 60 s) until the instance is ready with this role.
fn wait_role(server: &Server, role: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok((code, body)) = support::try_http(server.addr, "GET", "/health", &[], b"") {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            if code == 200 && v["pgsync"]["role"] == role {
                return;
            }
            last = Some((code, body));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never became ready as {role}; last /health {last:?}; logs {:?}", server.addr, server.logs());
}

fn client_config(ws_url: String, client_id: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(ws_url, client_id, vec![Shape::table("items", ITEMS)]);
    cfg.max_batch_rows = Some(50);
    cfg.window = Some(2);
    cfg.backoff = BackoffConfig { initial: Duration::from_millis(20), max: Duration::from_millis(400) };
    cfg.idle_timeout = Duration::from_secs(5);
    cfg
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

/// Wait (on status changes, up to 90 s) until the store holds exactly `expected`.
async fn wait_equal(client: &ClientHandle<MemoryStore>, expected: &BTreeMap<String, Row>) {
    let mut status = client.status();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
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

/// Every transaction the store applied, it applied once, in commit order.
fn assert_applied_once_in_order(store: &MemoryStore, who: &str) {
    let j = store.journal();
    assert!(!j.is_empty(), "{who} applied nothing");
    if let Some(w) = j.windows(2).find(|w| w[0] >= w[1]) {
        panic!("{who}: transaction applied twice or out of order: {} then {}", w[0], w[1]);
    }
}

/// `n` transactions on one connection, one after the other: each inserts row `first + i` and
/// bumps a seed row, so the inserted ids are in commit order. With a gate, the writer stops before
/// transaction `at`, says so, and goes on when the gate opens.
struct Gate {
    at: i64,
    reached: tokio::sync::oneshot::Sender<()>,
    open: tokio::sync::oneshot::Receiver<()>,
}

fn writer(c: Client, first: i64, n: i64, gate: Option<Gate>) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        let mut gate = gate;
        for i in 0..n {
            if gate.as_ref().is_some_and(|g| g.at == i) {
                let g = gate.take().unwrap();
                let _ = g.reached.send(());
                g.open.await.expect("gate opened");
            }
            c.batch_execute(&format!(
                "INSERT INTO items VALUES ({}, {i}, 'w'); UPDATE items SET val = val + 1 WHERE id = {}",
                first + i,
                1 + i % 100
            ))
            .await
            .expect("write");
        }
        c
    })
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a recorder's connection ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// Its condition held: it closed the connection itself.
    Done,
    /// The server went away (closed, reset, killed).
    Disconnected,
}

/// A raw protocol client that keeps every transaction the server sends (no deduplication), acks
/// transaction ends, and resumes from its last complete transaction on the next connection.
struct Recorder {
    client_id: String,
    generation: Option<u64>,
    position: Option<Value>,
    /// Ids inserted by the transactions received, in the order received.
    ids: Vec<i64>,
    /// The open transaction's ops (a `last: false` part).
    pending: Vec<Value>,
    progress: watch::Sender<usize>,
    /// Set at the first `up_to_date`: the snapshot is done, what follows comes as changes.
    ready: watch::Sender<bool>,
    welcomes: Vec<Value>,
}

impl Recorder {
    fn new(client_id: &str) -> Recorder {
        Recorder {
            client_id: client_id.into(),
            generation: None,
            position: None,
            ids: Vec::new(),
            pending: Vec::new(),
            progress: watch::channel(0).0,
            ready: watch::channel(false).0,
            welcomes: Vec::new(),
        }
    }

    /// Serve one connection to `url` until `until` holds (checked after each frame) or the server
    /// goes away; fails the test after 120 s.
    async fn run(&mut self, url: &str, until: impl Fn(&Recorder) -> bool) -> Ended {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect to /api/sync");
        let hello = json!({"type": "hello", "protocol": 1, "client_id": self.client_id, "generation": self.generation,
                           "position": self.position, "shapes": [{"id": "items", "table": ITEMS}],
                           "max_batch_rows": 50, "window": 2});
        ws.send(WsMessage::Text(hello.to_string().into())).await.expect("send hello");
        self.pending.clear();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if until(self) {
                let _ = ws.close(None).await;
                return Ended::Done;
            }
            let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(_))) | Ok(None) => return Ended::Disconnected,
                Err(_) => panic!("{}: nothing for 120 s; {} ids so far", self.client_id, self.ids.len()),
            };
            let text = match msg {
                WsMessage::Text(t) => t,
                WsMessage::Close(_) => return Ended::Disconnected,
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text).expect("server sent JSON");
            if !self.apply(&mut ws, &v).await {
                return Ended::Disconnected;
            }
        }
    }

    /// Returns false if the ack could not be sent (the server went away).
    async fn apply(&mut self, ws: &mut Ws, v: &Value) -> bool {
        match v["type"].as_str().unwrap_or("") {
            "welcome" => {
                if self.position.is_some() {
                    assert_eq!(v["mode"], "catchup", "{}: a resumed position must be served: {v}", self.client_id);
                }
                self.generation = v["generation"].as_u64();
                self.welcomes.push(v.clone());
            }
            "must_refetch" | "error" => panic!("{}: {v}", self.client_id),
            "changes" => {
                let mut ended_at_boundary = false;
                for t in v["txns"].as_array().unwrap() {
                    self.pending.extend(t["ops"].as_array().unwrap().iter().cloned());
                    ended_at_boundary = t["last"].as_bool().unwrap();
                    if ended_at_boundary {
                        for op in self.pending.drain(..) {
                            if op["op"] == "insert" {
                                self.ids.push(op["row"]["id"].as_i64().unwrap());
                            }
                        }
                    }
                }
                if ended_at_boundary {
                    self.position = Some(v["to"].clone());
                    self.progress.send_replace(self.ids.len());
                    return ws
                        .send(WsMessage::Text(json!({"type": "ack", "position": v["to"]}).to_string().into()))
                        .await
                        .is_ok();
                }
            }
            "up_to_date" => {
                self.position = Some(v["position"].clone());
                self.ready.send_replace(true);
                return ws
                    .send(WsMessage::Text(json!({"type": "ack", "position": v["position"]}).to_string().into()))
                    .await
                    .is_ok();
            }
            _ => {}
        }
        true
    }
}

/// Waits until the recorder's snapshot is done (the ids it counts come as changes only, so
/// writes start after it).
async fn wait_ready(ready: &mut watch::Receiver<bool>, who: &str) {
    let ok = matches!(tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r)).await, Ok(Ok(_)));
    assert!(ok, "{who}: no up_to_date after 60 s");
}

/// Waits until the recorder has received at least `n` ids.
async fn wait_progress(progress: &mut watch::Receiver<usize>, n: usize, who: &str) {
    let ok =
        matches!(tokio::time::timeout(Duration::from_secs(60), progress.wait_for(|have| *have >= n)).await, Ok(Ok(_)));
    assert!(ok, "{who}: fewer than {n} transactions after 60 s ({})", *progress.borrow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_ready_and_its_clients_see_changes_live() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    let c = create_items(&url).await;
    let a = instance(&url, &free_port());
    wait_role(&a, "replicating");
    let b = instance(&url, &free_port());
    b.wait_log("replication slot is in use", Duration::from_secs(30)).expect("the standby says why it follows");
    wait_role(&b, "following");
    assert_eq!(health(&a), (200, Some("replicating".to_owned())), "both are ready, one replicates");

    let client = spawn(client_config(b.ws_url("/api/sync"), "on-standby"), MemoryStore::with_journal());
    wait_status(&client, "up_to_date on the standby", |s| s.up_to_date).await;
    assert_eq!(client.store().lock().unwrap().table(ITEMS).len(), 100);

    // Live: one transaction at a time, each awaited on the standby's client.
    let mut latencies = Vec::new();
    for i in 0..20i64 {
        let applied = client.status().borrow().applied_txns;
        c.batch_execute(&format!("INSERT INTO items VALUES ({}, {i}, 'live')", 1000 + i)).await.unwrap();
        let t0 = Instant::now();
        wait_status(&client, "a live transaction on the standby", |s| s.applied_txns > applied).await;
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    eprintln!("commit → applied by a client of the standby: median {median:?}, max {:?}", latencies.last().unwrap());
    // The standby is woken by the replicator's notification; its fallback poll runs once a second.
    assert!(median < Duration::from_secs(1), "live changes on the standby took {median:?} (median)");
    wait_equal(&client, &table_rows(&c).await).await;
    assert_applied_once_in_order(&client.store().lock().unwrap(), "on-standby");
    assert_eq!(health(&b), (200, Some("following".to_owned())));
    client.stop();
    client.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moving_between_instances_gets_every_transaction_once_in_order() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    let c = create_items(&url).await;
    let a = instance(&url, &free_port());
    wait_role(&a, "replicating");
    let b = instance(&url, &free_port());
    wait_role(&b, "following");
    let urls = [a.ws_url("/api/sync"), b.ws_url("/api/sync")];

    // Five bursts of writes, one per leg of the reference client (A, B, A, B, then A to the end):
    // each starts once the client is connected, and the client moves on after 20 of them, while
    // the burst goes on. Bursts follow each other, so the inserted ids are in commit order.
    const BURST: i64 = 100;
    const N: i64 = 5 * BURST;
    // The recorder moves by its own count (A → B → A → B), whenever it gets there.
    let mut recorder = Recorder::new("mover-raw");
    let mut progress = recorder.progress.subscribe();
    let mut ready = recorder.ready.subscribe();
    let rec_urls = urls.clone();
    let rec = tokio::spawn(async move {
        for (i, at_least) in [60usize, 160, 260].into_iter().enumerate() {
            let ended = recorder.run(&rec_urls[i % 2], |r| r.ids.len() >= at_least).await;
            assert_eq!(ended, Ended::Done, "leg {i}");
        }
        let ended = recorder.run(&rec_urls[1], |r| r.ids.len() >= N as usize).await;
        assert_eq!(ended, Ended::Done);
        recorder
    });
    wait_ready(&mut ready, "mover-raw").await;

    let writes = sql(&url).await;
    let mut burst: Option<tokio::task::JoinHandle<Client>> = None;
    let mut writes = Some(writes);
    let mut store = MemoryStore::with_journal();
    let mut snapshots = 0;
    for leg in 0..5i64 {
        let client = spawn(client_config(urls[leg as usize % 2].clone(), "mover"), store);
        wait_status(&client, "up_to_date", |s| s.up_to_date).await;
        let c_writes = match burst.take() {
            Some(previous) => previous.await.unwrap(),
            None => writes.take().unwrap(),
        };
        let this = writer(c_writes, 10_000 + leg * BURST, BURST, None);
        if leg < 4 {
            wait_status(&client, "a few transactions of this burst", |s| s.applied_txns >= 20).await;
            burst = Some(this);
        } else {
            this.await.unwrap();
            wait_equal(&client, &table_rows(&c).await).await;
        }
        client.stop();
        snapshots += client.status().borrow().snapshots;
        let shared = client.store().clone();
        client.join().await.unwrap();
        store = shared.lock().unwrap().clone();
    }
    assert_eq!(snapshots, 1, "every move resumed from the client's position");
    assert_applied_once_in_order(&store, "mover");
    assert_eq!(store.table(ITEMS), table_rows(&c).await);

    wait_progress(&mut progress, N as usize, "mover-raw").await;
    let recorder = tokio::time::timeout(Duration::from_secs(60), rec).await.expect("recorder done").unwrap();
    assert_eq!(recorder.ids, (10_000..10_000 + N).collect::<Vec<_>>(), "every transaction once, in commit order");
    assert_eq!(recorder.welcomes.len(), 4);
    assert!(recorder.welcomes[1..].iter().all(|w| w["mode"] == "catchup"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replicating_instance_under_load_loses_and_duplicates_nothing() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    let c = create_items(&url).await;
    let port_a = free_port();
    let mut a = instance(&url, &port_a);
    wait_role(&a, "replicating");
    let b = instance(&url, &free_port());
    wait_role(&b, "following");
    let (url_a, url_b) = (a.ws_url("/api/sync"), b.ws_url("/api/sync"));

    // A client of each instance, and a recorder on the one that will be killed.
    let on_a = spawn(client_config(url_a.clone(), "on-a"), MemoryStore::with_journal());
    let on_b = spawn(client_config(url_b.clone(), "on-b"), MemoryStore::with_journal());
    wait_status(&on_a, "up_to_date on a", |s| s.up_to_date).await;
    wait_status(&on_b, "up_to_date on b", |s| s.up_to_date).await;
    const N: i64 = 2000;
    let mut recorder = Recorder::new("raw");
    let mut progress = recorder.progress.subscribe();
    let mut ready = recorder.ready.subscribe();
    let (ra, rb) = (url_a.clone(), url_b.clone());
    let rec = tokio::spawn(async move {
        assert_eq!(recorder.run(&ra, |_| false).await, Ended::Disconnected, "a was killed");
        assert_eq!(recorder.run(&rb, |r| r.ids.len() >= N as usize).await, Ended::Done);
        recorder
    });
    wait_ready(&mut ready, "raw").await;

    // The writer holds at transaction 300 until every client has live transactions, then goes on
    // with 1700 more while the replicating instance is killed and the other takes over.
    let (reached, reached_rx) = tokio::sync::oneshot::channel();
    let (open, open_rx) = tokio::sync::oneshot::channel();
    let w = writer(sql(&url).await, 10_000, N, Some(Gate { at: 300, reached, open: open_rx }));
    reached_rx.await.unwrap();
    wait_status(&on_a, "live transactions on a", |s| s.applied_txns >= 20).await;
    wait_status(&on_b, "live transactions on b", |s| s.applied_txns >= 20).await;
    wait_progress(&mut progress, 20, "raw").await;
    open.send(()).unwrap();
    a.child.kill().expect("kill -9 the replicating instance"); // SIGKILL: no shutdown, no close frames
    a.child.wait().unwrap();
    assert!(!w.is_finished(), "killed under the write load");
    wait_role(&b, "replicating");
    assert!(b.wait_log("took the replication slot over", Duration::from_secs(5)).is_some());

    // The killed instance comes back on its port and follows; its client reconnects by itself.
    let a2 = instance(&url, &port_a);
    wait_role(&a2, "following");
    w.await.unwrap();
    let expected = table_rows(&c).await;
    assert_eq!(expected.len(), 100 + N as usize);
    for (client, who) in [(&on_a, "on-a"), (&on_b, "on-b")] {
        wait_equal(client, &expected).await;
        assert_applied_once_in_order(&client.store().lock().unwrap(), who);
        let s = client.status().borrow().clone();
        assert_eq!(s.snapshots, 1, "{who} resumed from its position: {s:?}");
    }
    let (sa, sb) = (on_a.status().borrow().clone(), on_b.status().borrow().clone());
    assert!(sa.connections >= 2, "on-a reconnected after the kill: {sa:?}");
    assert_eq!(sb.connections, 1, "on-b streamed through the takeover on one connection: {sb:?}");

    wait_progress(&mut progress, N as usize, "raw").await;
    let recorder = tokio::time::timeout(Duration::from_secs(60), rec).await.expect("recorder done").unwrap();
    assert_eq!(recorder.ids, (10_000..10_000 + N).collect::<Vec<_>>(), "every transaction once, in commit order");
    for client in [on_a, on_b] {
        client.stop();
        client.join().await.unwrap();
    }
}
