//! The Yjs endpoints: the y-websocket protocol at `/sync/v1/{docId}` and the document HTTP API
//! at `/api/v1/docs/{docId}/update` (GET: the state as a v1 update; POST: apply one).
//!
//! This is the socket half of the engine. It authenticates, joins the document through
//! [`moai_yjs::service::YjsService`] (read-only when the token says so), and hands the socket
//! to the shared [`pump`], with the 3-byte empty awareness frame as the keepalive for sockets
//! idle for `idle_keepalive` (browser clients cannot see pings and drop a socket that has been
//! silent for 30 s).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use moai_yjs::service::{Outbound as YjsOutbound, ServiceError, YjsService, YjsSession};
use moai_yjs::{Access, KEEPALIVE_FRAME};

use crate::auth::{AuthError, Resource};
use crate::caller::{Admission, Caller};
use crate::http_error::error_response;
use crate::pump::{pump, Close, EngineSession, Inbound, Outbound, PumpSettings};
use crate::ws::{accept_session, close, close_gracefully, SessionInfo, CLOSE_LINGER};
use crate::{AppState, Engines, Metrics, Protocol};
use std::sync::Arc;

/// Document ids come from URLs: bounded, and free of control characters so they are safe in
/// logs and storage keys.
pub(crate) fn valid_doc_id(doc: &str) -> bool {
    !doc.is_empty() && doc.len() <= 512 && !doc.chars().any(char::is_control)
}

fn engine(engines: &Engines) -> Option<YjsService> {
    engines.yjs.clone()
}

pub(crate) async fn socket(
    State(state): State<AppState>,
    Path(doc): Path<String>,
    caller: Caller,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(yjs) = engine(&caller.engines) else {
        return error_response(StatusCode::NOT_FOUND, "The Yjs engine is not enabled on this server");
    };
    let Admission { verdict, grant, user_unit } = if valid_doc_id(&doc) {
        caller.admit(&state, Resource::YjsDoc(&doc))
    } else {
        Admission {
            verdict: Err((close::BAD_REQUEST, "invalid document id".to_owned())),
            grant: Default::default(),
            user_unit: None,
        }
    };
    let protocol = caller.subprotocol("yjs");
    let info = SessionInfo {
        protocol: Protocol::Yjs,
        target: doc.clone(),
        peer: caller.peer,
        slot: caller.slot,
        user_unit,
        max_frame_bytes: None,
    };
    // Browsers carry the token as a `bearer.…` subprotocol next to `yjs`; selecting `yjs`
    // completes their handshake without echoing the token.
    let ws = match protocol {
        Some(p) => ws.protocols([p]),
        None => ws,
    };
    accept_session(ws, state, info, verdict, move |mut socket, state, mut log| async move {
        let access = if grant.read_only() { Access::ReadOnly } else { Access::ReadWrite };
        let session = match yjs.join_as(&doc, access).await {
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
        let edge = YjsEdge { session, metrics: state.metrics.clone(), keepalive: state.heartbeat.idle_keepalive };
        let settings = PumpSettings { protocol: Protocol::Yjs, expires_at: grant.expires_at() };
        pump(socket, edge, settings, &state, &mut log).await
    })
}

/// A Yjs document session as the pump drives it.
struct YjsEdge {
    session: YjsSession,
    metrics: Arc<Metrics>,
    keepalive: Duration,
}

impl YjsEdge {
    fn map(&self, out: Option<YjsOutbound>) -> Outbound {
        match out {
            Some(YjsOutbound::Frame(frame)) => Outbound::Frame(Message::Binary(frame)),
            Some(YjsOutbound::Close { code, reason }) => Outbound::Close(Close::new(code, reason)),
            None if self.session.was_too_slow() => {
                Outbound::Close(Close::new(close::TRY_AGAIN_LATER, "client too slow; reconnect to resync"))
            }
            None => Outbound::Close(Close::new(close::INTERNAL, "document closed")),
        }
    }
}

impl EngineSession for YjsEdge {
    async fn outbound(&mut self) -> Outbound {
        let out = self.session.outbound().await;
        self.map(out)
    }

    fn try_outbound(&mut self) -> Option<Outbound> {
        self.session.try_outbound().map(|out| self.map(Some(out)))
    }

    async fn receive(&mut self, frame: Inbound) -> Result<(), Close> {
        let Inbound::Binary(frame) = frame else {
            return Err(Close::new(close::INVALID_DATA, "y-websocket messages are binary frames"));
        };
        if frame.first().is_some_and(|t| *t > 3) {
            self.metrics.unknown_message(Protocol::Yjs);
        }
        if self.session.receive(frame).await {
            Ok(())
        } else {
            Err(Close::new(close::INTERNAL, "document closed"))
        }
    }

    fn keepalive_frame(&self) -> Option<Message> {
        Some(Message::Binary(Bytes::from_static(&KEEPALIVE_FRAME)))
    }

    fn keepalive_after(&self) -> Option<Duration> {
        Some(self.keepalive)
    }

    async fn leave(self) {
        self.session.leave().await
    }
}

/// Authorises an HTTP API request for `doc` and returns the engine, or the response saying why not.
#[allow(clippy::result_large_err)] // the error is the response itself, built once per refusal
fn authorise_http(state: &AppState, caller: &Caller, doc: &str, write: bool) -> Result<YjsService, Response> {
    let Some(yjs) = engine(&caller.engines) else {
        return Err(error_response(StatusCode::NOT_FOUND, "The Yjs engine is not enabled on this server"));
    };
    if !valid_doc_id(doc) {
        return Err(error_response(StatusCode::BAD_REQUEST, "invalid document id"));
    }
    let checked = caller.authorise(state, Resource::YjsDoc(doc)).and_then(|grant| {
        if write && grant.read_only() {
            Err(AuthError::ReadOnly)
        } else {
            Ok(yjs)
        }
    });
    checked.map_err(|e| {
        state.metrics.rejected(if e == AuthError::ReadOnly { "read_only" } else { "auth" });
        error_response(e.http_status(), &e.to_string())
    })
}

fn service_error(e: ServiceError) -> Response {
    match e {
        ServiceError::InvalidUpdate(reason) => {
            error_response(StatusCode::BAD_REQUEST, &format!("invalid update: {reason}"))
        }
        e @ ServiceError::MissingDependencies => error_response(StatusCode::CONFLICT, &e.to_string()),
        other => {
            tracing::error!(error = %other, "yjs http request failed");
            error_response(StatusCode::SERVICE_UNAVAILABLE, &other.to_string())
        }
    }
}

pub(crate) async fn get_update(State(state): State<AppState>, Path(doc): Path<String>, caller: Caller) -> Response {
    let yjs = match authorise_http(&state, &caller, &doc, false) {
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
    Path(doc): Path<String>,
    caller: Caller,
    body: Bytes,
) -> Response {
    let yjs = match authorise_http(&state, &caller, &doc, true) {
        Ok(yjs) => yjs,
        Err(resp) => return resp,
    };
    match yjs.apply_update(&doc, body.to_vec()).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => service_error(e),
    }
}
