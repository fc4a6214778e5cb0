//! One benchmark client: a WebSocket to one document, speaking y-websocket or Hocuspocus.
//!
//! Each client is two tasks: a *reader* that parses every frame, answers the server's
//! SyncStep1 / Ping and hands document updates to a scenario-specific [`Handler`], and a
//! *sink* that writes queued frames (batched: feed everything queued, then flush once). Writers
//! queue their updates with a `(writer, seq)` stamp; the sink records the send time right
//! before the frame goes to the socket, so time spent in our own queue is not counted as
//! server latency, and a loadgen that falls behind shows up as send lag instead.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::proto::{Framer, Incoming, Protocol, EMPTY_STATE_VECTOR, EMPTY_UPDATE};
use crate::track::SendLog;

pub type Ws = WebSocketStream<TcpStream>;

/// Frames up to 256 MiB (the 10 MB document arrives as a single SyncStep2), and a small read
/// buffer: tungstenite's default `read_buffer_size` is 128 KiB and it zero-fills the buffer
/// before reading, so every socket costs 128 KiB of *resident* memory — measured 125 KiB per
/// idle connection on the relay with the default. Larger frames still work: the buffer grows
/// to the frame length on demand.
pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .max_message_size(Some(256 << 20))
        .max_frame_size(Some(256 << 20))
}

/// Read buffer of the loadgen's own sockets.
pub const CLIENT_READ_BUFFER: usize = 8 * 1024;

/// The URL a client of `doc` connects to: y-websocket names the document in the path,
/// Hocuspocus inside every frame.
pub fn doc_url(base: &str, protocol: Protocol, doc: &str, token: &str) -> String {
    let mut url = match protocol {
        Protocol::YWebsocket => format!("{}/{}", base.trim_end_matches('/'), doc),
        Protocol::Hocuspocus => base.to_owned(),
    };
    if !token.is_empty() && protocol == Protocol::YWebsocket {
        url.push_str("?token=");
        url.push_str(token);
    }
    url
}

/// Resolves `url` and refuses anything that is not loopback: this tool only ever loads servers
/// on this machine.
pub async fn loopback_addr(url: &str) -> Result<SocketAddr> {
    let request = url.into_client_request().with_context(|| format!("bad URL {url}"))?;
    let host = request.uri().host().context("URL without host")?.trim_matches(['[', ']']).to_owned();
    let port = request.uri().port_u16().unwrap_or(80);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
    match addrs.iter().find(|a| a.ip().is_loopback()) {
        Some(a) => Ok(*a),
        None => bail!("{url} does not resolve to a loopback address; refusing to send load there"),
    }
}

/// Opens a WebSocket with TCP_NODELAY (Nagle would add ~40 ms to single small frames, spec §0.8).
pub async fn connect(url: &str, addr: SocketAddr) -> Result<Ws> {
    let request = url.into_client_request()?;
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let (ws, _response) = tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config(CLIENT_READ_BUFFER)))
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    Ok(ws)
}

/// Events and anomalies of all clients of a run; reported, never hidden.
#[derive(Default, Debug)]
pub struct Counters {
    pub bad_frames: AtomicU64,
    pub text_frames: AtomicU64,
    pub auth_denied: AtomicU64,
    pub closed_by_server: AtomicU64,
    pub socket_errors: AtomicU64,
    pub sync_status_ok: AtomicU64,
    pub sync_status_refused: AtomicU64,
    pub server_step1: AtomicU64,
    pub pings_answered: AtomicU64,
    pub ignored_messages: AtomicU64,
}

impl Counters {
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "bad_frames": g(&self.bad_frames),
            "text_frames": g(&self.text_frames),
            "auth_denied": g(&self.auth_denied),
            "closed_by_server": g(&self.closed_by_server),
            "socket_errors": g(&self.socket_errors),
            "sync_status_ok": g(&self.sync_status_ok),
            "sync_status_refused": g(&self.sync_status_refused),
            "server_step1": g(&self.server_step1),
            "pings_answered": g(&self.pings_answered),
            "ignored_messages": g(&self.ignored_messages),
        })
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// What a scenario does with the document side of a client.
pub trait Handler: Send + 'static {
    /// The state vector sent in our SyncStep1.
    fn state_vector(&self) -> Vec<u8> {
        EMPTY_STATE_VECTOR.to_vec()
    }
    /// The update answering the server's SyncStep1 (what the server lacks).
    fn answer_step1(&mut self, _server_sv: &[u8]) -> Vec<u8> {
        EMPTY_UPDATE.to_vec()
    }
    /// A document update from the server (SyncStep2 or Update).
    fn on_update(&mut self, update: &[u8], received: Instant);
}

/// A frame to send; `stamp` marks a writer's update whose send time the sink records.
pub struct Outgoing {
    pub frame: Vec<u8>,
    pub stamp: Option<(usize, u32)>,
}

impl Outgoing {
    pub fn plain(frame: Vec<u8>) -> Self {
        Self { frame, stamp: None }
    }
}

pub struct Session<H> {
    pub out: mpsc::Sender<Outgoing>,
    pub framer: Framer,
    /// Resolves when the first SyncStep2 arrived (the client is "synced").
    pub synced: Option<oneshot::Receiver<Instant>>,
    pub reader: JoinHandle<H>,
}

pub struct SessionParams {
    pub url: String,
    pub addr: SocketAddr,
    pub framer: Framer,
    pub token: String,
    pub counters: Arc<Counters>,
    pub shutdown: watch::Receiver<bool>,
    pub send_log: Option<Arc<SendLog>>,
}

/// Connects and starts the two tasks; the opening frames (Auth, SyncStep1) are already queued.
pub async fn open<H: Handler>(p: SessionParams, handler: H) -> Result<Session<H>> {
    let ws = connect(&p.url, p.addr).await?;
    let (sink, stream) = ws.split();
    let (out, rx) = mpsc::channel::<Outgoing>(256);
    tokio::spawn(sink_loop(sink, rx, p.send_log.clone()));
    for frame in p.framer.opening(&handler.state_vector(), &p.token) {
        out.send(Outgoing::plain(frame)).await.context("socket closed during opening")?;
    }
    let (synced_tx, synced) = oneshot::channel();
    let reader = tokio::spawn(read_loop(
        stream,
        p.framer.clone(),
        out.clone(),
        handler,
        synced_tx,
        p.shutdown,
        p.counters,
    ));
    Ok(Session { out, framer: p.framer, synced: Some(synced), reader })
}

impl<H> Session<H> {
    /// Waits for the first SyncStep2, at most `limit`.
    pub async fn wait_synced(&mut self, limit: Duration) -> Result<Instant> {
        let rx = self.synced.take().context("already waited")?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(at)) => Ok(at),
            Ok(Err(_)) => bail!("socket closed before SyncStep2"),
            Err(_) => bail!("no SyncStep2 within {limit:?}"),
        }
    }
}

async fn sink_loop(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    send_log: Option<Arc<SendLog>>,
) {
    // Stamps a writer's update just before it enters the socket's write buffer.
    let stamp = |o: Outgoing| {
        if let (Some((writer, seq)), Some(log)) = (o.stamp, send_log.as_ref()) {
            log.stamp(writer, seq);
        }
        Message::Binary(o.frame.into())
    };
    while let Some(first) = rx.recv().await {
        if sink.feed(stamp(first)).await.is_err() {
            return;
        }
        // Batch whatever else is queued into one flush.
        while let Ok(next) = rx.try_recv() {
            if sink.feed(stamp(next)).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    // Every sender dropped: close politely.
    let _ = sink.send(Message::Close(None)).await;
}

async fn read_loop<H: Handler>(
    mut stream: futures_util::stream::SplitStream<Ws>,
    framer: Framer,
    out: mpsc::Sender<Outgoing>,
    mut handler: H,
    synced_tx: oneshot::Sender<Instant>,
    mut shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> H {
    let mut synced_tx = Some(synced_tx);
    loop {
        let next = tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() { break; }
                continue;
            }
            next = stream.next() => next,
        };
        let received = Instant::now();
        let data = match next {
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(Message::Text(_))) => {
                bump(&counters.text_frames);
                continue;
            }
            Some(Ok(Message::Close(_))) | None => {
                if !*shutdown.borrow() {
                    bump(&counters.closed_by_server);
                }
                break;
            }
            Some(Ok(_)) => continue, // ping/pong: tungstenite answers pings itself
            Some(Err(_)) => {
                if !*shutdown.borrow() {
                    bump(&counters.socket_errors);
                }
                break;
            }
        };
        let reply = match framer.parse(&data) {
            Err(_) => {
                bump(&counters.bad_frames);
                None
            }
            Ok(Incoming::SyncStep1(sv)) => {
                bump(&counters.server_step1);
                Some(framer.sync_step2(&handler.answer_step1(sv)))
            }
            Ok(Incoming::SyncStep2(update)) => {
                handler.on_update(update, received);
                if let Some(tx) = synced_tx.take() {
                    let _ = tx.send(received);
                }
                None
            }
            Ok(Incoming::Update(update)) => {
                handler.on_update(update, received);
                None
            }
            Ok(Incoming::Ping) => {
                bump(&counters.pings_answered);
                Some(Framer::pong())
            }
            Ok(Incoming::AuthDenied(_)) => {
                bump(&counters.auth_denied);
                None
            }
            Ok(Incoming::SyncStatus(true)) => {
                bump(&counters.sync_status_ok);
                None
            }
            Ok(Incoming::SyncStatus(false)) => {
                bump(&counters.sync_status_refused);
                None
            }
            Ok(Incoming::AuthOk) | Ok(Incoming::Awareness) => None,
            Ok(_) => {
                bump(&counters.ignored_messages);
                None
            }
        };
        if let Some(frame) = reply {
            if out.send(Outgoing::plain(frame)).await.is_err() {
                break;
            }
        }
    }
    handler
}
