//! The one loop every WebSocket session runs, whatever its protocol.
//!
//! An endpoint upgrades, joins its engine, wraps the engine's session in an [`EngineSession`]
//! and calls [`pump`]. Everything that is not protocol lives here, once, so the endpoints cannot
//! drift apart: frames in and out with the frame limit (1009), batched writes under one flush
//! with a write deadline (a client that stops reading is closed, never buffered for), WebSocket
//! pings (two unanswered close the socket), an application keepalive for idle sockets, a
//! deadline for the first message (a socket that upgrades and never speaks is closed), the
//! token's expiry (4403 when `exp` passes), server shutdown (1001), and the close handshake.

use std::future::Future;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use tokio::time::{interval_at, sleep_until, Instant};

use crate::ws::{client_close, close, close_gracefully, close_too_big, is_too_big, SessionLog, CLOSE_LINGER};
use crate::{AppState, Direction, Protocol};

/// Most queued frames written with one flush; bounds how long one socket's burst can delay its
/// other duties (pings, reads).
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// A timer that never fires in practice (tokio's timers reach about two years).
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Heartbeat and deadline timings of WebSocket sessions.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// WebSocket ping interval; a socket that leaves two pings unanswered is closed.
    pub ping_interval: Duration,
    /// Yjs: the empty awareness frame goes to a socket that sent nothing for this long
    /// (browsers cannot see pings and drop a socket silent for 30 s).
    pub idle_keepalive: Duration,
    /// How long one write to a socket may take before the socket counts as dead.
    pub write_timeout: Duration,
    /// How long a new socket may stay silent before its first message; closed with 1008 after.
    pub first_message_timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            idle_keepalive: Duration::from_secs(15),
            write_timeout: Duration::from_secs(10),
            first_message_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a session ends, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }
}

/// What an engine session wants written next.
pub(crate) enum Outbound {
    Frame(Message),
    Close(Close),
}

/// A data frame from the client.
pub(crate) enum Inbound {
    Text(Utf8Bytes),
    Binary(Bytes),
}

/// One socket's session with an engine, as the pump drives it. Implemented at the edge for each
/// engine's own session handle (the engines know nothing of sockets).
pub(crate) trait EngineSession: Send {
    /// The next thing to write. Waits until there is one; a session the engine dropped returns
    /// the close that says why.
    fn outbound(&mut self) -> impl Future<Output = Outbound> + Send;
    /// The next thing to write if one is ready now (batched under the same flush).
    fn try_outbound(&mut self) -> Option<Outbound>;
    /// One data frame from the client; `Err` ends the session with that close.
    fn receive(&mut self, frame: Inbound) -> impl Future<Output = Result<(), Close>> + Send;
    /// Frame to send when the socket has written nothing for [`EngineSession::keepalive_after`].
    fn keepalive_frame(&self) -> Option<Message> {
        None
    }
    /// How long the socket may stay without writing before [`EngineSession::keepalive_frame`].
    fn keepalive_after(&self) -> Option<Duration> {
        None
    }
    /// Leaves the engine (presence removed, subscriptions dropped). Called once, at the end.
    fn leave(self) -> impl Future<Output = ()> + Send;
}

/// What the pump needs to know about one session besides the engine.
pub(crate) struct PumpSettings {
    pub protocol: Protocol,
    /// When the token stops being valid.
    pub expires_at: Option<SystemTime>,
}

fn deadline_from(at: Option<SystemTime>) -> Instant {
    match at {
        None => Instant::now() + NEVER,
        Some(at) => Instant::now() + at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).min(NEVER),
    }
}

/// Pumps one socket until either side closes, the engine drops it, the token expires or the
/// server shuts down. Leaves the engine and closes the socket with the right code in every case.
pub(crate) async fn pump<S: EngineSession>(
    mut socket: WebSocket,
    mut session: S,
    settings: PumpSettings,
    state: &AppState,
    log: &mut SessionLog,
) {
    let metrics = &state.metrics;
    let hb = &state.heartbeat;
    let protocol = settings.protocol;
    let mut ping = interval_at(Instant::now() + hb.ping_interval, hb.ping_interval);
    let mut unanswered_pings = 0u32;
    // The keepalive timer is armed once and re-armed only when it fires: sends just record
    // when they happened, so no timer is touched per message.
    let keepalive_after = session.keepalive_after().unwrap_or(NEVER);
    let mut last_sent = Instant::now();
    let keepalive = tokio::time::sleep(keepalive_after);
    tokio::pin!(keepalive);
    let expiry = sleep_until(deadline_from(settings.expires_at));
    tokio::pin!(expiry);
    let silence = tokio::time::sleep(hb.first_message_timeout);
    tokio::pin!(silence);
    let mut spoken = false;
    let shutdown = state.shutdown.token().clone();

    let end: Option<Close> = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Some(Close::new(close::GOING_AWAY, "server shutting down")),
            _ = &mut expiry => {
                metrics.rejected("token_expired");
                break Some(Close::new(close::FORBIDDEN, "token expired"));
            }
            _ = &mut silence, if !spoken => {
                metrics.rejected("silent_socket");
                let reason = format!("no message within {:?} of connecting", hb.first_message_timeout);
                break Some(Close::new(close::POLICY, reason));
            }
            out = session.outbound() => {
                // Take whatever else is already queued and write it with one flush.
                let (mut frames, mut then) = match out {
                    Outbound::Frame(frame) => (vec![frame], None),
                    Outbound::Close(c) => (Vec::new(), Some(c)),
                };
                while then.is_none() && !frames.is_empty() && frames.len() < MAX_FRAMES_PER_FLUSH {
                    match session.try_outbound() {
                        Some(Outbound::Frame(f)) => frames.push(f),
                        Some(Outbound::Close(c)) => then = Some(c),
                        None => break,
                    }
                }
                if !frames.is_empty() {
                    for f in &frames {
                        count_out(state, protocol, f);
                    }
                    if !crate::ws::send_all_with_deadline(&mut socket, frames, hb.write_timeout).await {
                        metrics.rejected("write_timeout");
                        break None;
                    }
                    last_sent = Instant::now();
                }
                if let Some(c) = then {
                    break Some(c);
                }
            }
            incoming = socket.recv() => {
                let frame = match incoming {
                    Some(Ok(Message::Binary(b))) => Inbound::Binary(b),
                    Some(Ok(Message::Text(t))) => Inbound::Text(t),
                    Some(Ok(Message::Pong(_))) => { unanswered_pings = 0; continue; }
                    Some(Ok(Message::Ping(_))) => continue, // answered by the WebSocket layer
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = client_close(frame);
                        log.set_close(code, reason);
                        session.leave().await;
                        return;
                    }
                    Some(Err(e)) if is_too_big(&e) => {
                        session.leave().await;
                        close_too_big(&mut socket, state, log).await;
                        return;
                    }
                    Some(Err(e)) => {
                        log.set_close(1006, format!("read error: {e}"));
                        session.leave().await;
                        return;
                    }
                    None => {
                        log.set_close(1006, "connection dropped");
                        session.leave().await;
                        return;
                    }
                };
                spoken = true;
                let bytes: &[u8] = match &frame { Inbound::Binary(b) => b, Inbound::Text(t) => t.as_bytes() };
                metrics.message(protocol, Direction::In, bytes.len());
                if let Some(capture) = &state.capture {
                    capture.record(protocol, bytes);
                }
                if let Err(c) = session.receive(frame).await {
                    break Some(c);
                }
            }
            _ = ping.tick() => {
                if unanswered_pings >= 2 {
                    break Some(Close::new(close::GOING_AWAY, "no pong to two pings"));
                }
                unanswered_pings += 1;
                if !crate::ws::send_with_deadline(&mut socket, Message::Ping(Bytes::new()), hb.write_timeout).await {
                    break None;
                }
            }
            _ = &mut keepalive => {
                let due = last_sent + keepalive_after;
                if Instant::now() >= due {
                    if let Some(frame) = session.keepalive_frame() {
                        count_out(state, protocol, &frame);
                        if !crate::ws::send_with_deadline(&mut socket, frame, hb.write_timeout).await {
                            break None;
                        }
                    }
                    last_sent = Instant::now();
                }
                keepalive.as_mut().reset(last_sent + keepalive_after);
            }
        }
    };
    session.leave().await;
    match end {
        Some(Close { code, reason }) => {
            if code == close::TRY_AGAIN_LATER {
                metrics.rejected("slow_consumer");
            }
            close_gracefully(&mut socket, code, &reason, CLOSE_LINGER).await;
            log.set_close(code, reason);
        }
        // A write failed or timed out: the socket is unusable, no close frame can get through.
        None => log.set_close(1006, "write failed or timed out"),
    }
}

fn count_out(state: &AppState, protocol: Protocol, frame: &Message) {
    let len = match frame {
        Message::Binary(b) => b.len(),
        Message::Text(t) => t.len(),
        _ => return,
    };
    state.metrics.message(protocol, Direction::Out, len);
}
