//! Options and plumbing shared by the load scenarios: target, protocol, connection pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{self, Counters, Handler, Session, SessionParams};
use crate::proto::{Framer, Protocol};
use crate::track::SendLog;

#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Base URL. y-websocket: documents are `{url}/{docId}`; Hocuspocus: the socket URL as is.
    #[arg(long)]
    pub url: String,
    #[arg(long, value_enum, default_value = "y-websocket")]
    pub protocol: Protocol,
    /// Token: `?token=` for y-websocket, the Auth message for Hocuspocus (empty = none).
    #[arg(long, default_value = "")]
    pub token: String,
    /// Name of the server under test, copied into the report.
    #[arg(long, default_value = "")]
    pub label: String,
    /// PID of the server process: its CPU time and RSS are sampled around the measurement.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Prefix of document names; default: a fresh random one per run so no state carries over.
    #[arg(long)]
    pub doc_prefix: Option<String>,
    /// Connections opened concurrently while ramping up.
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
    /// Per-connection limit for connect + WebSocket handshake + first SyncStep2.
    #[arg(long, default_value_t = 20)]
    pub connect_timeout_s: u64,
}

impl Target {
    pub fn doc_prefix(&self) -> String {
        self.doc_prefix.clone().unwrap_or_else(|| format!("bench-{:08x}", rand::random::<u32>()))
    }

    pub fn header(&self, scenario: &str) -> serde_json::Value {
        serde_json::json!({
            "scenario": scenario,
            "label": self.label,
            "url": self.url,
            "protocol": self.protocol,
        })
    }
}

/// A server URL clients connect to, resolved (loopback only).
pub struct Endpoint {
    pub url: String,
    pub addr: SocketAddr,
}

/// Everything a run shares between its clients.
pub struct Run {
    pub target: Target,
    /// Where clients connect: `[0]` is `--url`; others are added with [`Run::add_endpoint`]
    /// (fanout's `--reader-url`: instances of one cluster).
    pub endpoints: Vec<Endpoint>,
    pub counters: Arc<Counters>,
    pub shutdown_tx: watch::Sender<bool>,
    pub shutdown: watch::Receiver<bool>,
    pub send_log: Option<Arc<SendLog>>,
}

impl Run {
    pub async fn new(target: &Target, send_log: Option<Arc<SendLog>>) -> Result<Self> {
        let addr = client::loopback_addr(&target.url).await?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        Ok(Self {
            target: target.clone(),
            endpoints: vec![Endpoint { url: target.url.clone(), addr }],
            counters: Arc::new(Counters::default()),
            shutdown_tx,
            shutdown,
            send_log,
        })
    }

    /// Adds another URL clients may connect to (same protocol and token); returns its index.
    pub async fn add_endpoint(&mut self, url: &str) -> Result<usize> {
        let addr = client::loopback_addr(url).await?;
        self.endpoints.push(Endpoint { url: url.to_owned(), addr });
        Ok(self.endpoints.len() - 1)
    }

    fn params(&self, endpoint: usize, doc: &str) -> SessionParams {
        let ep = &self.endpoints[endpoint];
        SessionParams {
            url: client::doc_url(&ep.url, self.target.protocol, doc, &self.target.token),
            addr: ep.addr,
            framer: Framer::new(self.target.protocol, doc),
            token: self.target.token.clone(),
            counters: self.counters.clone(),
            shutdown: self.shutdown.clone(),
            send_log: self.send_log.clone(),
        }
    }

    /// Opens one client and waits until it is synced; returns it with its connect+sync time.
    pub async fn open_synced<H: Handler>(&self, doc: &str, handler: H) -> Result<(Session<H>, Duration)> {
        self.open_synced_at(0, doc, handler).await
    }

    /// [`Run::open_synced`] on endpoint `endpoint` (an index into [`Run::endpoints`]).
    pub async fn open_synced_at<H: Handler>(
        &self,
        endpoint: usize,
        doc: &str,
        handler: H,
    ) -> Result<(Session<H>, Duration)> {
        let t0 = Instant::now();
        let limit = Duration::from_secs(self.target.connect_timeout_s);
        let mut session = tokio::time::timeout(limit, client::open(self.params(endpoint, doc), handler))
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out after {limit:?}"))??;
        let synced_at = session.wait_synced(limit).await?;
        Ok((session, synced_at.saturating_duration_since(t0)))
    }

    /// Opens many clients with bounded concurrency. Results come back in input order; failures
    /// are returned, not fatal (the report counts them).
    pub async fn open_many<H: Handler>(
        self: &Arc<Self>,
        clients: Vec<(String, H)>,
    ) -> Vec<Result<(Session<H>, Duration)>> {
        self.open_many_at(clients.into_iter().map(|(doc, h)| (0, doc, h)).collect()).await
    }

    /// [`Run::open_many`] with an endpoint per client: `(endpoint, doc, handler)`.
    pub async fn open_many_at<H: Handler>(
        self: &Arc<Self>,
        clients: Vec<(usize, String, H)>,
    ) -> Vec<Result<(Session<H>, Duration)>> {
        let gate = Arc::new(Semaphore::new(self.target.connect_concurrency.max(1)));
        let mut set = JoinSet::new();
        let n = clients.len();
        for (i, (endpoint, doc, handler)) in clients.into_iter().enumerate() {
            let run = self.clone();
            let gate = gate.clone();
            set.spawn(async move {
                let _permit = gate.acquire_owned().await;
                (i, run.open_synced_at(endpoint, &doc, handler).await)
            });
        }
        let mut out: Vec<Option<Result<(Session<H>, Duration)>>> = (0..n).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, r)) => out[i] = Some(r),
                Err(e) => log(&format!("connect task failed: {e}")),
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("connect task panicked"))))
            .collect()
    }

    /// Tells every reader to stop; sessions close when their senders are dropped.
    pub fn stop(&self) {
        let _ = self.shutdown_tx.send(true);
    }
}

/// Progress messages go to stderr; stdout carries only the JSON report.
pub fn log(msg: &str) {
    eprintln!("[yjs-load] {msg}");
}

/// Summarises connection failures: count plus the first few distinct messages.
pub fn failure_summary<'a>(errors: impl Iterator<Item = &'a anyhow::Error>) -> serde_json::Value {
    let mut count = 0;
    let mut samples: Vec<String> = Vec::new();
    for e in errors {
        count += 1;
        let msg = format!("{e:#}");
        if samples.len() < 3 && !samples.contains(&msg) {
            samples.push(msg);
        }
    }
    serde_json::json!({"count": count, "samples": samples})
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
