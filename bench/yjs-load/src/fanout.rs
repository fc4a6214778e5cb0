//! `fanout`: N documents × M clients, W of them writing K single-character updates each.
//!
//! Phases: connect (one client per document first, so a server's first load of a document is
//! not raced — spec §0.6 — then the rest), start all writers together, wait until every
//! expected delivery arrived or nothing arrived for `--drain-timeout-s`, report.
//! Expected deliveries = N × W × K × (M − 1): every update to every *other* client of its
//! document. Echoes to the sender are counted separately.
//!
//! With `--reader-url` (repeatable) the writers connect to `--url` and the readers round-robin
//! to the reader URLs (instances of one cluster: writers on A, readers on B and C), same
//! document names and protocol; the report names every URL and how many clients each got.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::sync::watch;

use crate::client::Outgoing;
use crate::common::{failure_summary, log, round3, Run, Target};
use crate::procfs::{self, ServerProbe};
use crate::stats::Samples;
use crate::track::{DeliveryStats, Progress, Receiver, SendLog, WRITER_CLIENT_BASE};
use crate::ydoc::Typist;

#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: Target,
    /// Documents.
    #[arg(long, default_value_t = 20)]
    pub docs: usize,
    /// Clients per document (writers included).
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Writers per document.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Updates per writer.
    #[arg(long, default_value_t = 200)]
    pub updates: u32,
    /// Updates per second per writer; 0 = as fast as the socket takes them (saturation).
    #[arg(long, default_value_t = 25.0)]
    pub rate: f64,
    /// Give up waiting for missing deliveries after this long without any progress.
    #[arg(long, default_value_t = 10)]
    pub drain_timeout_s: u64,
    /// Readers (every client that is not a writer) connect here instead of `--url`, round-robin
    /// over the given URLs within each document (repeatable). Writers stay on `--url`.
    /// Absent: every client connects to `--url`.
    #[arg(long = "reader-url", value_name = "URL")]
    pub reader_urls: Vec<String>,
    /// Further processes of the server under test (e.g. the instances behind `--reader-url`):
    /// their CPU time and RSS are sampled like `--server-pid`'s (repeatable).
    #[arg(long = "extra-server-pid", value_name = "PID")]
    pub extra_server_pids: Vec<u32>,
    /// Wait this long after every client is connected before the writers start (0 = start at
    /// once, as always before this option).
    #[arg(long, default_value_t = 0)]
    pub settle_ms: u64,
}

pub async fn run(a: FanoutArgs) -> Result<serde_json::Value> {
    anyhow::ensure!(a.docs > 0 && a.clients > 0, "need at least one document and one client");
    anyhow::ensure!(a.writers <= a.clients, "--writers must not exceed --clients");
    anyhow::ensure!(a.rate >= 0.0 && a.rate.is_finite(), "--rate must be >= 0");
    let prefix = a.target.doc_prefix();
    let base = Instant::now();
    let writer_docs: Vec<usize> = (0..a.docs).flat_map(|d| std::iter::repeat_n(d, a.writers)).collect();
    let log_ = Arc::new(SendLog::new(&writer_docs, a.updates, base));
    let progress = Arc::new(Progress::default());
    let mut run = Run::new(&a.target, Some(log_.clone())).await?;
    for url in &a.reader_urls {
        run.add_endpoint(url).await?;
    }
    let run = Arc::new(run);
    // Writers on endpoint 0 (`--url`); readers round-robin over the reader URLs, if any.
    let endpoint_of = |c: usize| {
        if c < a.writers || a.reader_urls.is_empty() {
            0
        } else {
            1 + (c - a.writers) % a.reader_urls.len()
        }
    };

    // Clients in connect order: client 0 of every document, then the others.
    let mut order: Vec<(usize, usize)> = (0..a.docs).map(|d| (d, 0)).collect();
    order.extend((1..a.clients).flat_map(|c| (0..a.docs).map(move |d| (d, c))));
    let mut typists: Vec<Option<Typist>> = Vec::new();
    let mut specs = Vec::with_capacity(order.len());
    for &(d, c) in &order {
        let writer = (c < a.writers).then(|| d * a.writers + c);
        let own = writer.map(|w| {
            let t = Typist::new(WRITER_CLIENT_BASE + w as u64);
            let doc = t.doc.clone();
            typists.push(Some(t));
            (w, doc)
        });
        if own.is_none() {
            typists.push(None);
        }
        let handler = Receiver::new(d, own, log_.clone(), progress.clone());
        specs.push((endpoint_of(c), format!("{prefix}-{d}"), handler));
    }
    // Clients per URL (writers and readers), for the report.
    let mut per_url = serde_json::Map::new();
    for (e, _, _) in &specs {
        let url = &run.endpoints[*e].url;
        let n = per_url.get(url).and_then(|v| v.as_u64()).unwrap_or(0);
        per_url.insert(url.clone(), json!(n + 1));
    }
    if a.reader_urls.is_empty() {
        log(&format!("fanout: connecting {} clients to {}", specs.len(), a.target.url));
    } else {
        log(&format!(
            "fanout: connecting {} clients, writers to {}, readers to {}",
            specs.len(),
            a.target.url,
            a.reader_urls.join(", ")
        ));
    }
    let t_connect = Instant::now();
    let results = run.open_many_at(specs).await;
    let connect_wall = t_connect.elapsed();

    let mut connect_times = Samples::default();
    let mut sessions = Vec::new();
    // Per session: whether it is connected to the writers' instance (`--url`).
    let mut same_instance = Vec::new();
    let mut writer_jobs = Vec::new();
    let mut errors = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok((session, took)) => {
                connect_times.push(took);
                let (d, c) = order[i];
                if let Some(typist) = typists[i].take() {
                    writer_jobs.push((d * a.writers + c, typist, session.out.clone(), session.framer.clone()));
                }
                sessions.push(session);
                same_instance.push(run.endpoints[endpoint_of(c)].url == a.target.url);
            }
            Err(e) => errors.push(e),
        }
    }
    log(&format!("fanout: {} connected, {} failed in {:?}; writing", sessions.len(), errors.len(), connect_wall));

    if a.settle_ms > 0 {
        tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
    }

    // Measurement starts here.
    let probe = ServerProbe::start(a.target.server_pid);
    let extra_probes: Vec<ServerProbe> = a.extra_server_pids.iter().map(|&p| ServerProbe::start(Some(p))).collect();
    let cpu0 = procfs::self_cpu();
    let (go_tx, go_rx) = watch::channel(false);
    let mut writers = Vec::new();
    for (w, typist, out, framer) in writer_jobs {
        let go = go_rx.clone();
        let (rate, k) = (a.rate, a.updates);
        writers.push(tokio::spawn(write_loop(w, typist, out, framer, go, rate, k)));
    }
    let _ = go_tx.send(true);
    let t_start = Instant::now();

    let expected = (a.docs * a.writers * a.updates as usize * (a.clients - 1)) as u64;
    let planned = if a.rate > 0.0 { Duration::from_secs_f64(f64::from(a.updates) / a.rate) } else { Duration::ZERO };
    let hard_limit = t_start + planned + Duration::from_secs(a.drain_timeout_s + 120);
    let drain = Duration::from_secs(a.drain_timeout_s);
    let mut last_count = 0;
    let mut last_change = Instant::now();
    let mut send_lag = Samples::default();
    let mut writers_done = false;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = progress.deliveries.load(Ordering::Acquire);
        let now = Instant::now();
        if n != last_count {
            last_count = n;
            last_change = now;
        }
        if !writers_done && writers.iter().all(|h| h.is_finished()) {
            writers_done = true;
            last_change = last_change.max(now); // the drain clock starts once writing ends
            for h in writers.drain(..) {
                if let Ok(lag) = h.await {
                    send_lag.merge(lag);
                }
            }
        }
        if n >= expected || (writers_done && now - last_change > drain) || now > hard_limit {
            break;
        }
    }
    let cpu = procfs::self_cpu().saturating_sub(cpu0);
    let server = probe.finish();
    let extra_servers: Vec<serde_json::Value> = extra_probes.iter().map(ServerProbe::finish).collect();
    // CPU of every sampled server process (one instance, or all instances of a cluster).
    let servers_cpu_s = std::iter::once(&server)
        .chain(extra_servers.iter())
        .map(|s| s["cpu_s"].as_f64())
        .try_fold(0.0, |sum, c| c.map(|c| sum + c))
        .filter(|_| a.target.server_pid.is_some())
        .map(round3);
    for h in writers {
        h.abort();
    }

    // Tear down and collect each receiver's accounting.
    run.stop();
    let mut stats = DeliveryStats::default();
    // Latency split by where the receiver is connected (clusters: the writers' own instance, or
    // another one), measured in the same run: the difference is the cross-instance hop under
    // the same machine load.
    let (mut same, mut cross) = (Samples::default(), Samples::default());
    let mut lost_handlers = 0;
    for (s, same_instance) in sessions.into_iter().zip(same_instance) {
        drop(s.out);
        match tokio::time::timeout(Duration::from_secs(5), s.reader).await {
            Ok(Ok(h)) => {
                if same_instance {
                    same.merge(h.stats.latency.clone());
                } else {
                    cross.merge(h.stats.latency.clone());
                }
                stats.merge(h.stats)
            }
            _ => lost_handlers += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // let close frames go out

    let first_send = log_.writers.iter().flat_map(|w| w.sent_ns_iter()).filter(|&t| t != 0).min().unwrap_or(0);
    let sent = log_.writers.iter().flat_map(|w| w.sent_ns_iter()).filter(|&t| t != 0).count();
    let last_delivery = progress.last_delivery_ns.load(Ordering::Acquire);
    let span_s = last_delivery.saturating_sub(first_send) as f64 / 1e9;
    let per_s = |n: f64| if span_s > 0.0 { (n / span_s).round() } else { 0.0 };

    let mut report = a.target.header("fanout");
    let extra = json!({
        "docs": a.docs, "clients_per_doc": a.clients, "writers_per_doc": a.writers,
        "updates_per_writer": a.updates, "rate_per_writer": a.rate, "settle_ms": a.settle_ms,
        "urls": {
            "writers": a.target.url,
            "readers": if a.reader_urls.is_empty() { vec![a.target.url.clone()] } else { a.reader_urls.clone() },
        },
        "clients_per_url": per_url,
        "connect": {
            "ok": connect_times.len(),
            "failed": failure_summary(errors.iter()),
            "wall_s": round3(connect_wall.as_secs_f64()),
            "connect_sync_ms": connect_times.summary_ms(),
        },
        "updates_sent": sent,
        "expected_deliveries": expected,
        "received_deliveries": stats.deliveries,
        "lost_deliveries": expected.saturating_sub(stats.deliveries),
        "duplicates": stats.duplicates,
        "echoes_to_sender": stats.echoes,
        "cross_doc_items": stats.cross_doc,
        "unexpected_items": stats.unexpected,
        "foreign_items": stats.foreign_items,
        "undecodable_updates": stats.undecodable_updates,
        "span_s": round3(span_s),
        "deliveries_per_s": per_s(stats.deliveries as f64),
        "updates_per_s": per_s(sent as f64),
        "latency_ms": stats.latency.summary_ms(),
        "latency_ms_same_instance": same.summary_ms(),
        "latency_ms_cross_instance": cross.summary_ms(),
        "slow_deliveries": slow_deliveries(&stats.slow, first_send),
        "send_lag_ms": send_lag.summary_ms(),
        "loadgen_cpu_s": round3(cpu.as_secs_f64()),
        "server": server,
        "extra_servers": extra_servers,
        "servers_cpu_s": servers_cpu_s,
        "events": run.counters.to_json(),
        "receivers_not_collected": lost_handlers,
    });
    merge(&mut report, extra);
    Ok(report)
}

/// One writer: K single-character updates, paced at `rate`/s from a random phase (so writers
/// are not in lockstep), or back to back when `rate` is 0. Returns how late each send was
/// against its schedule (a loadgen that cannot keep up shows here, not as server latency).
async fn write_loop(
    writer: usize,
    mut typist: Typist,
    out: tokio::sync::mpsc::Sender<Outgoing>,
    framer: crate::proto::Framer,
    mut go: watch::Receiver<bool>,
    rate: f64,
    k: u32,
) -> Samples {
    let mut lag = Samples::default();
    while !*go.borrow() {
        if go.changed().await.is_err() {
            return lag;
        }
    }
    let period = if rate > 0.0 { Some(Duration::from_secs_f64(1.0 / rate)) } else { None };
    let start = Instant::now() + period.map(|p| p.mul_f64(rand::random::<f64>())).unwrap_or_default();
    for seq in 0..k {
        if let Some(p) = period {
            let due = start + p * seq;
            tokio::time::sleep_until(due.into()).await;
            lag.push(Instant::now().saturating_duration_since(due));
        } else {
            tokio::task::yield_now().await;
        }
        let frame = framer.update(&typist.type_char());
        if out.send(Outgoing { frame, stamp: Some((writer, seq)) }).await.is_err() {
            break; // socket gone: the missing deliveries are reported as lost
        }
    }
    lag
}

/// When the deliveries of at least `SLOW_NS` were sent: their count and worst latency per 250 ms
/// of the run (from the first send), so a single stall (one bucket) is told from a tail spread
/// over the run.
fn slow_deliveries(slow: &[(u64, u64)], first_send: u64) -> serde_json::Value {
    const BUCKET_NS: u64 = 250_000_000;
    let mut buckets: std::collections::BTreeMap<u64, (u64, u64)> = std::collections::BTreeMap::new();
    for &(sent, lat) in slow {
        let b = buckets.entry(sent.saturating_sub(first_send) / BUCKET_NS).or_default();
        b.0 += 1;
        b.1 = b.1.max(lat);
    }
    let by_time: Vec<serde_json::Value> = buckets
        .iter()
        .take(40)
        .map(|(b, (n, max))| json!({"sent_at_s": round3((*b * BUCKET_NS) as f64 / 1e9), "count": n, "max_ms": round3(*max as f64 / 1e6)}))
        .collect();
    json!({
        "threshold_ms": crate::track::SLOW_NS as f64 / 1e6,
        "count": slow.len(),
        "by_time": by_time,
    })
}

pub fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}
