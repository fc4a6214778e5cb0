//! The dashboard's data: once a second, one JSON snapshot of the server, built from what the
//! server already keeps (the /metrics registry, readiness, storage health, the engines' own
//! counters) without asking any engine task anything. The last ten minutes of the plotted
//! numbers stay in a ring buffer, so a page opened now shows them at once.
//!
//! Cost: reading the registry's text and a few atomics per second; the list of documents (one
//! pass over the Yjs registry, top [`TOP_DOCUMENTS`]) only while someone watches; the change
//! feed's status (one small query) every [`FEED_STATUS_EVERY`] and the storage's size (file
//! sizes, or a catalog query on PostgreSQL) every [`STORAGE_SIZE_EVERY`] while someone watches,
//! each on a task of its own with a timeout, so a slow database never delays a snapshot.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::metrics_text::{quantile_between, Sample};
use crate::{AppState, Phase};

/// How often a snapshot is taken.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);
/// Plotted points kept: ten minutes at one a second.
pub(crate) const HISTORY: usize = 600;
/// Documents listed in a snapshot (the busiest: most connections, then largest).
pub(crate) const TOP_DOCUMENTS: usize = 50;
/// How often the change feed's lag and registry are read while someone watches.
const FEED_STATUS_EVERY: Duration = Duration::from_secs(5);
/// How often the storage's size is measured while someone watches.
const STORAGE_SIZE_EVERY: Duration = Duration::from_secs(10);
/// Longest a slow measurement (the change feed's status, the storage's size) may take.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(2);

/// One plotted second.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Point {
    /// Unix time, milliseconds.
    pub t: u64,
    /// Messages sent to clients per second (every protocol).
    pub deliveries: f64,
    /// Messages received from clients per second.
    pub received: f64,
    /// Storage group commits per second.
    pub commits: f64,
    /// Mean and 99th percentile (bucket bound) commit latency over the second, in ms; None
    /// without commits.
    pub commit_ms: Option<f64>,
    pub commit_p99_ms: Option<f64>,
    /// Open WebSocket sessions.
    pub connections: f64,
}

/// The snapshots as they are published, and the plotted history.
pub(crate) struct Feed {
    pub latest: watch::Sender<Arc<str>>,
    pub history: Mutex<VecDeque<Point>>,
}

impl Feed {
    pub(crate) fn new() -> Self {
        Self { latest: watch::channel(Arc::from("{}")).0, history: Mutex::new(VecDeque::with_capacity(HISTORY)) }
    }

    pub(crate) fn history_json(&self) -> String {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_string(&*h).unwrap_or_else(|_| "[]".into())
    }

    fn push(&self, point: Point) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(point);
    }
}

/// The last result of a measurement that is too slow to take every second (a query), refreshed
/// in the background at most every `every`, bounded by a timeout.
struct Periodic<T> {
    value: Mutex<Option<Result<T, String>>>,
    asked: Mutex<Option<Instant>>,
}

impl<T: Clone + Send + 'static> Periodic<T> {
    fn new() -> Arc<Self> {
        Arc::new(Self { value: Mutex::new(None), asked: Mutex::new(None) })
    }

    fn get(&self) -> Option<Result<T, String>> {
        self.value.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts `measure` unless it ran within `every`.
    fn refresh<F>(self: &Arc<Self>, every: Duration, measure: impl FnOnce() -> F)
    where
        F: std::future::Future<Output = Result<T, String>> + Send + 'static,
    {
        {
            let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
            if asked.is_some_and(|at| at.elapsed() < every) {
                return;
            }
            *asked = Some(Instant::now());
        }
        let cell = self.clone();
        let running = measure();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(MEASURE_TIMEOUT, running).await {
                Ok(r) => r,
                Err(_) => Err(format!("took longer than {} s", MEASURE_TIMEOUT.as_secs())),
            };
            *cell.value.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        });
    }
}

/// The slow measurements of one sampler.
struct Slow {
    feed_status: Arc<Periodic<moai_pgsync::FeedStatus>>,
    storage_size: Arc<Periodic<u64>>,
}

pub(crate) async fn run(state: AppState, feed: Arc<Feed>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut previous: Option<(Instant, Sample)> = None;
    let slow = Slow { feed_status: Periodic::new(), storage_size: Periodic::new() };
    loop {
        tokio::select! {
            _ = state.shutdown.token().cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let sample = Sample::read(&state.metrics.encode());
        let point = point(previous.as_ref().map(|(at, s)| (now - *at, s)), &sample);
        previous = Some((now, sample.clone()));
        feed.push(point);
        let watching = feed.latest.receiver_count() > 0;
        let snapshot = snapshot(&state, &sample, point, started.elapsed(), watching, &slow);
        feed.latest.send_replace(Arc::from(snapshot.to_string()));
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The rates between the previous reading and this one.
fn point(previous: Option<(Duration, &Sample)>, now: &Sample) -> Point {
    // fold, not sum: an empty f64 sum is -0.0.
    let connections = now.connections.values().fold(0.0, |a, b| a + b);
    let Some((elapsed, before)) = previous else {
        return Point {
            t: unix_ms(),
            deliveries: 0.0,
            received: 0.0,
            commits: 0.0,
            commit_ms: None,
            commit_p99_ms: None,
            connections,
        };
    };
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = |a: f64, b: f64| ((a - b).max(0.0) / secs * 10.0).round() / 10.0;
    let commits = (now.commits - before.commits).max(0.0);
    let round = |ms: f64| (ms * 1000.0).round() / 1000.0;
    let commit_ms = (commits > 0.0).then(|| round((now.commit_seconds - before.commit_seconds) / commits * 1000.0));
    let commit_p99_ms = quantile_between(&before.commit_buckets, &now.commit_buckets, 0.99)
        .map(|s| if s.is_finite() { round(s * 1000.0) } else { f64::INFINITY })
        .filter(|v| v.is_finite());
    Point {
        t: unix_ms(),
        deliveries: rate(now.deliveries(), before.deliveries()),
        received: rate(now.received(), before.received()),
        commits: rate(now.commits, before.commits),
        commit_ms,
        commit_p99_ms,
        connections,
    }
}

fn snapshot(state: &AppState, sample: &Sample, point: Point, uptime: Duration, watching: bool, slow: &Slow) -> Value {
    let phase = state.readiness.phase();
    let storage_error = state.storage_health.failure();
    let (phase_name, phase_error) = match &phase {
        Phase::Initializing => ("initializing", None),
        Phase::Ready(_) => ("ready", None),
        Phase::Failed(why) => ("failed", Some(why.to_string())),
        Phase::Draining => ("draining", None),
    };
    let ready = matches!(phase, Phase::Ready(_)) && storage_error.is_none();
    let mut v = json!({
        "t": point.t,
        "version": state.version,
        "uptime_s": uptime.as_secs(),
        "phase": phase_name,
        "ready": ready,
        "error": phase_error,
        "storage_error": storage_error,
        "auth": if state.auth.is_enabled() { "token" } else { "open" },
        "connections": sample.connections,
        "point": point,
        "totals": {
            "messages_in": sample.received(),
            "messages_out": sample.deliveries(),
            "bytes_in": sample.bytes_in,
            "bytes_out": sample.bytes_out,
            "commits": sample.commits,
            "writes_per_commit": if sample.commits > 0.0 { (sample.batch_writes / sample.commits * 10.0).round() / 10.0 } else { 0.0 },
            "commit_ms_mean": if sample.commits > 0.0 { (sample.commit_seconds / sample.commits * 1e6).round() / 1e3 } else { 0.0 },
            "unknown_messages": sample.unknown_messages,
        },
        "rejections": sample.rejected,
        "cluster": state.cluster.as_ref().map(|bus| {
            let status = bus.status().borrow().clone();
            let (s, reason) = match status {
                moai_cluster::BusStatus::Connected => ("ok", None),
                moai_cluster::BusStatus::Connecting => ("connecting", None),
                moai_cluster::BusStatus::Degraded(why) => ("degraded", Some(why)),
            };
            json!({ "status": s, "instance": bus.instance().to_string(), "reason": reason })
        }),
        "storage": Value::Null,
        "yjs": Value::Null,
        "cojson": Value::Null,
        "pgsync": Value::Null,
    });
    if let Some(probe) = state.dashboard.storage_size() {
        if watching {
            slow.storage_size.refresh(STORAGE_SIZE_EVERY, || (probe.measure)());
        }
        v["storage"] = json!({ "what": probe.what });
        match slow.storage_size.get() {
            Some(Ok(bytes)) => v["storage"]["bytes"] = json!(bytes),
            Some(Err(why)) => v["storage"]["size_error"] = json!(why),
            None => {}
        }
    }
    let Phase::Ready(engines) = &phase else { return v };
    if let Some(yjs) = &engines.yjs {
        let limit = if watching { TOP_DOCUMENTS } else { 0 };
        let docs = yjs.documents(limit);
        v["yjs"] = json!({
            "loaded": docs.loaded,
            "documents": docs.top.iter().map(|d| json!({
                "id": d.id,
                "loaded": d.loaded,
                "connections": d.connections,
                "present": d.present,
                "snapshot_bytes": d.snapshot_bytes,
                "journal_bytes": d.journal_bytes,
                "updates": d.updates,
                "open_s": d.open_for.as_secs(),
            })).collect::<Vec<_>>(),
        });
    }
    if let Some(cojson) = &engines.cojson {
        let s = cojson.stats();
        v["cojson"] = json!({
            "peers": s.peers,
            "resident_covalues": s.resident_covalues,
            "writes_pending": s.writes_pending,
            "evicted_total": s.evicted_total,
            "rejected_sessions_total": s.rejected_sessions_total,
            "invalid_headers_total": s.invalid_headers_total,
            "slow_peers_closed_total": s.slow_peers_closed_total,
            "storage_failures_total": s.storage_failures_total,
        });
    }
    if let Some(pgsync) = &engines.pgsync {
        let feed = pgsync.feed().borrow().clone();
        let snapshots = pgsync.snapshot_connections();
        v["pgsync"] = json!({
            "role": feed.phase.role(),
            "caught_up": feed.caught_up,
            "generation": feed.generation,
            "watermark": feed.watermark.to_string(),
            "horizon": feed.horizon.to_string(),
            "snapshot_connections": snapshots.open,
        });
        if watching {
            let pgsync = pgsync.clone();
            slow.feed_status
                .refresh(FEED_STATUS_EVERY, move || async move { pgsync.status().await.map_err(|e| e.to_string()) });
        }
        match slow.feed_status.get() {
            Some(Ok(s)) => {
                v["pgsync"]["lag_bytes"] = json!(s.lag_bytes);
                v["pgsync"]["wal_end"] = json!(s.wal_end.to_string());
                v["pgsync"]["registered_clients"] = json!(s.registered_clients);
                v["pgsync"]["oldest_client_position"] = json!(s.oldest_client_position.map(|p| p.to_string()));
            }
            Some(Err(why)) => v["pgsync"]["status_error"] = json!(why),
            None => {}
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_two_readings() {
        let mut a = Sample::default();
        a.messages_out.insert("yjs".into(), 100.0);
        a.commits = 10.0;
        a.commit_seconds = 0.010;
        a.commit_buckets = vec![(0.001, 10.0), (0.01, 10.0), (f64::INFINITY, 10.0)];
        let mut b = a.clone();
        b.messages_out.insert("yjs".into(), 300.0);
        b.connections.insert("yjs".into(), 4.0);
        b.commits = 20.0;
        b.commit_seconds = 0.030;
        b.commit_buckets = vec![(0.001, 15.0), (0.01, 20.0), (f64::INFINITY, 20.0)];
        let p = point(Some((Duration::from_secs(2), &a)), &b);
        assert_eq!((p.deliveries, p.commits, p.connections), (100.0, 5.0, 4.0));
        assert_eq!(p.commit_ms, Some(2.0));
        assert_eq!(p.commit_p99_ms, Some(10.0));
        let first = point(None, &b);
        assert_eq!((first.deliveries, first.commit_ms), (0.0, None));
    }

    #[test]
    fn the_history_is_a_bounded_ring() {
        let feed = Feed::new();
        for i in 0..(HISTORY as u64 + 5) {
            feed.push(Point { t: i, ..point(None, &Sample::default()) });
        }
        let h = feed.history.lock().unwrap();
        assert_eq!((h.len(), h.front().unwrap().t, h.back().unwrap().t), (HISTORY, 5, HISTORY as u64 + 4));
    }
}
