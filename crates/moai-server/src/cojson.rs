//! The CoJSON endpoint, `/sync`: the Jazz sync protocol for unmodified cojson clients.
//!
//! The relay logic lives in [`moai_cojson::service`]; this file authenticates, pumps text frames
//! (one JSON message or several joined by "\n" per frame), and keeps the connection alive the
//! way cojson clients expect: a `{"type":"ping",…}` right after accept and every 1.5 s (a
//! cojson client treats 10 s without any message as a dead server), plus a WebSocket ping every
//! `ping_interval` to find dead clients (closed after two unanswered).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use moai_cojson::service::{ping_frame, CojsonService, Outbound, PING_INTERVAL};
use tokio::time::{interval_at, Instant};

use crate::auth::token_from_request;
use crate::gate::error_response;
use crate::serve::ConnectionSlot;
use crate::ws::{
    accept_session, client_close, close, close_gracefully, close_too_big, is_too_big, send_with_deadline, SessionInfo,
    SessionLog, CLOSE_LINGER,
};
use crate::{AppState, Direction, Engines, Metrics, Protocol};

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

pub(crate) async fn socket(
    State(state): State<AppState>,
    Extension(engines): Extension<Arc<Engines>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    slot: Option<Extension<ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(cojson) = engines.cojson.clone() else {
        return error_response(StatusCode::NOT_FOUND, "The CoJSON engine is not enabled on this server");
    };
    let token = token_from_request(&headers, query.as_deref());
    let verdict = state.auth.check_now(token.as_deref(), None).map(|_| ()).map_err(|e| (e.close_code(), e.to_string()));
    let info = SessionInfo { protocol: Protocol::Cojson, target: "/sync".into(), peer: peer.map(|c| c.0 .0), slot: slot.map(|s| s.0) };
    accept_session(ws, state, info, verdict, move |socket, state, mut log| async move {
        run(socket, cojson, &state, &mut log).await
    })
}

async fn run(mut socket: WebSocket, cojson: CojsonService, state: &AppState, log: &mut SessionLog) {
    let metrics = &state.metrics;
    let write_timeout = state.heartbeat.write_timeout;
    let mut session = match cojson.connect().await {
        Ok(s) => s,
        Err(_) => {
            close_gracefully(&mut socket, close::TRY_AGAIN_LATER, "sync engine stopping", CLOSE_LINGER).await;
            log.set_close(close::TRY_AGAIN_LATER, "sync engine stopping");
            return;
        }
    };
    // cojson clients expect a ping first: it carries the server's clock and tells them the
    // connection is live.
    if !send(&mut socket, ping_frame(now().as_millis() as u64), write_timeout, metrics).await {
        log.set_close(1006, "write failed");
        session.leave().await;
        return;
    }
    let mut app_ping = interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let ping_every = state.heartbeat.ping_interval;
    let mut ws_ping = interval_at(Instant::now() + ping_every, ping_every);
    let mut unanswered = 0u32;
    let shutdown = state.shutdown.token().clone();

    let (code, reason): (u16, String) = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break (close::GOING_AWAY, "server shutting down".into()),
            out = session.outbound() => match out {
                Some(Outbound::Text(frame)) => {
                    if !send(&mut socket, frame, write_timeout, metrics).await {
                        break (1006, "write failed".into());
                    }
                }
                Some(Outbound::Close { code, reason }) => {
                    if code == close::TRY_AGAIN_LATER {
                        metrics.rejected("slow_consumer");
                    }
                    break (code, reason);
                }
                None => break (close::INTERNAL, "sync engine stopped".into()),
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    metrics.message(Protocol::Cojson, Direction::In, text.len());
                    match session.receive(text.as_str()).await {
                        Ok(received) => {
                            if received.dropped_frame || received.bad_messages > 0 {
                                metrics.rejected("malformed_cojson");
                                tracing::debug!(bad = received.bad_messages, dropped = received.dropped_frame, "malformed cojson input ignored");
                            }
                        }
                        Err(_) => break (close::INTERNAL, "sync engine stopped".into()),
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    metrics.unknown_message(Protocol::Cojson);
                }
                Some(Ok(Message::Pong(_))) => unanswered = 0,
                Some(Ok(Message::Ping(_))) => {}
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
                Some(Err(_)) | None => {
                    log.set_close(1006, "connection dropped");
                    session.leave().await;
                    return;
                }
            },
            _ = app_ping.tick() => {
                if !send(&mut socket, ping_frame(now().as_millis() as u64), write_timeout, metrics).await {
                    break (1006, "write failed".into());
                }
            }
            _ = ws_ping.tick() => {
                if unanswered >= 2 {
                    break (close::GOING_AWAY, "no pong to two pings".into());
                }
                unanswered += 1;
                if tokio::time::timeout(write_timeout, socket.send(Message::Ping(Bytes::new()))).await.map_or(true, |r| r.is_err()) {
                    break (1006, "write failed".into());
                }
            }
        }
    };
    session.leave().await;
    if code != 1006 {
        close_gracefully(&mut socket, code, &reason, CLOSE_LINGER).await;
    }
    log.set_close(code, reason);
}

async fn send(socket: &mut WebSocket, frame: String, timeout: Duration, metrics: &Metrics) -> bool {
    metrics.message(Protocol::Cojson, Direction::Out, frame.len());
    send_with_deadline(socket, Message::Text(frame.into()), timeout).await
}
