//! What every WebSocket session has in common, whatever its protocol: size limits on the
//! upgrade, the close codes moai uses, and a [`SessionLog`] that logs one line when a session
//! opens and one when it closes, keeps the connection gauges right, and holds the connection
//! slot until the session ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use std::future::Future;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;

use crate::quota::QuotaGuard;
use crate::serve::ConnectionSlot;
use crate::{Limits, Metrics, Protocol};

/// Close codes moai sends. 1xxx are RFC 6455; 44xx are application codes that y-websocket ≥ 3.1
/// treats as "do not reconnect" (docs/protocols/yjs.md §6).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The request named something invalid (a bad document id).
    pub const BAD_REQUEST: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const FORBIDDEN: u16 = 4403;
}

/// Read buffer of each WebSocket. tungstenite's default is 128 KiB, allocated and zero-filled
/// per socket, so every idle connection cost ~134 KiB of RSS (measured by the Yjs benchmark).
/// Sync messages are small; a large one is read in 1 KiB chunks at the cost of
/// more read calls (a 10 MB message is ~10 000 reads: milliseconds).
const READ_BUFFER_BYTES: usize = 1024;

/// Bytes of queued frames written per system call during a burst.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Applies moai's frame limit and buffer sizes to an upgrade.
pub fn limit_upgrade(ws: WebSocketUpgrade, limits: &Limits, max_frame_bytes: usize) -> WebSocketUpgrade {
    ws.max_message_size(max_frame_bytes)
        .max_frame_size(max_frame_bytes)
        .read_buffer_size(READ_BUFFER_BYTES)
        // Frames fed in a burst are written together, one system call per flush rather than
        // per frame (see `send_all_with_deadline`). The buffer only grows while used.
        .write_buffer_size(WRITE_BUFFER_BYTES)
        // Bounds what a client that stopped reading can make us hold (writes also time out).
        // tungstenite panics unless this exceeds write_buffer_size, hence the floor.
        .max_write_buffer_size(
            limits
                .max_frame_bytes
                .max(max_frame_bytes)
                .saturating_mul(2)
                .max(WRITE_BUFFER_BYTES * 2)
                .saturating_add(READ_BUFFER_BYTES),
        )
}

/// A close frame with a code and a reason (truncated to the 123 bytes a close frame allows).
pub fn close_message(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame { code, reason: reason[..end].into() }))
}

/// Closes a WebSocket properly: sends the close frame, then reads until the client answers
/// with its own close (or `linger` passes). Dropping the TCP socket right after the close frame
/// while the client's frames are still unread makes the kernel send a reset, and the client
/// then loses the close frame and sees 1006 instead of our code (which would, for example,
/// make y-websocket retry a 4401 forever).
pub async fn close_gracefully(
    socket: &mut axum::extract::ws::WebSocket,
    code: u16,
    reason: &str,
    linger: std::time::Duration,
) {
    let deadline = tokio::time::Instant::now() + linger;
    if tokio::time::timeout_at(deadline, socket.send(close_message(code, reason))).await.is_err() {
        return;
    }
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, socket.recv()).await {
        if matches!(msg, Message::Close(_)) {
            break;
        }
    }
}

/// Closes a WebSocket whose input can no longer be read (after a frame over the size limit the
/// stream is unusable): send the close frame, then keep the socket open for `linger` before
/// dropping it. Dropping at once, with the client's oversized payload still unread, makes the
/// kernel answer with a reset that can overtake our close frame, and the client would see 1006
/// instead of 1009.
pub async fn close_after_read_error(
    socket: &mut axum::extract::ws::WebSocket,
    code: u16,
    reason: &str,
    linger: std::time::Duration,
) {
    if tokio::time::timeout(linger, socket.send(close_message(code, reason))).await.is_ok() {
        tokio::time::sleep(linger).await;
    }
}

/// Writes one message, giving up after `timeout`. Most writes complete on the first poll (the
/// kernel buffer has room); only those that do not pay for a timer, which keeps a timer
/// insert-and-cancel off the path of every delivered message.
pub async fn send_with_deadline(
    socket: &mut axum::extract::ws::WebSocket,
    msg: Message,
    timeout: std::time::Duration,
) -> bool {
    let mut write = std::pin::pin!(socket.send(msg));
    match futures_util::poll!(write.as_mut()) {
        std::task::Poll::Ready(result) => result.is_ok(),
        std::task::Poll::Pending => matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(()))),
    }
}

/// Writes several messages with one flush (so a burst costs one system call per ~64 KiB, not
/// one per frame), giving up after `timeout` like [`send_with_deadline`].
pub async fn send_all_with_deadline(
    socket: &mut axum::extract::ws::WebSocket,
    msgs: Vec<Message>,
    timeout: std::time::Duration,
) -> bool {
    use futures_util::SinkExt;
    let mut write = std::pin::pin!(async {
        for msg in msgs {
            socket.feed(msg).await?;
        }
        socket.flush().await
    });
    match futures_util::poll!(write.as_mut()) {
        std::task::Poll::Ready(result) => result.is_ok(),
        std::task::Poll::Pending => matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(()))),
    }
}

/// The code and reason of a close frame the client sent, for the session log (1005 when the
/// frame carried no code).
pub fn client_close(frame: Option<CloseFrame>) -> (u16, String) {
    let (code, reason) = frame.map(|f| (f.code, f.reason.to_string())).unwrap_or((1005, String::new()));
    (code, format!("client closed: {reason}"))
}

/// Answers a frame over the size limit: counted, closed with 1009, logged. The caller has
/// already left its document/relay, so nothing from this socket is processed any more.
pub async fn close_too_big(socket: &mut WebSocket, state: &crate::AppState, log: &mut SessionLog) {
    state.metrics.rejected("frame_too_big");
    let reason = format!("message larger than {} bytes", state.limits.max_frame_bytes);
    close_after_read_error(socket, close::TOO_BIG, &reason, std::time::Duration::from_millis(500)).await;
    log.set_close(close::TOO_BIG, reason);
}

/// Whether a receive error means the peer sent a message over the size limit (close 1009) rather
/// than a broken connection.
pub fn is_too_big(err: &axum::Error) -> bool {
    let text = err.to_string();
    // tungstenite's CapacityError: "Space limit exceeded: Message too long: N > M".
    text.contains("Message too long") || text.contains("Space limit exceeded")
}

/// How long a closing socket waits for the client's close frame.
pub const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Who a new session is: for its log lines and metrics.
pub struct SessionInfo {
    pub protocol: Protocol,
    pub target: String,
    pub peer: Option<SocketAddr>,
    pub slot: Option<ConnectionSlot>,
    /// The session's unit of the per-user quota, held until it ends.
    pub user_unit: Option<QuotaGuard>,
    /// A lower frame limit than `--max-frame-bytes` for an endpoint whose clients only send
    /// small messages (the change feed).
    pub max_frame_bytes: Option<usize>,
}

/// What every WebSocket endpoint does once it has decided: upgrade (with moai's limits), open
/// the session log, then either refuse with the verdict's close code (auth, bad document id:
/// decided before the upgrade, told after it, because a 44xx close stops client retries where an
/// HTTP status would not) or hand the socket to `run`. The session is tracked, so shutdown
/// waits for it.
pub fn accept_session<F, Fut>(
    ws: WebSocketUpgrade,
    state: crate::AppState,
    info: SessionInfo,
    verdict: Result<(), (u16, String)>,
    run: F,
) -> Response
where
    F: FnOnce(WebSocket, crate::AppState, SessionLog) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tracker = state.shutdown.clone();
    let protocol = info.protocol;
    let max_frame_bytes =
        info.max_frame_bytes.map_or(state.limits.max_frame_bytes, |m| m.min(state.limits.max_frame_bytes));
    limit_upgrade(ws, &state.limits, max_frame_bytes)
        .on_failed_upgrade(move |e| tracing::info!(?protocol, error = %e, "upgrade failed"))
        .on_upgrade(move |mut socket| {
            tracker.track(async move {
                let mut log = SessionLog::open(info.protocol, info.peer, info.target, state.metrics.clone(), info.slot);
                log.hold(info.user_unit);
                match verdict {
                    Err((code, reason)) => {
                        tracing::info!(?protocol, peer = ?info.peer, code, %reason, "connection refused");
                        state.metrics.rejected(if code == close::BAD_REQUEST { "bad_request" } else { "auth" });
                        close_gracefully(&mut socket, code, &reason, CLOSE_LINGER).await;
                        log.set_close(code, reason);
                    }
                    Ok(()) => run(socket, state, log).await,
                }
            })
        })
}

/// Logs and counts one session from open to close.
pub struct SessionLog {
    protocol: Protocol,
    peer: Option<SocketAddr>,
    target: String,
    opened: Instant,
    metrics: Arc<Metrics>,
    _slot: Option<ConnectionSlot>,
    _user_unit: Option<QuotaGuard>,
    close: Option<(u16, String)>,
}

impl SessionLog {
    pub fn open(
        protocol: Protocol,
        peer: Option<SocketAddr>,
        target: impl Into<String>,
        metrics: Arc<Metrics>,
        slot: Option<ConnectionSlot>,
    ) -> Self {
        let target = target.into();
        metrics.connection_opened(protocol);
        // `resource`, not `target`: JSON logs already have a `target` key (the module).
        tracing::info!(?protocol, peer = ?peer, resource = %target, "session open");
        Self { protocol, peer, target, opened: Instant::now(), metrics, _slot: slot, _user_unit: None, close: None }
    }

    /// Keeps the session's per-user quota unit until the session ends.
    pub(crate) fn hold(&mut self, unit: Option<QuotaGuard>) {
        self._user_unit = unit;
    }

    /// Records why the session ended, for the close log line.
    pub fn set_close(&mut self, code: u16, reason: impl Into<String>) {
        self.close = Some((code, reason.into()));
    }
}

impl Drop for SessionLog {
    fn drop(&mut self) {
        self.metrics.connection_closed(self.protocol);
        let (code, reason) = self.close.clone().unwrap_or((1006, "connection dropped".into()));
        tracing::info!(
            protocol = ?self.protocol,
            peer = ?self.peer,
            resource = %self.target,
            code,
            %reason,
            duration_ms = self.opened.elapsed().as_millis() as u64,
            "session closed"
        );
    }
}
