//! `big-doc`: single-character edit latency on a large document.
//!
//! An observer joins an empty document; an editor holding the ~10 MB document connects and
//! uploads it (as its answer to the server's SyncStep1, or — for a server that never asks, such
//! as the relay — pushed as one sync Update). When the observer holds every item of the
//! document, an optional late joiner measures the full-state download, then the editor makes
//! K single-character inserts at random positions, `--interval-ms` apart, and the observer
//! records each one's latency.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tokio::sync::oneshot;
use yrs::updates::decoder::Decode;

use crate::client::Outgoing;
use crate::common::{log, round3, Run, Target};
use crate::fanout::merge;
use crate::procfs::{self, ServerProbe};
use crate::track::{Progress, Receiver, SendLog, Watch, WRITER_CLIENT_BASE};
use crate::ydoc::{self, Editor, BIG_AUTHOR};

#[derive(clap::Args, Debug)]
pub struct BigDocArgs {
    #[command(flatten)]
    pub target: Target,
    /// Size of the encoded document state in MiB.
    #[arg(long, default_value_t = 10.0)]
    pub size_mb: f64,
    /// Single-character edits to time.
    #[arg(long, default_value_t = 100)]
    pub edits: u32,
    /// Pause between edits.
    #[arg(long, default_value_t = 30)]
    pub interval_ms: u64,
    /// File caching the generated document (deterministic; rebuilt if its size does not fit).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Skip the late joiner (a relay stores nothing, so a joiner would get an empty state).
    #[arg(long)]
    pub skip_joiner: bool,
    /// Limit for uploading / downloading the document.
    #[arg(long, default_value_t = 60)]
    pub load_timeout_s: u64,
}

fn load_or_build(target_bytes: usize, cache: Option<&PathBuf>) -> Result<(Vec<u8>, f64)> {
    let fits = |s: &Vec<u8>| s.len() >= target_bytes && s.len() <= target_bytes + target_bytes / 10;
    if let Some(path) = cache {
        if let Ok(state) = std::fs::read(path) {
            if fits(&state) && yrs::Update::decode_v1(&state).is_ok() {
                return Ok((state, 0.0));
            }
        }
    }
    let t = Instant::now();
    let (state, chars) = ydoc::build_big_doc(target_bytes);
    let took = t.elapsed().as_secs_f64();
    log(&format!("big-doc: built {} bytes ({} chars) in {took:.1}s", state.len(), chars));
    if let Some(path) = cache {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, &state).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok((state, took))
}

/// How many items of the author the full state holds (what the observer must receive).
fn author_items(state: &[u8]) -> Result<u64> {
    let update = yrs::Update::decode_v1(state)?;
    Ok(update
        .insertions(true)
        .iter()
        .filter(|(c, _)| c.get() == BIG_AUTHOR)
        .flat_map(|(_, r)| r.iter().map(|r| u64::from(r.end - r.start)).collect::<Vec<_>>())
        .sum())
}

pub async fn run(a: BigDocArgs) -> Result<serde_json::Value> {
    let target_bytes = (a.size_mb * 1024.0 * 1024.0) as usize;
    let (state, build_s) = load_or_build(target_bytes, a.cache.as_ref())?;
    let items = author_items(&state)?;
    let prefix = a.target.doc_prefix();
    let doc = format!("{prefix}-big");
    let log_ = Arc::new(SendLog::new(&[0], a.edits, Instant::now()));
    let progress = Arc::new(Progress::default());
    let run = Arc::new(Run::new(&a.target, Some(log_.clone())).await?);
    let whole = ServerProbe::start(a.target.server_pid);
    let timeout = Duration::from_secs(a.load_timeout_s);
    let watch = |done| Watch { client: BIG_AUTHOR, target: items, seen: 0, done: Some(done) };

    // Observer first, on the empty document.
    let (obs_done_tx, obs_done) = oneshot::channel();
    let mut observer = Receiver::new(0, None, log_.clone(), progress.clone()).with_watch(watch(obs_done_tx));
    observer.each = Some(Vec::new());
    let (observer, _) = run.open_synced(&doc, observer).await.context("observer")?;

    // Editor uploads.
    let mut editor = Editor::new(WRITER_CLIENT_BASE, &state)?;
    let t_upload = Instant::now();
    let handler = Receiver::new(0, Some((0, editor.doc.clone())), log_.clone(), progress.clone());
    let (editor_session, _) = run.open_synced(&doc, handler).await.context("editor")?;
    let mut pushed = false;
    if run.counters.server_step1.load(Ordering::Relaxed) == 0 {
        // Nobody asked for our state (relay): push it like a local change.
        let frame = editor_session.framer.update(&ydoc::diff(&editor.doc, &[0]));
        editor_session.out.send(Outgoing::plain(frame)).await.context("editor socket closed")?;
        pushed = true;
    }
    let observer_has_doc = tokio::time::timeout(timeout, obs_done)
        .await
        .context("observer did not receive the whole document in time")?
        .context("observer socket closed")?;
    let upload_ms = observer_has_doc.saturating_duration_since(t_upload).as_secs_f64() * 1e3;
    log(&format!("big-doc: {} bytes reached the observer in {upload_ms:.0} ms", state.len()));

    // Late joiner downloads the full state.
    let mut join_ms = None;
    if !a.skip_joiner {
        let (done_tx, done) = oneshot::channel();
        let joiner = Receiver::new(0, None, log_.clone(), progress.clone()).with_watch(watch(done_tx));
        let t = Instant::now();
        let (joiner, _) = run.open_synced(&doc, joiner).await.context("joiner")?;
        let at = tokio::time::timeout(timeout, done).await.context("joiner timed out")?.context("joiner closed")?;
        join_ms = Some(round3(at.saturating_duration_since(t).as_secs_f64() * 1e3));
        drop(joiner.out);
        joiner.reader.abort();
    }

    // Timed edits.
    let edits_probe = ServerProbe::start(a.target.server_pid);
    let cpu0 = procfs::self_cpu();
    let start = Instant::now();
    let interval = Duration::from_millis(a.interval_ms);
    for seq in 0..a.edits {
        tokio::time::sleep_until((start + interval * seq).into()).await;
        let frame = editor_session.framer.update(&editor.edit());
        if editor_session.out.send(Outgoing { frame, stamp: Some((0, seq)) }).await.is_err() {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while progress.deliveries.load(Ordering::Acquire) < u64::from(a.edits) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = procfs::self_cpu().saturating_sub(cpu0);
    let server_edits = edits_probe.finish();
    let server_whole = whole.finish();

    run.stop();
    drop(editor_session.out);
    let (mut obs_stats, mut each) = match tokio::time::timeout(Duration::from_secs(5), observer.reader).await {
        Ok(Ok(h)) => (h.stats, h.each.unwrap_or_default()),
        _ => anyhow::bail!("observer task did not finish"),
    };
    // The five slowest edits and when they were due, to tell a periodic stall (e.g. a snapshot
    // of the whole document) from random noise.
    each.sort_by_key(|&(_, ns)| std::cmp::Reverse(ns));
    let slowest: Vec<_> = each
        .iter()
        .take(5)
        .map(|&(seq, ns)| json!({"seq": seq, "due_ms": u64::from(seq) * a.interval_ms, "latency_ms": round3(ns as f64 / 1e6)}))
        .collect();
    let _ = tokio::time::timeout(Duration::from_secs(5), editor_session.reader).await;

    let mut report = a.target.header("big-doc");
    merge(
        &mut report,
        json!({
            "state_bytes": state.len(),
            "build_s": round3(build_s),
            "pushed_as_update": pushed,
            "upload_to_observer_ms": round3(upload_ms),
            "late_joiner_full_state_ms": join_ms,
            "edits": a.edits,
            "interval_ms": a.interval_ms,
            "received_edits": obs_stats.deliveries,
            "lost_edits": u64::from(a.edits).saturating_sub(obs_stats.deliveries),
            "duplicates": obs_stats.duplicates,
            "edit_latency_ms": obs_stats.latency.summary_ms(),
            "slowest_edits": slowest,
            "loadgen_cpu_s_edits": round3(cpu.as_secs_f64()),
            "server_during_edits": server_edits,
            "server": server_whole,
            "events": run.counters.to_json(),
        }),
    );
    Ok(report)
}
