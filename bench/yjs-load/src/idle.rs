//! `idle`: the server's memory per idle connection.
//!
//! Samples the server's VmRSS with nothing connected, after one synced connection per document
//! (documents now loaded), and after all C connections; then holds them for `--hold-s` to see
//! that the server keeps them. The *marginal* figure, (after all − after one per doc) /
//! (C − docs), is the cost of a connection alone; the total figure includes the documents.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::client::Handler;
use crate::common::{failure_summary, log, round3, Run, Target};
use crate::fanout::merge;
use crate::procfs::{process_rss_kib, ServerProbe};
use crate::stats::Samples;

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: Target,
    /// Idle connections to open in total.
    #[arg(long, default_value_t = 2000)]
    pub connections: usize,
    /// Documents they are spread over.
    #[arg(long, default_value_t = 100)]
    pub docs: usize,
    /// How long to hold the connections after the last one is open.
    #[arg(long, default_value_t = 3)]
    pub hold_s: u64,
    /// Pause before each RSS sample, so allocations settle.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
}

/// An idle client: answers SyncStep1 with nothing, ignores updates.
struct Idle;

impl Handler for Idle {
    fn on_update(&mut self, _update: &[u8], _received: Instant) {}
}

pub async fn run(a: IdleArgs) -> Result<serde_json::Value> {
    anyhow::ensure!(a.docs > 0 && a.connections >= a.docs, "--connections must be >= --docs > 0");
    crate::procfs::raise_nofile_limit();
    let prefix = a.target.doc_prefix();
    let run = Arc::new(Run::new(&a.target, None).await?);
    let pid = a.target.server_pid;
    let settle = Duration::from_millis(a.settle_ms);
    let rss = || pid.and_then(process_rss_kib);

    let probe = ServerProbe::start(pid);
    let rss_empty = rss();
    let docs = |range: std::ops::Range<usize>| range.map(|i| (format!("{prefix}-{}", i % a.docs), Idle)).collect();
    let t0 = Instant::now();
    let first = run.open_many(docs(0..a.docs)).await;
    tokio::time::sleep(settle).await;
    let rss_docs = rss();
    let rest = run.open_many(docs(a.docs..a.connections)).await;
    let open_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let rss_all = rss();
    log(&format!("idle: {} connections opened in {open_s:.1}s; holding {}s", a.connections, a.hold_s));

    let mut sessions = Vec::new();
    let mut errors = Vec::new();
    let mut connect = Samples::default();
    for r in first.into_iter().chain(rest) {
        match r {
            Ok((s, took)) => {
                connect.push(took);
                sessions.push(s);
            }
            Err(e) => errors.push(e),
        }
    }
    tokio::time::sleep(Duration::from_secs(a.hold_s)).await;
    let rss_held = rss();
    let closed_while_idle = run.counters.closed_by_server.load(Ordering::Relaxed)
        + run.counters.socket_errors.load(Ordering::Relaxed);
    let server = probe.finish();

    run.stop();
    for s in sessions.drain(..) {
        drop(s.out);
        s.reader.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let per = |hi: Option<u64>, lo: Option<u64>, n: usize| match (hi, lo) {
        (Some(h), Some(l)) if n > 0 => Some(round3((h as f64 - l as f64) / n as f64)),
        _ => None,
    };
    let ok = connect.len();
    let mut report = a.target.header("idle");
    merge(
        &mut report,
        json!({
            "connections": a.connections,
            "docs": a.docs,
            "connected": ok,
            "failed": failure_summary(errors.iter()),
            "open_wall_s": round3(open_s),
            "connect_sync_ms": connect.summary_ms(),
            "closed_while_idle": closed_while_idle,
            "rss_kib": {"empty": rss_empty, "one_per_doc": rss_docs, "all": rss_all, "after_hold": rss_held},
            "kib_per_connection_marginal": per(rss_all, rss_docs, ok.saturating_sub(a.docs)),
            "kib_per_connection_incl_docs": per(rss_all, rss_empty, ok),
            "kib_per_doc_with_one_connection": per(rss_docs, rss_empty, a.docs),
            "server": server,
            "events": run.counters.to_json(),
        }),
    );
    Ok(report)
}
