//! Load tool for moai's Postgres change feed, driven by `bench/pgsync/run.sh`.
//!
//! One client is the real `moai-pgsync-client` (WebSocket → session → in-memory store), so the
//! numbers include what an app pays: JSON parsing, store upserts and acks. Each subcommand
//! prints one JSON line with its measurements.
//!
//! * `latency`: single-row INSERT transactions at a steady rate; for each row, the time from
//!   the moment the writer's INSERT (autocommit) returned to the moment the client applied the
//!   transaction (`done_*`), and from the moment the INSERT was sent (`sent_*`, an upper
//!   bound that includes the commit itself).
//! * `catchup`: the client syncs, disconnects; N rows are written (transactions of
//!   `--txn-rows`); the tool waits until moai has them in its change history; then the client
//!   reconnects from its position and the time until it applied all N rows is measured.
//!   With `--recvlogical`, a pgoutput slot created before the writes is then consumed by
//!   `pg_recvlogical` up to the same end LSN, timed, as the reference decode rate of the same
//!   WAL on the same machine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moai_pgsync_client::{
    spawn, BackoffConfig, ClientConfig, MemoryStore, Op, ResumePoint, Row, Shape, Store, StoreError, Transaction,
};
use serde_json::json;
use tokio_postgres::{Client, NoTls};

const TABLE: &str = "public.items";

/// MemoryStore plus instrumentation: when each inserted id was applied, and how many ops.
struct BenchStore {
    inner: MemoryStore,
    applied_at: Arc<Mutex<HashMap<i64, Instant>>>,
    ops: Arc<AtomicU64>,
    record_times: bool,
}

impl Store for BenchStore {
    fn resume_point(&self) -> Option<ResumePoint> {
        self.inner.resume_point()
    }
    fn reset(&mut self, tables: &[String]) -> Result<(), StoreError> {
        self.inner.reset(tables)
    }
    fn upsert_snapshot(&mut self, table: &str, rows: Vec<(Row, Row)>) -> Result<(), StoreError> {
        self.inner.upsert_snapshot(table, rows)
    }
    fn apply(&mut self, txn: Transaction, resume: Option<ResumePoint>) -> Result<(), StoreError> {
        let n = txn.ops.len() as u64;
        if self.record_times {
            let now = Instant::now();
            let mut m = self.applied_at.lock().unwrap();
            for op in &txn.ops {
                if let Op::Insert { key, .. } = op {
                    if let Some(id) = key.get("id").and_then(|v| v.as_i64()) {
                        m.insert(id, now);
                    }
                }
            }
        }
        self.inner.apply(txn, resume)?;
        self.ops.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
    fn set_resume_point(&mut self, point: ResumePoint) -> Result<(), StoreError> {
        self.inner.set_resume_point(point)
    }
}

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<String> {
        self.0.iter().position(|a| a == name).and_then(|i| self.0.get(i + 1)).cloned()
    }
    fn req(&self, name: &str) -> String {
        self.get(name).unwrap_or_else(|| die(&format!("missing {name}")))
    }
    fn num(&self, name: &str, default: u64) -> u64 {
        self.get(name).map(|v| v.parse().unwrap_or_else(|_| die(&format!("{name} must be a number")))).unwrap_or(default)
    }
}

fn die(msg: &str) -> ! {
    eprintln!("pgsync-bench: {msg}");
    std::process::exit(2)
}

async fn sql(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| die(&format!("postgres: {e}")));
    tokio::spawn(conn);
    c
}

fn client_cfg(ws: &str, id: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(ws, id, vec![Shape::table("items", TABLE)]);
    cfg.backoff = BackoffConfig { initial: Duration::from_millis(20), max: Duration::from_millis(500) };
    cfg.max_batch_rows = Some(5000);
    cfg.window = Some(8);
    cfg
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            die(&format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn latency(a: &Args) {
    let (ws, pg) = (a.req("--ws"), a.req("--pg"));
    let rate = a.num("--rate", 100);
    let seconds = a.num("--seconds", 10);
    let base = a.num("--id-base", 1_000_000_000) as i64;
    let n = (rate * seconds) as i64;
    let applied_at = Arc::new(Mutex::new(HashMap::new()));
    let ops = Arc::new(AtomicU64::new(0));
    let store = BenchStore { inner: MemoryStore::new(), applied_at: applied_at.clone(), ops, record_times: true };
    let client = spawn(client_cfg(&ws, &format!("bench-latency-{base}")), store);
    let mut st = client.status();
    tokio::time::timeout(Duration::from_secs(120), st.wait_for(|s| s.up_to_date))
        .await
        .unwrap_or_else(|_| die("client never up to date"))
        .unwrap_or_else(|_| die("client stopped"));

    let c = sql(&pg).await;
    let stmt = c.prepare("INSERT INTO items (id, val, note) VALUES ($1, 0, 'lat')").await.unwrap();
    let mut times: Vec<(i64, Instant, Instant)> = Vec::with_capacity(n as usize);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..n {
        tick.tick().await;
        let id = base + i;
        let sent = Instant::now();
        c.execute(&stmt, &[&id]).await.unwrap();
        times.push((id, sent, Instant::now()));
    }
    wait_for("all rows applied", Duration::from_secs(120), || applied_at.lock().unwrap().len() as i64 >= n).await;
    let m = applied_at.lock().unwrap();
    let mut done = Vec::new();
    let mut sent = Vec::new();
    let mut negative = 0;
    for (id, s, d) in &times {
        let at = m[id];
        sent.push(at.duration_since(*s).as_secs_f64() * 1e3);
        match at.checked_duration_since(*d) {
            Some(x) => done.push(x.as_secs_f64() * 1e3),
            None => {
                negative += 1;
                done.push(-(d.duration_since(at).as_secs_f64() * 1e3));
            }
        }
    }
    done.sort_by(f64::total_cmp);
    sent.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "scenario": "latency", "rate": rate, "samples": n,
            "done_p50_ms": percentile(&done, 50.0), "done_p99_ms": percentile(&done, 99.0), "done_max_ms": percentile(&done, 100.0),
            "sent_p50_ms": percentile(&sent, 50.0), "sent_p99_ms": percentile(&sent, 99.0), "sent_max_ms": percentile(&sent, 100.0),
            "applied_before_insert_returned": negative,
        })
    );
    client.stop();
    let _ = client.join().await;
}

async fn catchup(a: &Args) {
    let (ws, pg) = (a.req("--ws"), a.req("--pg"));
    let rows = a.num("--rows", 100_000) as i64;
    let txn_rows = a.num("--txn-rows", 100).max(1) as i64;
    let base = a.num("--id-base", 2_000_000_000) as i64;
    let c = sql(&pg).await;
    let id = format!("bench-catchup-{base}");
    let ops = Arc::new(AtomicU64::new(0));
    let store =
        BenchStore { inner: MemoryStore::new(), applied_at: Arc::default(), ops: ops.clone(), record_times: false };

    // 1. Sync once, then go away.
    let client = spawn(client_cfg(&ws, &id), store);
    let mut st = client.status();
    tokio::time::timeout(Duration::from_secs(300), st.wait_for(|s| s.up_to_date))
        .await
        .unwrap_or_else(|_| die("client never up to date"))
        .unwrap();
    let store_arc = client.store().clone();
    client.stop();
    client.join().await.unwrap_or_else(|e| die(&format!("client: {e}")));
    let store = Arc::try_unwrap(store_arc).ok().unwrap().into_inner().unwrap();

    // 2. Reference slot (before the writes, so it sees exactly this WAL), then the writes.
    let slot = format!("bench_ref_{}", base % 1_000_000_000);
    let recvlogical = a.get("--recvlogical");
    if recvlogical.is_some() {
        c.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.unwrap();
    }
    let start_lsn: String = c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let t_write = Instant::now();
    let mut written = 0i64;
    while written < rows {
        let k = txn_rows.min(rows - written);
        c.execute(
            "INSERT INTO items (id, val, note) SELECT g, 1, 'catchup' FROM generate_series($1::int8, $2::int8) g",
            &[&(base + written), &(base + written + k - 1)],
        )
        .await
        .unwrap();
        written += k;
    }
    let write_secs = t_write.elapsed().as_secs_f64();
    let end_lsn: String = c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);

    // 3. Wait until moai's replicator has every row durably in its history.
    let t_ingest = Instant::now();
    loop {
        let r = c
            .query_one(
                "SELECT count(*) FROM moai_sync.change_history WHERE commit_lsn > $1::text::pg_lsn \
                 AND commit_lsn <= (SELECT watermark FROM moai_sync.replication_state)",
                &[&start_lsn],
            )
            .await
            .unwrap();
        let n: i64 = r.get(0);
        if n >= rows {
            break;
        }
        if t_ingest.elapsed() > Duration::from_secs(600) {
            die("moai never ingested the rows");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingest_secs = t_write.elapsed().as_secs_f64();

    // 4. Resume and time the catch-up. `--hold-ms` pauses first (and says so on stderr) so a
    // profiler can be attached to exactly this phase.
    let hold = a.num("--hold-ms", 0);
    if hold > 0 {
        eprintln!("RESUMING in {hold} ms");
        tokio::time::sleep(Duration::from_millis(hold)).await;
    }
    let before = ops.load(Ordering::Relaxed);
    let store = BenchStore { inner: store.inner, applied_at: Arc::default(), ops: ops.clone(), record_times: false };
    let t0 = Instant::now();
    let client = spawn(client_cfg(&ws, &id), store);
    let mut st = client.status();
    wait_for("catch-up", Duration::from_secs(600), || ops.load(Ordering::Relaxed) - before >= rows as u64).await;
    let catchup_secs = t0.elapsed().as_secs_f64();
    tokio::time::timeout(Duration::from_secs(60), st.wait_for(|s| s.up_to_date)).await.ok();
    let snapshots = st.borrow().snapshots;
    client.stop();
    let _ = client.join().await;

    // 5. Reference: pg_recvlogical decoding the same WAL range through pgoutput.
    let mut reference = serde_json::Value::Null;
    if let Some(bin) = recvlogical {
        let conninfo = a.req("--conninfo");
        let t = Instant::now();
        let out = std::process::Command::new(bin)
            .args(["-d", &conninfo, "--slot", &slot, "--start", "--no-loop", "--endpos", &end_lsn])
            .args(["-o", "proto_version=1", "-o", "publication_names=moai_sync", "-f", "/dev/null"])
            .output()
            .unwrap_or_else(|e| die(&format!("pg_recvlogical: {e}")));
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            die(&format!("pg_recvlogical failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        c.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
        reference = json!({"secs": secs, "rows_per_s": rows as f64 / secs});
    }
    println!(
        "{}",
        json!({
            "scenario": "catchup", "rows": rows, "txn_rows": txn_rows,
            "write_secs": write_secs, "ingest_secs": ingest_secs,
            "catchup_secs": catchup_secs, "catchup_rows_per_s": rows as f64 / catchup_secs,
            "snapshots_on_resume": snapshots, "start_lsn": start_lsn, "end_lsn": end_lsn,
            "pg_recvlogical_pgoutput": reference,
        })
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = Args(args.clone());
    match args.first().map(String::as_str) {
        Some("latency") => latency(&a).await,
        Some("catchup") => catchup(&a).await,
        _ => die("usage: pgsync-bench latency|catchup --ws URL --pg URL [...]"),
    }
}
