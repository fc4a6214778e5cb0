//! The async client: connect, hello, pump frames through [`Session`], reconnect with backoff.
//!
//! [`spawn`] starts one task per client and returns a [`ClientHandle`]: the shared store, a
//! `watch` of [`Status`] (so apps and tests can wait for conditions instead of sleeping) and a
//! way to stop. The task never gives up on transient failures (connection refused, moai
//! restarting and answering 503, Postgres restarts, overload, protocol hiccups): each ends the
//! connection and schedules a reconnect after a capped, jittered delay ([`Backoff`]), resuming
//! from the store's resume point. It stops only on [`ClientError`]s, which retrying cannot fix.
//!
//! Liveness: a socket that has been silent for `idle_timeout` gets an application `ping`; if
//! nothing arrives for another `idle_timeout` the connection is considered dead (a half-open
//! TCP connection otherwise looks healthy forever).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use super::backoff::{Backoff, BackoffConfig};
use super::error::ClientError;
use super::messages::{self, ServerMessage, Shape};
use super::position::Position;
use super::session::{Halt, Session};
use super::store::Store;

/// Returns the token for the next connection attempt (e.g. refreshed from the app's backend).
pub type TokenProvider = Arc<dyn Fn() -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub struct ClientConfig {
    /// `ws://HOST:PORT/api/sync`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// If set, called before every connection attempt instead of using `token`, and an
    /// `unauthorized` answer is retried (with backoff) instead of stopping the client.
    pub token_provider: Option<TokenProvider>,
    /// Stable per installation: the server keeps the acked position under it.
    pub client_id: String,
    pub shapes: Vec<Shape>,
    pub max_batch_rows: Option<u32>,
    pub window: Option<u32>,
    pub backoff: BackoffConfig,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ClientConfig {
    pub fn new(url: impl Into<String>, client_id: impl Into<String>, shapes: Vec<Shape>) -> Self {
        ClientConfig {
            url: url.into(),
            token: None,
            token_provider: None,
            client_id: client_id.into(),
            shapes,
            max_batch_rows: None,
            window: None,
            backoff: BackoffConfig::default(),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(20),
        }
    }
}

/// What the client is doing, published on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub connected: bool,
    /// The last connection reached `up_to_date` and the store is at a consistent point.
    pub up_to_date: bool,
    pub generation: Option<u64>,
    /// End of the last transaction applied (or consistent point).
    pub position: Option<Position>,
    /// Transactions applied since the client started.
    pub applied_txns: u64,
    /// Successful WebSocket handshakes.
    pub connections: u64,
    /// `welcome{mode:"snapshot"}` received.
    pub snapshots: u64,
    /// Why the last connection ended.
    pub last_error: Option<String>,
    /// The server's last `status.state` (`starting`, `replication_reconnecting`, `ok`).
    pub server_state: Option<String>,
}

pub struct ClientHandle<S> {
    store: Arc<Mutex<S>>,
    status: watch::Receiver<Status>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), ClientError>>,
}

impl<S> ClientHandle<S> {
    /// The store the client writes to. Hold the lock briefly: the client waits for it.
    pub fn store(&self) -> &Arc<Mutex<S>> {
        &self.store
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Ask the client to close its connection and end.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Wait for the client task: `Ok` after [`stop`](Self::stop), `Err` if it gave up.
    pub async fn join(self) -> Result<(), ClientError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ClientError::Config(format!("client task failed: {e}"))),
        }
    }
}

/// Start a client on the current tokio runtime.
pub fn spawn<S: Store>(cfg: ClientConfig, store: S) -> ClientHandle<S> {
    let store = Arc::new(Mutex::new(store));
    let (status_tx, status) = watch::channel(Status::default());
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(cfg, store.clone(), status_tx, stop_rx));
    ClientHandle { store, status, stop, task }
}

enum Ended {
    Stopped,
    Halt(Halt),
}

async fn run<S: Store>(
    cfg: ClientConfig,
    store: Arc<Mutex<S>>,
    status: watch::Sender<Status>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let mut backoff = Backoff::new(cfg.backoff);
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let mut progressed = false;
        let ended = connect_once(&cfg, &store, &status, &mut stop, &mut progressed).await;
        status.send_modify(|s| s.connected = false);
        let (reason, after) = match ended {
            Ended::Stopped => return Ok(()),
            Ended::Halt(Halt::Stop(ClientError::Unauthorized(m))) if cfg.token_provider.is_some() => (m, None),
            Ended::Halt(Halt::Stop(e)) => {
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                return Err(e);
            }
            Ended::Halt(Halt::Retry { reason, after }) => (reason, after),
        };
        if progressed {
            backoff.reset();
        }
        let delay = backoff.next_delay().max(after.unwrap_or_default());
        tracing::info!(%reason, delay_ms = delay.as_millis() as u64, "pgsync client: reconnecting");
        status.send_modify(|s| {
            s.last_error = Some(reason);
            s.up_to_date = false;
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }
}

fn retry(reason: impl Into<String>) -> Ended {
    Ended::Halt(Halt::Retry { reason: reason.into(), after: None })
}

async fn connect_once<S: Store>(
    cfg: &ClientConfig,
    store: &Arc<Mutex<S>>,
    status: &watch::Sender<Status>,
    stop: &mut watch::Receiver<bool>,
    progressed: &mut bool,
) -> Ended {
    let mut request = match cfg.url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return Ended::Halt(Halt::Stop(ClientError::Config(format!("url {:?}: {e}", cfg.url)))),
    };
    let token = match &cfg.token_provider {
        Some(p) => p(),
        None => cfg.token.clone(),
    };
    if let Some(t) = token {
        match HeaderValue::from_str(&format!("Bearer {t}")) {
            Ok(v) => {
                request.headers_mut().insert("authorization", v);
            }
            Err(_) => return Ended::Halt(Halt::Stop(ClientError::Config("token is not a valid header value".into()))),
        }
    }
    let connect = tokio::time::timeout(cfg.connect_timeout, tokio_tungstenite::connect_async(request));
    let mut ws = tokio::select! {
        r = connect => match r {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => return retry(format!("connect: {e}")),
            Err(_) => return retry("connect: timed out"),
        },
        _ = stop.changed() => return Ended::Stopped,
    };
    let resume = lock(store).resume_point();
    let mut session = Session::new(cfg.shapes.clone(), resume);
    status.send_modify(|s| {
        s.connected = true;
        s.connections += 1;
    });
    let hello = messages::hello(&cfg.client_id, &cfg.shapes, resume, cfg.max_batch_rows, cfg.window);
    if let Err(e) = ws.send(Message::Text(hello.into())).await {
        return retry(format!("send hello: {e}"));
    }
    let mut pinged = false;
    let mut ping_t = 0u64;
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout(cfg.idle_timeout, ws.next()) => r,
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return Ended::Stopped;
            }
        };
        let frame = match next {
            Err(_) if pinged => return retry("connection silent after ping"),
            Err(_) => {
                pinged = true;
                ping_t += 1;
                if let Err(e) = ws.send(Message::Text(messages::ping(ping_t).into())).await {
                    return retry(format!("send ping: {e}"));
                }
                continue;
            }
            Ok(None) => return retry("connection closed"),
            Ok(Some(Err(e))) => return retry(format!("websocket: {e}")),
            Ok(Some(Ok(frame))) => frame,
        };
        pinged = false;
        let text = match frame {
            Message::Text(t) => t,
            Message::Close(f) => {
                let (code, reason) =
                    f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                if code == 4401 || code == 4403 {
                    return Ended::Halt(Halt::Stop(ClientError::Unauthorized(format!("closed {code}: {reason}"))));
                }
                return retry(format!("server closed the connection ({code}: {reason})"));
            }
            _ => continue, // pings are answered by tungstenite; binary frames are not ours
        };
        let msg = match ServerMessage::parse(&text) {
            Ok(m) => m,
            Err(e) => return Ended::Halt(e.into()),
        };
        let is_snapshot = matches!(msg, ServerMessage::Welcome { snapshot: true, .. });
        let reaction = {
            let mut guard = lock(store);
            session.handle(msg, &mut *guard)
        };
        let reaction = match reaction {
            Ok(r) => r,
            Err(h) => {
                let _ = ws.close(None).await;
                return Ended::Halt(h);
            }
        };
        if reaction.up_to_date {
            *progressed = true;
        }
        status.send_if_modified(|s| {
            let before = s.clone();
            s.applied_txns += reaction.applied;
            s.snapshots += u64::from(is_snapshot);
            s.up_to_date |= reaction.up_to_date;
            s.generation = session.generation();
            s.position = session.applied();
            s.server_state.clone_from(&session.server_state);
            *s != before
        });
        for frame in reaction.send {
            if let Err(e) = ws.send(Message::Text(frame.into())).await {
                return retry(format!("send: {e}"));
            }
        }
    }
}

/// A poisoned lock means the app panicked while holding the store; the data itself is still
/// what the last completed call left, so keep going rather than cascade the panic.
fn lock<S>(m: &Mutex<S>) -> std::sync::MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
