//! The CoJSON endpoint, `/sync`: the Jazz sync protocol for unmodified cojson clients.
//!
//! The relay logic lives in [`moai_cojson`]; this file authenticates (a scoped token
//! must name `cojson`), joins the relay (read-only when the token says so) and hands the socket
//! to the shared [`pump`]. Text frames carry one JSON message or several joined by "\n". cojson
//! clients expect a `{"type":"ping",…}` right after accept, and treat 10 s without any message
//! as a dead server, so an idle socket gets that ping after [`PING_INTERVAL`] without writes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use moai_cojson::{ping_frame, CojsonSession, Outbound as CojsonOutbound, PING_INTERVAL};

use crate::auth::Resource;
use crate::caller::{Admission, Caller};
use crate::http_error::error_response;
use crate::pump::{pump, Close, EngineSession, Inbound, Outbound, PumpSettings};
use crate::ws::{accept_session, close, close_gracefully, SessionInfo, CLOSE_LINGER};
use crate::{AppState, Metrics, Protocol};

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

pub(crate) async fn socket(State(state): State<AppState>, caller: Caller, ws: WebSocketUpgrade) -> Response {
    let Some(cojson) = caller.engines.cojson.clone() else {
        return error_response(StatusCode::NOT_FOUND, "The CoJSON engine is not enabled on this server");
    };
    let caller_protocol = caller.subprotocol("cojson");
    let Admission { verdict, grant, user_unit } = caller.admit(&state, Resource::Cojson);
    let info = SessionInfo {
        protocol: Protocol::Cojson,
        target: "/sync".into(),
        peer: caller.peer,
        slot: caller.slot,
        user_unit,
        max_frame_bytes: None,
    };
    let ws = match caller_protocol {
        Some(p) => ws.protocols([p]),
        None => ws,
    };
    accept_session(ws, state, info, verdict, move |mut socket, state, mut log| async move {
        let Ok(session) = cojson.connect_with(grant.read_only()).await else {
            close_gracefully(&mut socket, close::TRY_AGAIN_LATER, "sync engine stopping", CLOSE_LINGER).await;
            log.set_close(close::TRY_AGAIN_LATER, "sync engine stopping");
            return;
        };
        let edge = CojsonEdge { session, metrics: state.metrics.clone(), greeted: false };
        let settings = PumpSettings { protocol: Protocol::Cojson, expires_at: grant.expires_at() };
        pump(socket, edge, settings, &state, &mut log).await
    })
}

/// A CoJSON relay session as the pump drives it.
struct CojsonEdge {
    session: CojsonSession,
    metrics: Arc<Metrics>,
    /// The opening ping was handed out.
    greeted: bool,
}

fn map(out: Option<CojsonOutbound>) -> Outbound {
    match out {
        Some(CojsonOutbound::Text(frame)) => Outbound::Frame(Message::Text(frame.into())),
        Some(CojsonOutbound::Close { code, reason }) => Outbound::Close(Close::new(code, reason)),
        None => Outbound::Close(Close::new(close::INTERNAL, "sync engine stopped")),
    }
}

impl EngineSession for CojsonEdge {
    async fn outbound(&mut self) -> Outbound {
        // cojson clients expect a ping first: it carries the server's clock and tells them the
        // connection is live.
        if !self.greeted {
            self.greeted = true;
            return Outbound::Frame(Message::Text(ping_frame(now().as_millis() as u64).into()));
        }
        map(self.session.outbound().await)
    }

    fn try_outbound(&mut self) -> Option<Outbound> {
        self.session.try_outbound().map(|out| map(Some(out)))
    }

    async fn receive(&mut self, frame: Inbound) -> Result<(), Close> {
        let Inbound::Text(text) = frame else {
            self.metrics.unknown_message(Protocol::Cojson);
            return Ok(());
        };
        let received = self
            .session
            .receive(text.as_str())
            .await
            .map_err(|_| Close::new(close::INTERNAL, "sync engine stopped"))?;
        if received.dropped_frame || received.bad_messages > 0 {
            self.metrics.rejected("malformed_cojson");
            tracing::debug!(
                bad = received.bad_messages,
                dropped = received.dropped_frame,
                "malformed cojson input ignored"
            );
        }
        if received.read_only_dropped > 0 {
            self.metrics.rejected("read_only");
            tracing::debug!(dropped = received.read_only_dropped, "content from a read-only session dropped");
        }
        Ok(())
    }

    fn keepalive_frame(&self) -> Option<Message> {
        Some(Message::Text(ping_frame(now().as_millis() as u64).into()))
    }

    fn keepalive_after(&self) -> Option<Duration> {
        Some(PING_INTERVAL)
    }

    async fn leave(self) {
        self.session.leave().await
    }
}
