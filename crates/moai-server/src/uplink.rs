//! Agent mode's upstream link (`PEER_MODE=agent`, `PEER_MOAI`; docs/participant.md): the task that
//! connects this server, as a client peer, to another sync server (another moai, or any Jazz
//! sync server) and drives the sans-IO [`moai_cojson::Uplink`] between that WebSocket and an
//! in-process session of the local relay. It only does I/O; what passes where is decided by
//! the core.
//!
//! Each link is a fresh upstream connection *and* a fresh local session, so neither server keeps
//! half an exchange with a link that is gone. A link that fails (connect error, close, a write
//! that does not finish within [`WRITE_DEADLINE`], upstream silent for [`SILENCE_LIMIT`]: servers
//! ping every few seconds) is retried after a capped, jittered backoff, reset once a link has
//! carried a frame.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
// The capped, equal-jitter reconnect schedule the change-feed client uses.
use moai_cojson::{
    parse_frame, CoId, CojsonService, CojsonSession, Fetched, Incoming, Outbound, Side, SyncMessage, Uplink,
    UplinkAction, UplinkConfig, UplinkEvent,
};
use moai_pgsync_client::{Backoff, BackoffConfig};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A link whose upstream sent nothing for this long is dead (cojson clients use 10 s too; moai
/// pings every 1.5 s of silence).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(10);
/// One frame to upstream must be written within this.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Connecting (TCP, TLS, the WebSocket handshake) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A frame to upstream is not extended with further messages once it is this long.
const FRAME_BYTES: usize = 64 * 1024;
/// Reconnect pacing: from this, doubling per failure, up to [`BACKOFF_MAX`], with jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where and how to connect upstream.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// `ws://` or `wss://` URL of the upstream's CoJSON endpoint.
    pub url: String,
    /// Sent as `Authorization: Bearer …` (a moai token of the upstream); a Jazz sync server's
    /// key goes in the URL (`?key=…`).
    pub token: Option<String>,
    /// The largest message accepted from upstream: the server's own `--max-frame-bytes`, so
    /// upstream cannot make this server hold more than a local client could. A larger one ends
    /// the link (and it reconnects).
    pub max_frame_bytes: usize,
}

/// `PEER_MOAI` as given: a full `ws://`/`wss://` URL (used as is), or `host[:port]` without a
/// scheme, which becomes `ws://…/sync` for a local host (`localhost`, `127.0.0.1`, `[::1]`)
/// and `wss://…/sync` for any other (what the original service did).
pub fn upstream_url(peer_moai: &str) -> Result<String, UplinkError> {
    let given = peer_moai.trim();
    if given.starts_with("ws://") || given.starts_with("wss://") {
        return Ok(given.to_owned());
    }
    if given.is_empty() || given.contains("://") || given.contains('/') || given.contains(char::is_whitespace) {
        return Err(UplinkError::BadUrl(given.to_owned()));
    }
    let host = if given.starts_with('[') {
        given.split(']').next().map(|h| format!("{h}]")).unwrap_or_default()
    } else {
        given.split(':').next().unwrap_or_default().to_owned()
    };
    let scheme = if matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]") { "ws" } else { "wss" };
    Ok(format!("{scheme}://{given}/sync"))
}

/// Why a link ended or could not start.
#[derive(Debug, Error)]
pub enum UplinkError {
    #[error("PEER_MOAI {0:?} is not host[:port] or a ws:// or wss:// URL")]
    BadUrl(String),
    #[error("the token is not a valid header value")]
    BadToken,
    #[error("connecting: {0}")]
    Connect(String),
    #[error("connecting: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("upstream closed the link: {0}")]
    Closed(String),
    #[error("upstream sent nothing for {0:?}")]
    Silent(Duration),
    #[error("writing to upstream: {0}")]
    Write(String),
    #[error("writing to upstream: not done within {0:?}")]
    WriteTimeout(Duration),
    #[error("the local relay closed the link's session: {0}")]
    LocalClosed(String),
    #[error("the local relay stopped")]
    LocalStopped,
}

/// What `/profile` shows about the link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStatus {
    /// The upstream URL without its query (which may hold a key).
    pub url: String,
    /// Whether the current link carried a frame from upstream.
    pub connected: bool,
    /// Links that carried a frame so far.
    pub links: u64,
    /// Why the last link ended or failed (no secrets: URLs are shown without their query).
    pub last_error: Option<String>,
    /// CoValues the link keeps in sync.
    pub followed: usize,
}

enum Command {
    Follow(CoId),
    Fetch(CoId, oneshot::Sender<Fetched>),
}

/// Handle on the uplink task. Cheap to clone.
#[derive(Clone)]
pub struct UplinkService {
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<UplinkStatus>>,
}

impl UplinkService {
    /// Starts the task: it follows `initial` (the server's account and its own CoValues) and
    /// connects until `stop` is cancelled.
    pub fn start(
        cojson: CojsonService,
        settings: UplinkSettings,
        initial: Vec<CoId>,
        stop: CancellationToken,
    ) -> Result<UplinkService, UplinkError> {
        if settings.token.as_deref().is_some_and(|t| HeaderValue::from_str(&format!("Bearer {t}")).is_err()) {
            return Err(UplinkError::BadToken);
        }
        let (commands, rx) = mpsc::channel(256);
        let status = Arc::new(Mutex::new(UplinkStatus { url: shown_url(&settings.url), ..UplinkStatus::default() }));
        let mut core = Uplink::new(UplinkConfig::default());
        for id in initial {
            core.handle(UplinkEvent::Follow(id));
        }
        let task = UplinkTask {
            cojson,
            settings,
            core,
            commands: rx,
            fetches: HashMap::new(),
            next_fetch: 0,
            status: status.clone(),
        };
        tokio::spawn(task.run(stop));
        Ok(UplinkService { commands, status })
    }

    /// Keep `id` in sync with upstream from now on.
    pub async fn follow(&self, id: CoId) {
        let _ = self.commands.send(Command::Follow(id)).await;
    }

    /// Brings `id` from upstream into the local relay (and follows it). `Offline` when there is
    /// no link, or no answer within `timeout`.
    pub async fn fetch(&self, id: CoId, timeout: Duration) -> Fetched {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Fetch(id, reply)).await.is_err() {
            return Fetched::Offline;
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(outcome)) => outcome,
            _ => Fetched::Offline,
        }
    }

    pub fn status(&self) -> UplinkStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn shown_url(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_owned()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct UplinkTask {
    cojson: CojsonService,
    settings: UplinkSettings,
    core: Uplink,
    commands: mpsc::Receiver<Command>,
    fetches: HashMap<u64, oneshot::Sender<Fetched>>,
    next_fetch: u64,
    status: Arc<Mutex<UplinkStatus>>,
}

/// What one link's I/O must do next, decided by the core.
#[derive(Default)]
struct Outgoing {
    upstream: Vec<SyncMessage>,
    local: Vec<SyncMessage>,
}

impl UplinkTask {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(BackoffConfig { initial: BACKOFF_MIN, max: BACKOFF_MAX });
        loop {
            let mut carried = false;
            let ended = tokio::select! {
                ended = self.link(&mut carried) => ended,
                _ = stop.cancelled() => return,
            };
            let out = self.handle(UplinkEvent::Disconnected);
            debug_assert!(out.upstream.is_empty() && out.local.is_empty());
            if matches!(ended, UplinkError::LocalStopped) {
                return;
            }
            if carried {
                backoff.reset();
            }
            let pause = backoff.next_delay();
            tracing::warn!(error = %ended, retry_in_ms = pause.as_millis() as u64, upstream = %shown_url(&self.settings.url), "agent mode: the upstream link is down");
            self.set_status(|s| {
                s.connected = false;
                s.last_error = Some(ended.to_string());
            });
            // Wait, still answering commands (fetches are offline now).
            let until = Instant::now() + pause;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = stop.cancelled() => return,
                    cmd = self.commands.recv() => match cmd {
                        Some(cmd) => { self.command(cmd); }
                        None => return,
                    },
                }
            }
        }
    }

    fn set_status(&self, f: impl FnOnce(&mut UplinkStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.followed = self.core.followed_count();
    }

    /// Runs the core on one event; answers fetches; returns the messages to send.
    fn handle(&mut self, event: UplinkEvent) -> Outgoing {
        let mut out = Outgoing::default();
        for action in self.core.handle(event) {
            match action {
                UplinkAction::Send(Side::Upstream, msg) => out.upstream.push(msg),
                UplinkAction::Send(Side::Local, msg) => out.local.push(msg),
                UplinkAction::Fetched(id, outcome) => {
                    if let Some(reply) = self.fetches.remove(&id) {
                        let _ = reply.send(outcome);
                    }
                }
            }
        }
        out
    }

    fn command(&mut self, cmd: Command) -> Outgoing {
        match cmd {
            Command::Follow(id) => self.handle(UplinkEvent::Follow(id)),
            Command::Fetch(id, reply) => {
                self.next_fetch += 1;
                self.fetches.insert(self.next_fetch, reply);
                self.handle(UplinkEvent::Fetch(self.next_fetch, id))
            }
        }
    }

    async fn connect(&self) -> Result<Socket, UplinkError> {
        let mut request =
            self.settings.url.as_str().into_client_request().map_err(|e| UplinkError::Connect(e.to_string()))?;
        if let Some(token) = &self.settings.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| UplinkError::BadToken)?;
            request.headers_mut().insert("authorization", value);
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.settings.max_frame_bytes))
            .max_frame_size(Some(self.settings.max_frame_bytes));
        let connecting = tokio_tungstenite::connect_async_with_config(request, Some(config), false);
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(e)) => Err(UplinkError::Connect(e.to_string())),
            Err(_) => Err(UplinkError::ConnectTimeout(CONNECT_TIMEOUT)),
        }
    }

    /// One link, from connecting until it fails. `carried`: whether upstream sent a frame.
    async fn link(&mut self, carried: &mut bool) -> UplinkError {
        let mut ws = match self.connect().await {
            Ok(ws) => ws,
            Err(e) => return e,
        };
        let mut local = match self.cojson.connect().await {
            Ok(s) => s,
            Err(_) => return UplinkError::LocalStopped,
        };
        let out = self.handle(UplinkEvent::Connected);
        let ended = match self.deliver(&mut ws, &local, out).await {
            Ok(()) => self.pump(&mut ws, &mut local, carried).await,
            Err(e) => e,
        };
        local.leave().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        ended
    }

    async fn pump(&mut self, ws: &mut Socket, local: &mut CojsonSession, carried: &mut bool) -> UplinkError {
        let mut heard = Instant::now();
        loop {
            let out = tokio::select! {
                frame = ws.next() => {
                    heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            if !*carried {
                                // Linked once upstream speaks (moai pings at once): a server that
                                // accepts the socket only to close it (a refused token) never was.
                                *carried = true;
                                self.set_status(|s| {
                                    s.connected = true;
                                    s.links += 1;
                                });
                                tracing::info!(upstream = %shown_url(&self.settings.url), "agent mode: linked to upstream");
                            }
                            self.receive(Side::Upstream, text.as_str())
                        }
                        Some(Ok(Message::Close(frame))) => {
                            return UplinkError::Closed(frame.map_or_else(|| "no reason".into(), |f| format!("{} {}", f.code, f.reason)));
                        }
                        Some(Ok(_)) => Outgoing::default(),
                        Some(Err(e)) => return UplinkError::Closed(e.to_string()),
                        None => return UplinkError::Closed("end of stream".into()),
                    }
                }
                out = local.outbound() => match out {
                    Some(Outbound::Text(text)) => self.receive(Side::Local, &text),
                    Some(Outbound::Close { code, reason }) => return UplinkError::LocalClosed(format!("{code} {reason}")),
                    None => return UplinkError::LocalStopped,
                },
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return UplinkError::LocalStopped,
                },
                _ = tokio::time::sleep_until(heard + SILENCE_LIMIT) => return UplinkError::Silent(SILENCE_LIMIT),
            };
            if let Err(e) = self.deliver(ws, local, out).await {
                return e;
            }
            self.set_status(|_| {});
        }
    }

    /// Feeds one frame's sync messages (pings and malformed lines skipped) to the core.
    fn receive(&mut self, side: Side, text: &str) -> Outgoing {
        let mut out = Outgoing::default();
        for line in parse_frame(text) {
            if let Ok(Incoming::Sync(msg)) = line {
                let more = self.handle(UplinkEvent::Message(side, msg));
                out.upstream.extend(more.upstream);
                out.local.extend(more.local);
            }
        }
        out
    }

    async fn deliver(&mut self, ws: &mut Socket, local: &CojsonSession, out: Outgoing) -> Result<(), UplinkError> {
        if !out.local.is_empty() {
            let frame = out.local.iter().map(SyncMessage::to_json).collect::<Vec<_>>().join("\n");
            local.receive(&frame).await.map_err(|_| UplinkError::LocalStopped)?;
        }
        let mut frame = String::new();
        for msg in out.upstream {
            let json = msg.to_json();
            if !frame.is_empty() && frame.len() + json.len() > FRAME_BYTES {
                send(ws, std::mem::take(&mut frame)).await?;
            }
            if !frame.is_empty() {
                frame.push('\n');
            }
            frame.push_str(&json);
        }
        if !frame.is_empty() {
            send(ws, frame).await?;
        }
        Ok(())
    }
}

async fn send(ws: &mut Socket, frame: String) -> Result<(), UplinkError> {
    match tokio::time::timeout(WRITE_DEADLINE, ws.send(Message::Text(frame.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(UplinkError::Write(e.to_string())),
        Err(_) => Err(UplinkError::WriteTimeout(WRITE_DEADLINE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_moai_is_a_host_or_a_websocket_url() {
        assert_eq!(upstream_url("hub.example:4000").unwrap(), "wss://hub.example:4000/sync");
        assert_eq!(upstream_url("hub.example").unwrap(), "wss://hub.example/sync");
        assert_eq!(upstream_url("localhost:4201").unwrap(), "ws://localhost:4201/sync");
        assert_eq!(upstream_url("127.0.0.1:9").unwrap(), "ws://127.0.0.1:9/sync");
        assert_eq!(upstream_url("[::1]:9").unwrap(), "ws://[::1]:9/sync");
        assert_eq!(upstream_url("ws://10.0.0.2:4000/sync?token=t").unwrap(), "ws://10.0.0.2:4000/sync?token=t");
        assert_eq!(upstream_url("wss://cloud.jazz.tools/?key=a").unwrap(), "wss://cloud.jazz.tools/?key=a");
        for bad in ["", "http://x", "x/y", "a b"] {
            assert!(upstream_url(bad).is_err(), "{bad:?}");
        }
        assert_eq!(shown_url("wss://cloud.jazz.tools/?key=secret"), "wss://cloud.jazz.tools/");
    }
}
