//! The Postgres change feed endpoint, `/api/sync`: JSON text frames between a WebSocket and
//! [`moai_pgsync::PgSync::run_session`]. The engine owns the protocol (hello, snapshot,
//! changes, acks); this file only authenticates, pumps frames and closes with the right code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use moai_pgsync::{Access, PgSync, SessionEnd};
use tokio::sync::mpsc;

use crate::auth::token_from_request;
use crate::gate::error_response;
use crate::serve::ConnectionSlot;
use crate::ws::{
    accept_session, close, close_after_read_error, close_gracefully, is_too_big, SessionInfo, SessionLog, CLOSE_LINGER,
};
use crate::{AppState, Direction, Engines, Protocol};

/// Frames buffered each way between the socket and the session.
const QUEUE: usize = 256;

pub(crate) async fn socket(
    State(state): State<AppState>,
    Extension(engines): Extension<Arc<Engines>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    slot: Option<Extension<ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(pg) = engines.pgsync.clone() else {
        return error_response(
            StatusCode::NOT_FOUND,
            "The Postgres change feed is not enabled on this server: start moai with --pg-url and --pg-tables",
        );
    };
    let token = token_from_request(&headers, query.as_deref());
    let verdict = state.auth.check_now(token.as_deref(), None).map_err(|e| (e.close_code(), e.to_string()));
    // A token that names tables opens only those (and only their rows it allows).
    let access = match &verdict {
        Ok(Some(claims)) => claims.tables.clone().map_or_else(Access::all, Access::tables),
        _ => Access::all(),
    };
    let verdict = verdict.map(|_| ());
    let info = SessionInfo { protocol: Protocol::Pgsync, target: "/api/sync".into(), peer: peer.map(|c| c.0 .0), slot: slot.map(|s| s.0) };
    accept_session(ws, state, info, verdict, move |socket, state, mut log| async move {
        run(socket, pg, access, &state, &mut log).await
    })
}

async fn run(mut socket: WebSocket, pg: PgSync, access: Access, state: &AppState, log: &mut SessionLog) {
    let metrics = &state.metrics;
    let (in_tx, in_rx) = mpsc::channel::<String>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<String>(QUEUE);
    let mut in_tx = Some(in_tx);
    let session = pg.run_session(in_rx, out_tx, access, state.shutdown.token().clone().cancelled_owned());
    tokio::pin!(session);

    let end = loop {
        tokio::select! {
            end = &mut session => break end,
            Some(frame) = out_rx.recv() => {
                metrics.message(Protocol::Pgsync, Direction::Out, frame.len());
                if socket.send(Message::Text(frame.into())).await.is_err() {
                    in_tx = None; // the session sees the client gone
                }
            }
            incoming = socket.recv(), if in_tx.is_some() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    metrics.message(Protocol::Pgsync, Direction::In, text.len());
                    if let Some(tx) = &in_tx {
                        if tx.send(text.to_string()).await.is_err() {
                            in_tx = None;
                        }
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    close_gracefully(&mut socket, close::INVALID_DATA, "the change feed speaks JSON text frames", CLOSE_LINGER).await;
                    log.set_close(close::INVALID_DATA, "binary frame");
                    return;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(e)) if is_too_big(&e) => {
                    metrics.rejected("frame_too_big");
                    close_after_read_error(&mut socket, close::TOO_BIG, "message too large", Duration::from_millis(500)).await;
                    log.set_close(close::TOO_BIG, "message too large");
                    return;
                }
                // Closed by the client or dropped: end the session by closing its input.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => in_tx = None,
            },
        }
    };
    // Whatever the session queued before it ended (an error, must_refetch) goes out first.
    while let Ok(frame) = out_rx.try_recv() {
        metrics.message(Protocol::Pgsync, Direction::Out, frame.len());
        if socket.send(Message::Text(frame.into())).await.is_err() {
            break;
        }
    }
    let (code, reason) = match end {
        SessionEnd::ClientClosed => (close::NORMAL, "client closed".to_owned()),
        SessionEnd::Cancelled => (close::GOING_AWAY, "server shutting down".to_owned()),
        SessionEnd::Closed => (close::NORMAL, "session ended; see the last message".to_owned()),
        SessionEnd::Failed(reason) => {
            tracing::error!(error = %reason, "pgsync session failed");
            (close::INTERNAL, reason)
        }
    };
    close_gracefully(&mut socket, code, &reason, CLOSE_LINGER).await;
    log.set_close(code, reason);
}
