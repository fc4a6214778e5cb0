//! The Yjs endpoints: the y-websocket protocol at `/sync/v1/{docId}` and the document HTTP API
//! at `/api/v1/docs/{docId}/update` (GET: the state as a v1 update; POST: apply one).
//!
//! This is the socket half of the engine. It authenticates, joins the document through
//! [`moai_yjs::service::YjsService`], and then pumps frames both ways while keeping the socket
//! alive: a WebSocket ping every `ping_interval` (closing after two unanswered), and the 3-byte
//! empty awareness frame after `idle_keepalive` without any outbound data, because browser
//! clients cannot see pings and drop a socket that has been silent for 30 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use moai_yjs::service::{Outbound, ServiceError, YjsService};
use moai_yjs::KEEPALIVE_FRAME;
use tokio::time::{interval_at, Instant};

use crate::auth::token_from_request;
use crate::gate::error_response;
use crate::serve::ConnectionSlot;
use crate::ws::{
    accept_session, client_close, close, close_gracefully, close_too_big, is_too_big, send_all_with_deadline,
    send_with_deadline, SessionInfo, SessionLog, CLOSE_LINGER,
};
use crate::{AppState, Direction, Engines, Metrics, Protocol};

/// Most queued frames written with one flush; bounds how long one socket's burst can delay its
/// other duties (pings, reads).
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// Heartbeat timings of Yjs sockets.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub ping_interval: Duration,
    pub idle_keepalive: Duration,
    /// How long one write to a socket may take before the socket counts as dead.
    pub write_timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            idle_keepalive: Duration::from_secs(15),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Document ids come from URLs: bounded, and free of control characters so they are safe in
/// logs and storage keys.
fn valid_doc_id(doc: &str) -> bool {
    !doc.is_empty() && doc.len() <= 512 && !doc.chars().any(char::is_control)
}

fn engine(engines: &Engines) -> Option<YjsService> {
    engines.yjs.clone()
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn socket(
    State(state): State<AppState>,
    Extension(engines): Extension<Arc<Engines>>,
    Path(doc): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    slot: Option<Extension<ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(yjs) = engine(&engines) else {
        return error_response(StatusCode::NOT_FOUND, "The Yjs engine is not enabled on this server");
    };
    let verdict = if !valid_doc_id(&doc) {
        Err((4400, "invalid document id".to_owned()))
    } else {
        let token = token_from_request(&headers, query.as_deref());
        state.auth.check_now(token.as_deref(), Some(&doc)).map(|_| ()).map_err(|e| (e.close_code(), e.to_string()))
    };
    let info = SessionInfo { protocol: Protocol::Yjs, target: doc.clone(), peer: peer.map(|c| c.0 .0), slot: slot.map(|s| s.0) };
    // Browsers carry the token as a `bearer.…` subprotocol next to `yjs`; selecting `yjs`
    // completes their handshake without echoing the token.
    accept_session(ws.protocols(["yjs"]), state, info, verdict, move |socket, state, mut log| async move {
        run(socket, yjs, &doc, &state, &mut log).await
    })
}

/// Pumps one socket until either side closes, the document drops it, or shutdown begins.
async fn run(mut socket: WebSocket, yjs: YjsService, doc: &str, state: &AppState, log: &mut SessionLog) {
    let metrics = &state.metrics;
    let hb = &state.heartbeat;
    let mut session = match yjs.join(doc).await {
        Ok(session) => session,
        Err(e) => {
            tracing::error!(doc, error = %e, "cannot serve document");
            let reason = match e {
                ServiceError::LoadFailed(_) => "document could not be loaded",
                _ => "document unavailable",
            };
            close_gracefully(&mut socket, close::INTERNAL, reason, CLOSE_LINGER).await;
            log.set_close(close::INTERNAL, reason);
            return;
        }
    };

    let mut ping = interval_at(Instant::now() + hb.ping_interval, hb.ping_interval);
    let mut unanswered_pings = 0u32;
    // The keepalive timer is armed once and re-armed only when it fires: sends just record
    // when they happened, so no timer is touched per message.
    let mut last_sent = Instant::now();
    let keepalive = tokio::time::sleep(hb.idle_keepalive);
    tokio::pin!(keepalive);
    let shutdown = state.shutdown.token().clone();

    let (code, reason): (u16, String) = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break (close::GOING_AWAY, "server shutting down".into()),
            out = session.outbound() => match out {
                Some(Outbound::Frame(frame)) => {
                    // Take whatever else is already queued and write it with one flush.
                    let mut frames = vec![frame];
                    let mut then = None;
                    while frames.len() < MAX_FRAMES_PER_FLUSH {
                        match session.try_outbound() {
                            Some(Outbound::Frame(f)) => frames.push(f),
                            Some(Outbound::Close { code, reason }) => {
                                then = Some((code, reason));
                                break;
                            }
                            None => break,
                        }
                    }
                    for f in &frames {
                        metrics.message(Protocol::Yjs, Direction::Out, f.len());
                    }
                    let msgs = frames.into_iter().map(Message::Binary).collect();
                    if !send_all_with_deadline(&mut socket, msgs, hb.write_timeout).await {
                        break (1006, "write failed".into());
                    }
                    last_sent = Instant::now();
                    if let Some(close) = then {
                        break close;
                    }
                }
                Some(Outbound::Close { code, reason }) => break (code, reason),
                None if session.was_too_slow() => {
                    metrics.rejected("slow_consumer");
                    break (close::TRY_AGAIN_LATER, "client too slow; reconnect to resync".into());
                }
                None => break (close::INTERNAL, "document closed".into()),
            },
            incoming = socket.recv() => match incoming {
                None => { log.set_close(1006, "connection dropped"); session.leave().await; return; }
                Some(Ok(Message::Binary(frame))) => {
                    metrics.message(Protocol::Yjs, Direction::In, frame.len());
                    if frame.first().is_some_and(|t| *t > 3) {
                        metrics.unknown_message(Protocol::Yjs);
                    }
                    if !session.receive(frame).await {
                        break (close::INTERNAL, "document closed".into());
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    break (close::INVALID_DATA, "y-websocket messages are binary frames".into())
                }
                Some(Ok(Message::Pong(_))) => unanswered_pings = 0,
                Some(Ok(Message::Ping(_))) => {} // answered by the WebSocket layer
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
            },
            _ = ping.tick() => {
                if unanswered_pings >= 2 {
                    break (close::GOING_AWAY, "no pong to two pings".into());
                }
                unanswered_pings += 1;
                if !send(&mut socket, Message::Ping(Bytes::new()), hb.write_timeout, metrics).await {
                    break (1006, "write failed".into());
                }
            }
            _ = &mut keepalive => {
                let due = last_sent + hb.idle_keepalive;
                if Instant::now() >= due {
                    if !send(&mut socket, Message::Binary(Bytes::from_static(&KEEPALIVE_FRAME)), hb.write_timeout, metrics).await {
                        break (1006, "write failed".into());
                    }
                    last_sent = Instant::now();
                }
                keepalive.as_mut().reset(last_sent + hb.idle_keepalive);
            }
        }
    };
    session.leave().await;
    if code != 1006 {
        close_gracefully(&mut socket, code, &reason, CLOSE_LINGER).await;
    }
    log.set_close(code, reason);
}

async fn send(socket: &mut WebSocket, msg: Message, timeout: Duration, metrics: &Metrics) -> bool {
    if let Message::Binary(b) = &msg {
        metrics.message(Protocol::Yjs, Direction::Out, b.len());
    }
    send_with_deadline(socket, msg, timeout).await
}

/// Authorises an HTTP API request for `doc` and returns the engine, or the response saying why not.
fn authorise_http(
    state: &AppState,
    engines: &Engines,
    headers: &HeaderMap,
    query: Option<&str>,
    doc: &str,
) -> Result<YjsService, Response> {
    let Some(yjs) = engine(engines) else {
        return Err(error_response(StatusCode::NOT_FOUND, "The Yjs engine is not enabled on this server"));
    };
    if !valid_doc_id(doc) {
        return Err(error_response(StatusCode::BAD_REQUEST, "invalid document id"));
    }
    let token = token_from_request(headers, query);
    state.auth.check_now(token.as_deref(), Some(doc)).map(|_| yjs).map_err(|e| {
        state.metrics.rejected("auth");
        error_response(e.http_status(), &e.to_string())
    })
}

fn service_error(e: ServiceError) -> Response {
    match e {
        ServiceError::InvalidUpdate(reason) => error_response(StatusCode::BAD_REQUEST, &format!("invalid update: {reason}")),
        other => {
            tracing::error!(error = %other, "yjs http request failed");
            error_response(StatusCode::SERVICE_UNAVAILABLE, &other.to_string())
        }
    }
}

pub(crate) async fn get_update(
    State(state): State<AppState>,
    Extension(engines): Extension<Arc<Engines>>,
    Path(doc): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let yjs = match authorise_http(&state, &engines, &headers, query.as_deref(), &doc) {
        Ok(yjs) => yjs,
        Err(resp) => return resp,
    };
    match yjs.read_state(&doc).await {
        Ok(update) => ([(header::CONTENT_TYPE, "application/octet-stream")], update).into_response(),
        Err(e) => service_error(e),
    }
}

pub(crate) async fn post_update(
    State(state): State<AppState>,
    Extension(engines): Extension<Arc<Engines>>,
    Path(doc): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let yjs = match authorise_http(&state, &engines, &headers, query.as_deref(), &doc) {
        Ok(yjs) => yjs,
        Err(resp) => return resp,
    };
    match yjs.apply_update(&doc, body.to_vec()).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => service_error(e),
    }
}
