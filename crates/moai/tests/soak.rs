//! Crash soak (issue 10): for each engine, `MOAI_SOAK_CYCLES` cycles (default 3, the CI
//! version; `scripts/soak` runs 100) of concurrent writers, `kill -9` of the server while they
//! are mid-flight, a restart on the same database, and a fresh reader that must find
//! everything the server had shown or acknowledged before it died:
//!
//! * Yjs (`soak_yjs`): everything any client had *received* (a broadcast is a promise that
//!   the update is durable);
//! * CoJSON (`soak_cojson`): everything the server had acknowledged with `known` or forwarded
//!   to the other writer (cojson's confirmed known state of the server peer, read from each
//!   writer after the kill);
//! * change feed (`soak_change_feed`): the client resumes from its last acked position and
//!   gets every transaction after it, the received-but-unacked ones first and identical, with
//!   no gap and no duplicate; its rows then equal the table.
//!
//! Writers never get a chance to re-upload: every client of the killed server is dropped
//! (Yjs, change feed) or disconnected and closed (CoJSON) before the restart, and the new
//! server listens on a new port.
//!
//! The kill moment is random (seeded; the seed is printed, set `MOAI_SOAK_SEED` to replay) but
//! defined by progress, not time: after the observers received `k` broadcasts (Yjs), after the
//! client applied `k` transactions (change feed), after `k` edit replies of the last round
//! (CoJSON). Every wait is on a condition with a deadline; there are no sleeps. Each test
//! prints one `SOAK RESULT` line that `scripts/soak` collects; the numbers of a full run are in
//! docs/soak.md.

mod support;

// The throwaway cluster (crates/moai-pgsync/tests/support/pg.rs), included once by support.
use support::pg;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use moai_yjs::protocol::{sync_step1_frame, sync_update_frame};
use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::{Array, ClientID, Doc, ReadTxn, Transact, Update};
use moai_yjs::{Message, MessageReader, SyncMessage};
use serde_json::{json, Value};
use support::node_driver::NodeDriver;
use support::ws::Ws;
use support::Server;
use tokio::time::Instant as TokioInstant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

// ---------------------------------------------------------------------------------------------
// Shared: cycles, seed, RNG, timing, server restarts.

/// Cycles for `engine`: `MOAI_SOAK_CYCLES_<ENGINE>`, else `MOAI_SOAK_CYCLES`, else 3 (CI).
fn cycles(engine: &str) -> usize {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.trim().parse().ok());
    var(&format!("MOAI_SOAK_CYCLES_{}", engine.to_uppercase())).or_else(|| var("MOAI_SOAK_CYCLES")).unwrap_or(3)
}

/// The run's seed: `MOAI_SOAK_SEED`, else from the clock. Printed so a failure can be replayed.
fn seed(engine: &str) -> u64 {
    let seed = std::env::var("MOAI_SOAK_SEED").ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("soak {engine}: {} cycles, seed {seed} (MOAI_SOAK_SEED={seed} replays it)", cycles(engine));
    seed
}

/// splitmix64: small, seeded, good enough to pick kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Cycle durations and the one-line summary `scripts/soak` greps for.
struct Tally {
    engine: &'static str,
    seed: u64,
    started: Instant,
    durations: Vec<Duration>,
    counters: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn new(engine: &'static str, seed: u64) -> Self {
        Tally { engine, seed, started: Instant::now(), durations: Vec::new(), counters: BTreeMap::new() }
    }

    fn add(&mut self, what: &'static str, n: u64) {
        *self.counters.entry(what).or_default() += n;
    }

    fn finish(self) {
        let n = self.durations.len().max(1) as u32;
        let mean = self.durations.iter().sum::<Duration>() / n;
        let max = self.durations.iter().max().copied().unwrap_or_default();
        let counters: Vec<String> = self.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "SOAK RESULT engine={} cycles={} seed={} total={:.1}s mean_cycle={}ms max_cycle={}ms {}",
            self.engine,
            self.durations.len(),
            self.seed,
            self.started.elapsed().as_secs_f64(),
            mean.as_millis(),
            max.as_millis(),
            counters.join(" ")
        );
    }
}

/// The database outlives every server process; each process gets its own port (`--port 0`),
/// so nothing a client of the killed process does can reach the new one.
struct Db {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Db {
    fn new() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moai.db");
        Db { _dir: dir, path }
    }

    fn start(&self, extra: &[&str]) -> Server {
        start_server(&self.path, extra)
    }
}

fn start_server(db: &Path, extra: &[&str]) -> Server {
    let server = Server::start_in(tempfile::tempdir().unwrap(), db, extra);
    server.wait_ready();
    server
}

/// `kill -9`, and wait until the process is gone.
fn kill_9(mut server: Server) {
    server.signal("KILL");
    let status = server.wait_exit(Duration::from_secs(10)).expect("moai exits after SIGKILL");
    assert!(!status.success(), "killed, not exited: {status:?}");
    // Dropping checks that the server never logged a panic.
    drop(server);
}

/// Blocking work (starting the server, waiting for it) from inside the async tests.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------------------------
// Yjs

const YJS_DOCS: usize = 3;
const YJS_WRITERS_PER_DOC: usize = 2;
/// A writer has at most this many updates the observer has not received yet.
const YJS_WINDOW: u32 = 8;
const YJS_MAX_KILL_AFTER: u64 = 300;

/// What clients of one document received: the highest clock per Yjs client id over every
/// receiving socket, bumped on a watch channel so writers can wait for it.
struct Seen {
    clocks: Mutex<HashMap<ClientID, u32>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Seen {
    fn new() -> Arc<Seen> {
        Arc::new(Seen { clocks: Mutex::default(), changed: tokio::sync::watch::channel(0).0 })
    }

    fn merge(&self, doc: &Doc) {
        let sv = doc.transact().state_vector();
        let mut clocks = self.clocks.lock().unwrap();
        for (client, clock) in sv.iter() {
            let e = clocks.entry(*client).or_default();
            *e = (*e).max(*clock);
        }
        drop(clocks);
        self.changed.send_modify(|v| *v += 1);
    }

    fn get(&self, client: ClientID) -> u32 {
        self.clocks.lock().unwrap().get(&client).copied().unwrap_or(0)
    }
}

fn yjs_doc_path(d: usize) -> String {
    format!("/sync/v1/soak-{d}")
}

/// Applies the Step2/Update messages of a frame to `doc`; returns how many updates it held.
fn apply_frame(doc: &Doc, frame: &[u8]) -> usize {
    let mut n = 0;
    for msg in MessageReader::new(frame) {
        let update = match msg {
            Ok(Message::Sync(SyncMessage::Step2(u))) => u,
            Ok(Message::Sync(SyncMessage::Update(u))) => {
                n += 1;
                u
            }
            _ => continue,
        };
        let update = Update::decode_v1(update).expect("the server sends valid updates");
        doc.transact_mut().apply_update(update).expect("apply a received update");
    }
    n
}

/// Reads the server's first frame (its SyncStep1: the socket has joined the room).
async fn yjs_joined(ws: &mut Ws, deadline: TokioInstant) {
    let left = deadline.saturating_duration_since(TokioInstant::now());
    match support::ws::next_within(ws, left).await {
        WsMessage::Binary(f) => {
            assert!(matches!(Message::decode(&f), Ok(Message::Sync(SyncMessage::Step1(_)))), "expected SyncStep1")
        }
        other => panic!("expected the server's SyncStep1, got {other:?}"),
    }
}

/// Syncs from scratch: SyncStep1 with an empty state vector, then the server's SyncStep2.
async fn yjs_full_state(ws: &mut Ws, doc: &Doc, deadline: TokioInstant) {
    ws.send(WsMessage::Binary(sync_step1_frame(&[0]).into())).await.unwrap();
    loop {
        let left = deadline.saturating_duration_since(TokioInstant::now());
        if let WsMessage::Binary(f) = support::ws::next_within(ws, left).await {
            let is_step2 = MessageReader::new(&f).any(|m| matches!(m, Ok(Message::Sync(SyncMessage::Step2(_)))));
            apply_frame(doc, &f);
            if is_step2 {
                return;
            }
        }
    }
}

/// Receives until the socket ends (the server was killed), recording what arrived.
fn spawn_receiver(
    mut stream: futures_util::stream::SplitStream<Ws>,
    doc: Doc,
    seen: Arc<Seen>,
    observed: Option<Arc<(AtomicUsize, tokio::sync::watch::Sender<u64>)>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if let WsMessage::Binary(f) = msg {
                let n = apply_frame(&doc, &f);
                seen.merge(&doc);
                if let (Some(o), true) = (&observed, n > 0) {
                    o.0.fetch_add(n, Ordering::SeqCst);
                    o.1.send_modify(|v| *v += 1);
                }
            }
        }
        assert!(!doc.transact().has_missing_updates(), "the server broadcast an update before its dependencies");
    })
}

fn marker(cycle: usize, d: usize, w: usize, n: u32) -> String {
    format!("c{cycle}-d{d}-w{w}-{n}")
}

/// One writer: a fresh Yjs client (new client id, no state: it cannot build on anything the
/// killed server lost) appending markers to the document's array as fast as the window allows,
/// until its socket fails or the task is aborted.
async fn yjs_writer(
    mut sink: futures_util::stream::SplitSink<Ws, WsMessage>,
    doc: Doc,
    name: (usize, usize, usize),
    seen: Arc<Seen>,
    sent: Arc<AtomicU32>,
) {
    let (cycle, d, w) = name;
    let client = doc.client_id();
    let array = doc.get_or_insert_array("markers");
    let mut changed = seen.changed.subscribe();
    for n in 0u32.. {
        while seen.get(client) + YJS_WINDOW <= n {
            // Aborted by the test at the kill; the test's own deadline bounds this wait.
            if changed.changed().await.is_err() {
                return;
            }
        }
        let update = {
            let mut txn = doc.transact_mut();
            array.push_back(&mut txn, marker(cycle, d, w, n));
            txn.encode_update_v1()
        };
        // Counted before sending: an update aborted mid-send may still have reached the server.
        sent.store(n + 1, Ordering::SeqCst);
        if sink.send(WsMessage::Binary(sync_update_frame(&update).into())).await.is_err() {
            return;
        }
    }
}

/// Checks a reader's document: complete, every marker sequence of a writer gap-free, and
/// every clock anyone received present.
fn check_yjs_reader(cycle: usize, d: usize, doc: &Doc, seen_ever: &HashMap<ClientID, u32>) -> HashMap<ClientID, u32> {
    let array = doc.get_or_insert_array("markers");
    let txn = doc.transact();
    assert!(
        !txn.has_missing_updates(),
        "cycle {cycle} doc {d}: the stored document has updates with missing dependencies"
    );
    let sv: HashMap<ClientID, u32> = txn.state_vector().iter().map(|(c, k)| (*c, *k)).collect();
    for (client, clock) in seen_ever {
        let have = sv.get(client).copied().unwrap_or(0);
        assert!(
            have >= *clock,
            "cycle {cycle} doc {d}: client {client} had received {clock} items of Yjs client {client}, the restarted server has {have}: acknowledged data lost"
        );
    }
    // Markers: per (cycle, writer), 0, 1, 2, ... in array order, without holes.
    let mut next: HashMap<String, u32> = HashMap::new();
    for v in array.iter(&txn) {
        let s = v.to_string(&txn);
        let (who, n) = s.rsplit_once('-').unwrap_or_else(|| panic!("bad marker {s:?}"));
        let n: u32 = n.parse().unwrap();
        let e = next.entry(who.to_owned()).or_default();
        assert_eq!(n, *e, "cycle {cycle} doc {d}: marker {s} follows {} of the same writer", *e as i64 - 1);
        *e += 1;
    }
    sv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_yjs() {
    let seed = seed("yjs");
    let mut rng = Rng(seed);
    let mut tally = Tally::new("yjs", seed);
    let db = Db::new();
    let mut server = blocking(|| db.start(&[]));
    // Every clock any client ever received, per document: later cycles must keep it too.
    let mut seen_ever: Vec<HashMap<ClientID, u32>> = vec![HashMap::new(); YJS_DOCS];

    for cycle in 0..cycles("yjs") {
        let t0 = Instant::now();
        let deadline = TokioInstant::now() + Duration::from_secs(60);
        let seen: Vec<Arc<Seen>> = (0..YJS_DOCS).map(|_| Seen::new()).collect();
        let observed = Arc::new((AtomicUsize::new(0), tokio::sync::watch::channel(0u64).0));
        let mut receivers = Vec::new();
        let mut observer_sinks = Vec::new();

        // Where a cycle's time goes (printed per cycle: the documents grow across cycles).
        let mut phases: Vec<(&str, Duration)> = Vec::new();
        let mut lap = Instant::now();
        let mut phase = |name: &'static str, phases: &mut Vec<(&str, Duration)>| {
            phases.push((name, lap.elapsed()));
            lap = Instant::now();
        };
        // One observer per document, holding the full state before anyone writes.
        for (d, seen) in seen.iter().enumerate() {
            let mut ws = support::ws::connect(&server.ws_url(&yjs_doc_path(d))).await;
            yjs_joined(&mut ws, deadline).await;
            let doc = Doc::new();
            yjs_full_state(&mut ws, &doc, deadline).await;
            seen.merge(&doc);
            let (sink, stream) = ws.split();
            observer_sinks.push(sink);
            receivers.push(spawn_receiver(stream, doc, seen.clone(), Some(observed.clone())));
        }
        phase("observers", &mut phases);
        // Writers: all joined before the first one writes, so they receive each other.
        let mut writers = Vec::new();
        for d in 0..YJS_DOCS {
            for w in 0..YJS_WRITERS_PER_DOC {
                let mut ws = support::ws::connect(&server.ws_url(&yjs_doc_path(d))).await;
                yjs_joined(&mut ws, deadline).await;
                writers.push((d, w, ws));
            }
        }
        let mut tasks = Vec::new();
        for (d, w, ws) in writers {
            let (sink, stream) = ws.split();
            let doc = Doc::new();
            let client = doc.client_id();
            let sent = Arc::new(AtomicU32::new(0));
            receivers.push(spawn_receiver(stream, Doc::new(), seen[d].clone(), None));
            let task = tokio::spawn(yjs_writer(sink, doc, (cycle, d, w), seen[d].clone(), sent.clone()));
            tasks.push((d, client, sent, task));
        }

        phase("writers join", &mut phases);
        // Kill once the observers have received k broadcasts, writers mid-flight.
        let k = rng.range(1, YJS_MAX_KILL_AFTER) as usize;
        let mut watch = observed.1.subscribe();
        while observed.0.load(Ordering::SeqCst) < k {
            match tokio::time::timeout_at(deadline, watch.changed()).await {
                Ok(Ok(())) => {}
                _ => panic!(
                    "cycle {cycle}: observers received only {} of {k} updates in time",
                    observed.0.load(Ordering::SeqCst)
                ),
            }
        }
        phase("writing", &mut phases);
        blocking(|| kill_9(server));
        // Nobody writes again: a writer may not re-upload what the dead server lost.
        for (_, _, _, task) in &tasks {
            task.abort();
        }
        // Receivers read whatever the server had sent, then see their sockets end.
        for r in receivers {
            tokio::time::timeout_at(deadline, r).await.expect("sockets end after the kill").expect("receiver");
        }
        drop(observer_sinks);
        let sent: u64 = tasks.iter().map(|t| u64::from(t.2.load(Ordering::SeqCst))).sum();
        let received_by_observers = observed.0.load(Ordering::SeqCst) as u64;

        phase("kill, drain", &mut phases);
        server = blocking(|| db.start(&[]));
        phase("restart", &mut phases);
        let mut reading = Duration::ZERO;
        let mut durable_total = 0u64;
        let mut seen_total = 0u64;
        for d in 0..YJS_DOCS {
            for (client, clock) in seen[d].clocks.lock().unwrap().iter() {
                let e = seen_ever[d].entry(*client).or_default();
                *e = (*e).max(*clock);
            }
            let mut ws = support::ws::connect(&server.ws_url(&yjs_doc_path(d))).await;
            yjs_joined(&mut ws, deadline).await;
            let doc = Doc::new();
            let t = Instant::now();
            yjs_full_state(&mut ws, &doc, deadline).await;
            reading += t.elapsed();
            let sv = check_yjs_reader(cycle, d, &doc, &seen_ever[d]);
            for (dd, client, _, _) in &tasks {
                if *dd == d {
                    durable_total += u64::from(sv.get(client).copied().unwrap_or(0));
                    seen_total += u64::from(seen[d].get(*client));
                }
            }
        }
        phase("fresh readers, checks", &mut phases);
        phases.push(("of which the readers' full state", reading));
        let took = t0.elapsed();
        let phases: Vec<String> = phases.iter().map(|(n, d)| format!("{n} {}", d.as_millis())).collect();
        println!(
            "yjs cycle {}/{}: kill after {k} observed broadcasts; writers sent {sent} updates, clients received {seen_total}, the restarted server has {durable_total} ({} unreceived in-flight updates lost, allowed); {} ms ({})",
            cycle + 1,
            cycles("yjs"),
            sent - durable_total,
            took.as_millis(),
            phases.join(", ")
        );
        assert!(durable_total <= sent && seen_total <= durable_total);
        tally.add("updates_sent", sent);
        tally.add("updates_received", seen_total);
        tally.add("updates_durable", durable_total);
        tally.add("observer_broadcasts", received_by_observers);
        tally.durations.push(took);
    }
    drop(server);
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// Change feed

const FEED_TABLE: &str = "public.soak";
const FEED_WRITERS: i64 = 3;
/// Transactions per writer and cycle, at most.
const FEED_TXNS_PER_WRITER: i64 = 150;
const FEED_MAX_KILL_AFTER: u64 = 120;
const FEED_WINDOW: usize = 4;

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or_else(|| panic!("bad lsn {s:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `(commit_lsn, seq)`, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos(u64, u32);

impl Pos {
    fn parse(v: &Value) -> Pos {
        Pos(parse_lsn(v["lsn"].as_str().expect("lsn")), u32::try_from(v["seq"].as_u64().expect("seq")).unwrap())
    }

    fn json(self) -> Value {
        json!({"lsn": format!("{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF), "seq": self.1})
    }
}

/// A complete transaction as received.
#[derive(Debug, Clone, PartialEq)]
struct FeedTxn {
    lsn: u64,
    ops: Vec<Value>,
}

/// A row as the test compares it: (w, n, v) by id.
type FeedRows = BTreeMap<i64, (i64, i64, i64)>;

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

fn apply_ops(rows: &mut FeedRows, ops: &[Value]) {
    for op in ops {
        let id = int(&op["key"]["id"]);
        match op["op"].as_str().unwrap() {
            "insert" => {
                let r = &op["row"];
                rows.insert(id, (int(&r["w"]), int(&r["n"]), int(&r["v"])));
            }
            "update" => {
                assert!(op["old_key"].is_null(), "keys never change here: {op}");
                let row = rows.get_mut(&id).unwrap_or_else(|| panic!("update of a row the client never got: {op}"));
                let r = &op["row"];
                for (col, slot) in [("w", &mut row.0), ("n", &mut row.1), ("v", &mut row.2)] {
                    if let Some(x) = r.get(col) {
                        *slot = int(x);
                    }
                }
            }
            "delete" => {
                rows.remove(&id);
            }
            other => panic!("unexpected op {other}: {op}"),
        }
    }
}

/// A change feed client written against docs/pgsync-protocol.md, with the bookkeeping the soak
/// checks: its durable state is what it acked (rows + position), acks lag `ack_lag` frames
/// behind what it received, and after a crash it expects the server to resend exactly the
/// received-but-unacked transactions first.
struct FeedClient {
    ws: Option<Ws>,
    generation: Option<u64>,
    /// The resume point: the last position acked (and "stored").
    acked: Option<Pos>,
    /// Rows as of `acked`.
    durable: FeedRows,
    /// Complete transactions received after `acked`, in order.
    pending: VecDeque<FeedTxn>,
    /// Positions received and not acked yet (ack lag).
    unacked: VecDeque<Pos>,
    open: Option<FeedTxn>,
    /// Highest transaction received on this connection or before (for strict order).
    last_lsn: u64,
    /// After a reconnect: what must come first, identical.
    expect_resend: VecDeque<FeedTxn>,
    /// Every writer id whose insert arrived (once: a second delivery fails the test).
    delivered: HashSet<i64>,
    /// Complete transactions received this cycle (resends not counted).
    new_txns: usize,
    resent: usize,
    ack_lag: usize,
    snapshot_rows: FeedRows,
    welcomed: bool,
    up_to_date: bool,
}

impl FeedClient {
    fn new() -> Self {
        FeedClient {
            ws: None,
            generation: None,
            acked: None,
            durable: FeedRows::new(),
            pending: VecDeque::new(),
            unacked: VecDeque::new(),
            open: None,
            last_lsn: 0,
            expect_resend: VecDeque::new(),
            delivered: HashSet::new(),
            new_txns: 0,
            resent: 0,
            ack_lag: 0,
            snapshot_rows: FeedRows::new(),
            welcomed: false,
            up_to_date: false,
        }
    }

    async fn connect(&mut self, url: &str) {
        let mut ws = support::ws::connect(url).await;
        let hello = json!({"type": "hello", "protocol": 1, "client_id": "soak",
            "generation": self.generation, "position": self.acked.map(Pos::json),
            "shapes": [{"id": "soak", "table": FEED_TABLE}], "max_batch_rows": 50, "window": FEED_WINDOW});
        ws.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
        self.ws = Some(ws);
        self.welcomed = false;
        self.up_to_date = false;
    }

    /// Rows as the client sees them now (acked plus received).
    fn rows(&self) -> FeedRows {
        let mut rows = self.durable.clone();
        for t in &self.pending {
            apply_ops(&mut rows, &t.ops);
        }
        rows
    }

    /// The server died: keep only what was acked; what came after must be resent.
    fn crashed(&mut self) {
        self.ws = None;
        self.expect_resend = std::mem::take(&mut self.pending);
        self.unacked.clear();
        self.open = None;
        self.last_lsn = self.acked.map_or(0, |p| p.0);
    }

    async fn received_position(&mut self, p: Pos) {
        self.unacked.push_back(p);
        while self.unacked.len() > self.ack_lag {
            let p = self.unacked.pop_front().unwrap();
            while self.pending.front().is_some_and(|t| t.lsn <= p.0) {
                let t = self.pending.pop_front().unwrap();
                apply_ops(&mut self.durable, &t.ops);
            }
            assert!(self.acked.is_none_or(|a| a <= p), "acks never go back");
            self.acked = Some(p);
            let ack = json!({"type": "ack", "position": p.json()}).to_string();
            // The server may already be dead: the ack is then simply lost.
            let _ = self.ws.as_mut().unwrap().send(WsMessage::Text(ack.into())).await;
        }
    }

    fn complete(&mut self, txn: FeedTxn) {
        assert!(
            txn.lsn > self.last_lsn,
            "transaction {:X} after {:X}: out of order or delivered twice",
            txn.lsn,
            self.last_lsn
        );
        self.last_lsn = txn.lsn;
        if let Some(expected) = self.expect_resend.pop_front() {
            assert_eq!(txn, expected, "after the restart the unacked transactions must come first, unchanged");
            self.resent += 1;
        } else {
            for op in &txn.ops {
                if op["op"] == "insert" {
                    let id = int(&op["key"]["id"]);
                    assert!(self.delivered.insert(id), "the insert of row {id} was delivered twice");
                }
            }
            self.new_txns += 1;
        }
        self.pending.push_back(txn);
    }

    /// Processes one server message.
    async fn handle(&mut self, m: Value) {
        match m["type"].as_str().unwrap_or("") {
            "welcome" => {
                let generation = m["generation"].as_u64().expect("generation");
                if self.acked.is_some() {
                    assert_eq!(m["mode"], "catchup", "the acked position must be honoured: {m}");
                    assert_eq!(Some(generation), self.generation, "same history after a kill -9: {m}");
                } else {
                    assert_eq!(m["mode"], "snapshot", "{m}");
                }
                self.generation = Some(generation);
                self.welcomed = true;
            }
            "snapshot_batch" => {
                let mut rows = self.snapshot_rows.clone();
                for r in m["rows"].as_array().unwrap() {
                    rows.insert(int(&r["id"]), (int(&r["w"]), int(&r["n"]), int(&r["v"])));
                }
                self.snapshot_rows = rows;
            }
            "changes" => {
                let txns = m["txns"].as_array().unwrap();
                let mut completed = None;
                for (i, part) in txns.iter().enumerate() {
                    let lsn = parse_lsn(part["lsn"].as_str().unwrap());
                    let ops = part["ops"].as_array().unwrap().clone();
                    let txn = match self.open.take() {
                        Some(mut open) => {
                            assert_eq!(open.lsn, lsn, "a transaction left open: {m}");
                            open.ops.extend(ops);
                            open
                        }
                        None => FeedTxn { lsn, ops },
                    };
                    if part["last"] != true {
                        self.open = Some(txn);
                        continue;
                    }
                    self.complete(txn);
                    completed = Some(if i + 1 == txns.len() { Pos::parse(&m["to"]) } else { Pos(lsn, u32::MAX) });
                }
                if let Some(p) = completed {
                    assert_eq!(p.0, self.last_lsn, "frame end inside the last transaction: {m}");
                    self.received_position(p).await;
                }
            }
            "up_to_date" => {
                assert!(self.open.is_none(), "up_to_date inside a transaction: {m}");
                assert!(
                    self.expect_resend.is_empty(),
                    "up_to_date before the {} unacked transactions were resent: a gap",
                    self.expect_resend.len()
                );
                self.durable.extend(std::mem::take(&mut self.snapshot_rows));
                let p = Pos::parse(&m["position"]);
                self.last_lsn = self.last_lsn.max(p.0);
                self.up_to_date = true;
                self.received_position(p).await;
            }
            "status" | "pong" | "snapshot_begin" | "snapshot_end" => {}
            other => panic!("unexpected message {other}: {m}"),
        }
    }

    /// Reads messages until `cond` holds, failing at `deadline`.
    async fn until(&mut self, what: &str, deadline: TokioInstant, cond: impl Fn(&FeedClient) -> bool) {
        while !cond(self) {
            let left = deadline.saturating_duration_since(TokioInstant::now());
            let msg = tokio::time::timeout(left, self.ws.as_mut().unwrap().next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("the change feed ended")
                .expect("websocket error");
            match msg {
                WsMessage::Text(t) => self.handle(serde_json::from_str(&t).expect("JSON")).await,
                WsMessage::Close(f) => panic!("closed while waiting for {what}: {f:?}"),
                _ => {}
            }
        }
    }
}

async fn feed_sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to postgres");
    tokio::spawn(conn);
    client
}

/// One writer: single-statement-batch transactions, each inserting a new row (a unique id) and
/// patching an earlier row of its own, until `stop` or its quota. Returns the committed ids.
fn feed_writer(
    url: String,
    cycle: usize,
    w: i64,
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<i64>> {
    tokio::spawn(async move {
        let c = feed_sql(&url).await;
        let base = (cycle as i64) * 1_000_000 + w * 10_000;
        let mut ids = Vec::new();
        for n in 0..FEED_TXNS_PER_WRITER {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let id = base + n;
            let sql = format!(
                "BEGIN; INSERT INTO {FEED_TABLE} VALUES ({id}, {w}, {n}, 0); \
                 UPDATE {FEED_TABLE} SET v = v + 1 WHERE id = {}; COMMIT;",
                base + n / 2
            );
            c.batch_execute(&sql).await.expect("writer transaction");
            ids.push(id);
            commits.fetch_add(1, Ordering::SeqCst);
        }
        ids
    })
}

async fn feed_table(c: &tokio_postgres::Client) -> FeedRows {
    c.query(&format!("SELECT id, w, n, v FROM {FEED_TABLE}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                (i64::from(r.get::<_, i32>(1)), i64::from(r.get::<_, i32>(2)), i64::from(r.get::<_, i32>(3))),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_change_feed() {
    let seed = seed("change_feed");
    let mut rng = Rng(seed);
    let mut tally = Tally::new("change_feed", seed);
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    let sql = feed_sql(&url).await;
    sql.batch_execute(&format!(
        "CREATE TABLE {FEED_TABLE} (id bigint PRIMARY KEY, w int NOT NULL, n int NOT NULL, v int NOT NULL)"
    ))
    .await
    .unwrap();
    let db = Db::new();
    let args = ["--pg-url", url.as_str(), "--pg-tables", FEED_TABLE];
    let mut server = blocking(|| db.start(&args));

    // A new client: empty snapshot, then its first resume point.
    let mut client = FeedClient::new();
    client.connect(&server.ws_url("/api/sync")).await;
    let deadline = TokioInstant::now() + Duration::from_secs(60);
    client.until("the first up_to_date", deadline, |c| c.up_to_date).await;
    assert!(client.acked.is_some());

    let mut all_ids: HashSet<i64> = HashSet::new();
    for cycle in 0..cycles("change_feed") {
        let t0 = Instant::now();
        let deadline = TokioInstant::now() + Duration::from_secs(90);
        client.new_txns = 0;
        client.resent = 0;
        client.ack_lag = rng.range(0, FEED_WINDOW as u64 - 1) as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicUsize::new(0));
        let writers: Vec<_> =
            (0..FEED_WRITERS).map(|w| feed_writer(url.clone(), cycle, w, stop.clone(), commits.clone())).collect();

        let k = rng.range(1, FEED_MAX_KILL_AFTER) as usize;
        client.until(&format!("{k} transactions"), deadline, |c| c.new_txns >= k).await;
        blocking(|| kill_9(server));
        let at_kill = commits.load(Ordering::SeqCst);
        client.crashed();
        let unacked = client.expect_resend.len();

        // Writers go on while moai is down and while it restarts.
        server = blocking(|| db.start(&args));
        let while_down = commits.load(Ordering::SeqCst) - at_kill;
        client.connect(&server.ws_url("/api/sync")).await;
        client
            .until("the welcome and the resent transactions", deadline, |c| c.welcomed && c.expect_resend.is_empty())
            .await;
        stop.store(true, Ordering::SeqCst);
        let mut committed: HashSet<i64> = HashSet::new();
        for w in writers {
            committed.extend(w.await.unwrap());
        }
        all_ids.extend(committed.iter().copied());
        let want = all_ids.clone();
        client.until("every committed transaction", deadline, |c| want.iter().all(|id| c.delivered.contains(id))).await;
        assert_eq!(client.delivered, all_ids, "cycle {cycle}: delivered inserts equal the committed ones");
        let table = feed_table(&sql).await;
        let rows = client.rows();
        assert_eq!(rows.len(), table.len(), "cycle {cycle}: row count");
        assert!(rows == table, "cycle {cycle}: the client's rows differ from the table");

        let took = t0.elapsed();
        println!(
            "change feed cycle {}/{}: ack lag {} frames, kill after {k} transactions; {unacked} received-but-unacked resent identical; {} committed this cycle ({while_down} while moai was down or starting), all delivered once; {} rows equal the table; {} ms",
            cycle + 1,
            cycles("change_feed"),
            client.ack_lag,
            committed.len(),
            table.len(),
            took.as_millis()
        );
        tally.add("txns_committed", committed.len() as u64);
        tally.add("txns_resent", unacked as u64);
        tally.add("txns_committed_while_down", while_down as u64);
        tally.durations.push(took);
    }
    drop(server);
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// CoJSON

const COJSON_MAX_ROUNDS: u64 = 3;
const COJSON_EDITS_PER_ROUND: usize = 3;
/// The driver's own limit for each command of a cycle.
const COJSON_TIMEOUT_MS: u64 = 20_000;

/// `known` states as cojson reports them: `{header, sessions: {session: count}}`.
fn sessions_of(known: &Value) -> BTreeMap<String, u64> {
    known["sessions"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

/// Raises `into` to cover `known` (per session, the higher count).
fn merge_known(into: &mut BTreeMap<String, u64>, known: &Value) {
    for (s, n) in sessions_of(known) {
        let e = into.entry(s).or_default();
        *e = (*e).max(n);
    }
}

fn covers(have: &BTreeMap<String, u64>, need: &BTreeMap<String, u64>) -> Result<(), String> {
    for (s, n) in need {
        let h = have.get(s).copied().unwrap_or(0);
        if h < *n {
            return Err(format!("session {s}: {h} transactions, {n} were acknowledged"));
        }
    }
    Ok(())
}

#[test]
fn soak_cojson() {
    let seed = seed("cojson");
    let mut rng = Rng(seed);
    let mut tally = Tally::new("cojson", seed);
    let mut d = NodeDriver::cojson();
    let db = Db::new();
    let mut server = db.start(&[]);
    let t = COJSON_TIMEOUT_MS;

    for cycle in 0..cycles("cojson") {
        let t0 = Instant::now();
        let url = server.ws_url("/sync");
        let (a, b, r) = (format!("c{cycle}-a"), format!("c{cycle}-b"), format!("c{cycle}-reader"));
        let account_a = d.call("createAccount", json!({"name": a, "url": url, "timeoutMs": t}))["accountId"].clone();
        let account_b = d.call("createAccount", json!({"name": b, "url": url, "timeoutMs": t}))["accountId"].clone();
        let group = d.call("createGroup", json!({"name": a, "everyone": "writer"}))["groupId"].clone();
        let map = d.call("createMap", json!({"name": a, "groupId": group, "init": {"cycle": cycle}, "timeoutMs": t}))
            ["mapId"]
            .clone();
        let list = d.call("createList", json!({"name": a, "groupId": group, "timeoutMs": t}))["listId"].clone();
        d.call("waitSynced", json!({"name": a, "timeoutMs": t}));
        d.call("getMap", json!({"name": b, "coId": map, "timeoutMs": t}));
        d.call("getList", json!({"name": b, "coId": list, "timeoutMs": t}));
        let ids = [account_a.clone(), account_b.clone(), group.clone(), map.clone(), list.clone()];

        // Rounds of concurrent edits by both writers, each acknowledged (waitSynced) before the
        // next, except the last one: the kill comes after a random number of its edits replied.
        let rounds = rng.range(1, COJSON_MAX_ROUNDS);
        let mut acked_keys: Vec<(String, Value)> = Vec::new();
        let mut acked_items: Vec<String> = Vec::new();
        let mut edits = 0u64;
        for round in 0..rounds {
            let mut sent = Vec::new();
            let mut keys = Vec::new();
            let mut items = Vec::new();
            for j in 0..COJSON_EDITS_PER_ROUND {
                for w in [&a, &b] {
                    let marker = format!("{w}-{round}-{j}");
                    let value = json!(round * 100 + j as u64);
                    sent.push(d.send(
                        "setKey",
                        json!({"name": w, "coId": map, "key": marker, "value": value, "timeoutMs": t}),
                    ));
                    sent.push(d.send("append", json!({"name": w, "coId": list, "value": marker, "timeoutMs": t})));
                    keys.push((marker.clone(), value));
                    items.push(marker);
                }
            }
            edits += sent.len() as u64;
            let last = round + 1 == rounds;
            let replied_before_kill = if last { rng.range(0, sent.len() as u64) as usize } else { sent.len() };
            for id in &sent[..replied_before_kill] {
                let v = d.reply(*id);
                assert_eq!(v["ok"], true, "cycle {cycle}: edit failed: {v}");
            }
            if last {
                kill_9(server);
                for id in &sent[replied_before_kill..] {
                    // Local edits succeed with or without a server.
                    let v = d.reply(*id);
                    assert_eq!(v["ok"], true, "cycle {cycle}: edit failed: {v}");
                }
                break;
            }
            let waits: Vec<u64> =
                [&a, &b].iter().map(|w| d.send("waitSynced", json!({"name": w, "timeoutMs": t}))).collect();
            for id in waits {
                let v = d.reply(id);
                assert_eq!(v["ok"], true, "cycle {cycle}: waitSynced failed: {v}");
            }
            acked_keys.extend(keys);
            acked_items.extend(items);
        }

        // What the dead server had acknowledged or shown, per CoValue: each writer's confirmed
        // known state of the server peer. Its own session there is what the server acked with
        // `known`; the other writer's sessions are what the server forwarded. Both must survive:
        // the server forwards only durable content (crates/moai-cojson/src/durable.rs). Writers
        // go offline first and are closed: no re-upload.
        let mut shown: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for w in [&a, &b] {
            d.call("disconnect", json!({"name": w}));
        }
        for w in [&a, &b] {
            for id in &ids {
                let v = d.call("inspect", json!({"name": w, "coId": id}));
                merge_known(
                    shown.entry(id.as_str().unwrap().to_owned()).or_default(),
                    &json!({"sessions": sessions_of(&v["peerKnown"])}),
                );
            }
            d.call("close", json!({"name": w}));
        }

        server = db.start(&[]);
        let url = server.ws_url("/sync");
        d.call("createAccount", json!({"name": r, "url": url, "timeoutMs": t}));
        let deadline = Instant::now() + Duration::from_millis(COJSON_TIMEOUT_MS);
        let mut acked_txns = 0u64;
        for id in &ids {
            let loaded = d.call("load", json!({"name": r, "coId": id, "timeoutMs": t}));
            assert_eq!(loaded["available"], true, "cycle {cycle}: {id} unavailable after the restart: {loaded}");
            let need = &shown[id.as_str().unwrap()];
            acked_txns += need.values().sum::<u64>();
            // Content may arrive in several messages after the value became available: poll
            // the reader's known state until it covers what was acknowledged, or fail.
            loop {
                let known = d.call("inspect", json!({"name": r, "coId": id}))["known"].clone();
                match covers(&sessions_of(&known), need) {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => {
                        panic!(
                            "cycle {cycle}: {id}: acknowledged or forwarded data lost: {e}; the reader knows {known}"
                        )
                    }
                    Err(_) => std::thread::yield_now(),
                }
            }
        }
        let m = d.call("getMap", json!({"name": r, "coId": map, "timeoutMs": t}))["map"].clone();
        for (k, v) in &acked_keys {
            assert_eq!(&m[k], v, "cycle {cycle}: acknowledged key {k} lost: {m}");
        }
        let l = d.call("getList", json!({"name": r, "coId": list, "timeoutMs": t}))["list"].clone();
        for item in &acked_items {
            assert!(l.as_array().unwrap().contains(&json!(item)), "cycle {cycle}: acknowledged item {item} lost: {l}");
        }
        d.call("close", json!({"name": r}));

        let took = t0.elapsed();
        println!(
            "cojson cycle {}/{}: {rounds} rounds, {edits} edits, kill during the last; {} CoValues, {acked_txns} acknowledged or forwarded transactions all present for a fresh reader ({} keys, {} items checked by content); {} ms",
            cycle + 1,
            cycles("cojson"),
            ids.len(),
            acked_keys.len(),
            acked_items.len(),
            took.as_millis()
        );
        tally.add("edits", edits);
        tally.add("acked_txns_checked", acked_txns);
        tally.durations.push(took);
    }
    drop(server);
    tally.finish();
}
