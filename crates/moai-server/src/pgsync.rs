//! The Postgres change feed endpoint, `/api/sync`: JSON text frames between a WebSocket and
//! [`moai_pgsync::PgSync::run_session`]. The engine owns the protocol (hello, snapshot,
//! changes, acks); this file authenticates (a scoped token must name `tables`), runs the
//! session on a task of its own and hands the socket to the shared [`pump`], which gives it the
//! same pings, write deadline and limits as every other endpoint. A client that stops reading
//! is closed at the write deadline, which ends the session and releases any snapshot it held.

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use moai_pgsync::{Access, PgSync, SessionEnd};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::auth::Resource;
use crate::caller::{Admission, Caller};
use crate::http_error::error_response;
use crate::pump::{pump, Close, EngineSession, Inbound, Outbound, PumpSettings};
use crate::ws::{accept_session, close, SessionInfo};
use crate::{AppState, Protocol};

/// Frames buffered each way between the socket and the session. Few: the pump drains the
/// outbound side as fast as the socket takes it, and a client's messages are small, so this
/// bounds what one session holds to 8 inbound frames of at most [`MAX_CLIENT_FRAME_BYTES`] and
/// 8 outbound batches.
const QUEUE: usize = 8;

/// Largest message a change-feed client may send: a hello with its shapes (at most 100) fits
/// many times over. Larger closes with 1009.
const MAX_CLIENT_FRAME_BYTES: usize = 1 << 20;

pub(crate) async fn socket(State(state): State<AppState>, caller: Caller, ws: WebSocketUpgrade) -> Response {
    let Some(pg) = caller.engines.pgsync.clone() else {
        return error_response(
            StatusCode::NOT_FOUND,
            "The Postgres change feed is not enabled on this server: start moai with --pg-url and --pg-tables",
        );
    };
    let caller_protocol = caller.subprotocol("moai-sync");
    let Admission { verdict, grant, user_unit } = caller.admit(&state, Resource::ChangeFeed);
    // A token that names tables opens only those (and only their rows it allows).
    let access = grant.tables().cloned().map_or_else(Access::all, Access::tables);
    let info = SessionInfo {
        protocol: Protocol::Pgsync,
        target: "/api/sync".into(),
        peer: caller.peer,
        slot: caller.slot,
        user_unit,
        max_frame_bytes: Some(MAX_CLIENT_FRAME_BYTES),
    };
    let ws = match caller_protocol {
        Some(p) => ws.protocols([p]),
        None => ws,
    };
    accept_session(ws, state, info, verdict, move |socket, state, mut log| async move {
        let edge = PgsyncEdge::start(pg, access, grant.subject().map(str::to_owned), &state);
        let settings = PumpSettings { protocol: Protocol::Pgsync, expires_at: grant.expires_at() };
        pump(socket, edge, settings, &state, &mut log).await
    })
}

/// A change-feed session running on its own task, as the pump drives it.
struct PgsyncEdge {
    /// None once the client has gone: the session sees its input end.
    inbound: Option<mpsc::Sender<String>>,
    outbound: mpsc::Receiver<String>,
    task: Option<JoinHandle<SessionEnd>>,
}

impl PgsyncEdge {
    fn start(pg: PgSync, access: Access, subject: Option<String>, state: &AppState) -> Self {
        let (in_tx, in_rx) = mpsc::channel::<String>(QUEUE);
        let (out_tx, out_rx) = mpsc::channel::<String>(QUEUE);
        let cancel = state.shutdown.token().clone().cancelled_owned();
        let task = tokio::spawn(async move { pg.run_session(in_rx, out_tx, access, subject, cancel).await });
        Self { inbound: Some(in_tx), outbound: out_rx, task: Some(task) }
    }

    /// The close that tells the client how the session ended.
    async fn ended(&mut self) -> Close {
        let end = match self.task.take() {
            Some(task) => task.await,
            None => return Close::new(close::INTERNAL, "session already ended"),
        };
        match end {
            Ok(SessionEnd::ClientClosed) => Close::new(close::NORMAL, "client closed"),
            Ok(SessionEnd::Cancelled) => Close::new(close::GOING_AWAY, "server shutting down"),
            Ok(SessionEnd::Closed) => Close::new(close::NORMAL, "session ended; see the last message"),
            Ok(SessionEnd::Failed(failure)) => {
                tracing::error!(error = %failure, "pgsync session failed");
                Close::new(close::INTERNAL, failure.to_string())
            }
            Err(e) => {
                tracing::error!(error = %e, "pgsync session task failed");
                Close::new(close::INTERNAL, "session task failed")
            }
        }
    }
}

impl EngineSession for PgsyncEdge {
    async fn outbound(&mut self) -> Outbound {
        // Whatever the session queued before it ended (an error, must_refetch) goes out first:
        // the channel yields it before it reports closed.
        match self.outbound.recv().await {
            Some(frame) => Outbound::Frame(Message::Text(frame.into())),
            None => Outbound::Close(self.ended().await),
        }
    }

    fn try_outbound(&mut self) -> Option<Outbound> {
        self.outbound.try_recv().ok().map(|frame| Outbound::Frame(Message::Text(frame.into())))
    }

    async fn receive(&mut self, frame: Inbound) -> Result<(), Close> {
        let Inbound::Text(text) = frame else {
            return Err(Close::new(close::INVALID_DATA, "the change feed speaks JSON text frames"));
        };
        if let Some(tx) = &self.inbound {
            if tx.send(text.to_string()).await.is_err() {
                // The session has ended; its close comes out of `outbound`.
                self.inbound = None;
            }
        }
        Ok(())
    }

    async fn leave(mut self) {
        // The session sees its input end and finishes (registering the client's last position).
        self.inbound = None;
        // Its frames have nowhere to go any more; a session blocked on sending one ends too.
        self.outbound.close();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for PgsyncEdge {
    fn drop(&mut self) {
        // A session whose socket went away without leave (a cancelled connection task) must not
        // keep running, holding a snapshot or a connection.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
