//! The Hocuspocus endpoint `/hocuspocus`: unmodified `@hocuspocus/provider` clients (3.x and 4.x)
//! on the Yjs engine (docs/protocols/hocuspocus.md).
//!
//! One socket carries several documents, each named by the address every frame starts with.
//! Each document is its own session of the same [`YjsService`] document a y-websocket client
//! joins ([`Dialect::Hocuspocus`]), so both kinds of client share edits and presence. This file
//! does what the room does not: it authenticates each document with the token of its Auth
//! message (the same tokens and checks as `/sync/v1/{doc}`; a refusal is the provider's
//! authentication-failed message, never a close, because the provider reconnects after every
//! close), joins the document without holding up the socket's others, puts the address in front
//! of every frame the room sends, ends a document when its token expires (after asking the
//! provider for a fresh token), and keeps the socket in the shared [`pump`].
//!
//! Bounds: [`MAX_DOCUMENTS`] addresses per socket, [`MAX_QUEUED_FRAMES`] / [`MAX_QUEUED_BYTES`]
//! of frames waiting for a token or a document load, and per document the y-websocket path's
//! outbound queue (a full one closes the socket with 1013; the provider resyncs on reconnect).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, SelectAll, Stream, StreamExt};
use futures_util::FutureExt;
use moai_yjs::hocuspocus::{self as wire, ClientFrame, ClientMessage};
use moai_yjs::service::{Outbound as YjsOutbound, ServiceError, YjsInlet, YjsService, YjsSession};
use moai_yjs::{Access, Dialect, KEEPALIVE_FRAME};
use tokio::time::Instant;

use crate::auth::{AuthError, Resource};
use crate::caller::Caller;
use crate::http_error::error_response;
use crate::pump::{pump, Close, EngineSession, Inbound, Outbound, PumpSettings};
use crate::quota::QuotaGuard;
use crate::ws::{accept_session, close, SessionInfo};
use crate::yjs::valid_doc_id;
use crate::{AppState, Protocol};

/// Documents (addresses) one socket may name, open or refused.
pub const MAX_DOCUMENTS: usize = 256;
/// Frames one socket may have waiting for a token or a document load.
pub const MAX_QUEUED_FRAMES: usize = 256;
/// Bytes of those frames (one frame of any allowed size still goes to an empty queue).
pub const MAX_QUEUED_BYTES: usize = 4 << 20;
/// Longest address (document name plus a provider session id).
const MAX_ADDRESS_BYTES: usize = 1024;
/// A token is asked for again this long before it expires (at half its remaining life when
/// that is shorter).
const TOKEN_REFRESH_BEFORE: Duration = Duration::from_secs(30);
/// Longest timer set for a token (one year; a token's `exp` can be any number).
const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) async fn socket(State(state): State<AppState>, caller: Caller, ws: WebSocketUpgrade) -> Response {
    let Some(yjs) = caller.engines.yjs.clone() else {
        return error_response(StatusCode::NOT_FOUND, "The Yjs engine is not enabled on this server");
    };
    // Nothing to check yet: every document brings its own token in its Auth message.
    let info = SessionInfo {
        protocol: Protocol::Hocuspocus,
        target: "hocuspocus".into(),
        peer: caller.peer,
        slot: caller.slot,
        user_unit: None,
        max_frame_bytes: None,
    };
    let socket_token = caller.token;
    accept_session(ws, state, info, Ok(()), move |socket, state, mut log| async move {
        let edge = HocuspocusEdge::new(yjs, state.clone(), socket_token);
        let settings = PumpSettings { protocol: Protocol::Hocuspocus, expires_at: None };
        pump(socket, edge, settings, &state, &mut log).await
    })
}

/// What one address of the socket is doing.
enum Phase {
    /// Messages came before the token; they wait in the queue.
    Waiting,
    /// The token was accepted; the document is loading (its messages wait in the queue).
    Joining { read_only: bool, expires_at: Option<SystemTime> },
    /// Joined: frames go to the document.
    Open { inlet: YjsInlet, read_only: bool, timers: Timers },
    /// The token was refused or expired, or the document ended this connection: its messages
    /// are dropped until a new token arrives.
    Shut,
}

#[derive(Clone, Copy, Default)]
struct Timers {
    /// When the token stops being valid (the document is then refused).
    expires_at: Option<Instant>,
    /// When to ask the provider for a fresh token (once per token).
    refresh_at: Option<Instant>,
}

impl Timers {
    fn for_token(exp: Option<SystemTime>) -> Self {
        let Some(exp) = exp else { return Self::default() };
        // Capped like the pump's timers (tokio's reach about two years).
        let left = exp.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).min(MAX_TIMER);
        let now = Instant::now();
        let refresh_in = if left > TOKEN_REFRESH_BEFORE * 2 { left - TOKEN_REFRESH_BEFORE } else { left / 2 };
        Self { expires_at: Some(now + left), refresh_at: Some(now + refresh_in) }
    }

    fn next(&self) -> Option<Instant> {
        match (self.expires_at, self.refresh_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

struct Entry {
    /// This address's current join; outbound events of older joins are ignored.
    key: u64,
    /// The address as the lib0 string every frame about it starts with.
    prefix: Bytes,
    phase: Phase,
    /// Room messages waiting for the token, the load, or their turn behind earlier ones.
    queue: VecDeque<Bytes>,
}

/// A document load that finished.
struct Joined {
    address: String,
    key: u64,
    result: Result<YjsSession, ServiceError>,
}

/// One joined document's outbound queue as a stream of `(key, event)`.
struct DocOut {
    key: u64,
    prefix: Bytes,
    session: Option<YjsSession>,
}

enum DocEvent {
    Out(YjsOutbound),
    /// The document dropped the session (`too_slow`: its queue overflowed).
    Ended {
        too_slow: bool,
    },
}

impl Stream for DocOut {
    type Item = (u64, Bytes, DocEvent);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(session) = this.session.as_mut() else { return Poll::Ready(None) };
        match session.poll_outbound(cx) {
            Poll::Ready(Some(out)) => Poll::Ready(Some((this.key, this.prefix.clone(), DocEvent::Out(out)))),
            Poll::Ready(None) => {
                let too_slow = session.was_too_slow();
                this.session = None;
                Poll::Ready(Some((this.key, this.prefix.clone(), DocEvent::Ended { too_slow })))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A Hocuspocus socket as the pump drives it.
struct HocuspocusEdge {
    yjs: YjsService,
    state: AppState,
    /// A token the socket carried itself (header, query): used when an Auth message's is empty.
    socket_token: Option<String>,
    docs: HashMap<String, Entry>,
    /// Address of each open join, by key.
    open: HashMap<u64, String>,
    outs: SelectAll<DocOut>,
    joins: FuturesUnordered<BoxFuture<'static, Joined>>,
    /// Frames and closes made here; written before the documents' frames.
    local: VecDeque<Outbound>,
    /// Addresses whose queued messages wait to be handed to their document.
    to_forward: VecDeque<String>,
    /// Documents to leave (their token expired).
    to_leave: Vec<YjsInlet>,
    queued_frames: usize,
    queued_bytes: usize,
    next_key: u64,
    /// The earliest token timer of the open documents (recomputed when one changes).
    next_timer: Option<Instant>,
    /// One unit of the per-user session quota per token subject seen on this socket.
    user_units: HashMap<String, QuotaGuard>,
}

impl HocuspocusEdge {
    fn new(yjs: YjsService, state: AppState, socket_token: Option<String>) -> Self {
        Self {
            yjs,
            state,
            socket_token,
            docs: HashMap::new(),
            open: HashMap::new(),
            outs: SelectAll::new(),
            joins: FuturesUnordered::new(),
            local: VecDeque::new(),
            to_forward: VecDeque::new(),
            to_leave: Vec::new(),
            queued_frames: 0,
            queued_bytes: 0,
            next_key: 0,
            next_timer: None,
            user_units: HashMap::new(),
        }
    }

    fn send_local(&mut self, frame: Vec<u8>) {
        self.local.push_back(Outbound::Frame(Message::Binary(Bytes::from(frame))));
    }

    fn recompute_timers(&mut self) {
        self.next_timer = self
            .docs
            .values()
            .filter_map(|e| match &e.phase {
                Phase::Open { timers, .. } => timers.next(),
                _ => None,
            })
            .min();
    }

    /// Forgets an entry's queued messages.
    fn clear_queue(&mut self, address: &str) {
        if let Some(entry) = self.docs.get_mut(address) {
            self.queued_frames -= entry.queue.len();
            self.queued_bytes -= entry.queue.iter().map(Bytes::len).sum::<usize>();
            entry.queue.clear();
        }
    }

    /// Refuses `address` with the provider's authentication-failed message. An open document is
    /// left. A known address stays known (Shut), so that its later messages are dropped and the
    /// keepalive keeps its provider from reconnecting; with `remember`, an unknown one too.
    fn deny(&mut self, address: &str, reason: &str, remember: bool) {
        self.send_local(wire::permission_denied_frame(address, reason));
        self.clear_queue(address);
        if remember && !self.docs.contains_key(address) {
            let prefix = Bytes::from(wire::address_prefix(address));
            self.docs.insert(address.to_owned(), Entry { key: 0, prefix, phase: Phase::Shut, queue: VecDeque::new() });
        }
        let Some(entry) = self.docs.get_mut(address) else { return };
        if let Phase::Open { inlet, .. } = std::mem::replace(&mut entry.phase, Phase::Shut) {
            self.to_leave.push(inlet);
            self.open.remove(&entry.key);
            self.recompute_timers();
        }
    }

    /// Why a token was refused, as the provider is told. The 4401 (no valid token) and 4403
    /// (a valid token that does not open this document, or expired) of `/sync/v1` become the
    /// first word.
    fn refusal(e: &AuthError) -> String {
        let class = if e.close_code() == close::FORBIDDEN { "forbidden" } else { "unauthorized" };
        format!("{class}: {e}")
    }

    fn authenticate(&mut self, address: &str, token: &str) -> Result<(), Close> {
        let doc = wire::document_name(address);
        if address.len() > MAX_ADDRESS_BYTES || !valid_doc_id(doc) {
            self.state.metrics.rejected("bad_request");
            self.deny(address, "invalid document name", false);
            return Ok(());
        }
        if !self.docs.contains_key(address) && self.docs.len() >= MAX_DOCUMENTS {
            self.state.metrics.rejected("max_documents_per_socket");
            self.deny(address, &format!("too many documents on one connection (at most {MAX_DOCUMENTS})"), false);
            return Ok(());
        }
        let token = if token.is_empty() { self.socket_token.as_deref() } else { Some(token) };
        let grant = match self.state.auth.check_now(token, Resource::YjsDoc(doc)) {
            Ok(grant) => grant,
            Err(e) => {
                self.state.metrics.rejected("auth");
                tracing::info!(doc, error = %e, "hocuspocus document refused");
                self.deny(address, &Self::refusal(&e), true);
                return Ok(());
            }
        };
        if let Some(subject) = grant.subject() {
            if !self.user_units.contains_key(subject) {
                match self.state.sessions_per_user.try_acquire(&subject.to_owned()) {
                    Some(unit) => {
                        self.user_units.insert(subject.to_owned(), unit);
                    }
                    None => {
                        self.state.metrics.rejected("max_sessions_per_user");
                        return Err(Close::new(close::TRY_AGAIN_LATER, "too many open sessions for this user"));
                    }
                }
            }
        }
        let read_only = grant.read_only();
        let expires_at = grant.expires_at();
        let entry = self.docs.entry(address.to_owned()).or_insert_with(|| Entry {
            key: 0,
            prefix: Bytes::from(wire::address_prefix(address)),
            phase: Phase::Waiting,
            queue: VecDeque::new(),
        });
        match &mut entry.phase {
            // A fresh token for an open document (the answer to our token request): it extends
            // the document's life if it opens it the same way.
            Phase::Open { read_only: open_read_only, timers, .. } if *open_read_only == read_only => {
                let old_exp = timers.expires_at;
                let mut fresh = Timers::for_token(expires_at);
                // Ask again only for a token that lives longer than the last one, so a provider
                // that keeps answering with the same token is not asked in a loop.
                if old_exp.is_some() && fresh.expires_at <= old_exp {
                    fresh.refresh_at = None;
                }
                *timers = fresh;
                self.send_local(wire::authenticated_frame(address, read_only));
                self.recompute_timers();
            }
            Phase::Open { .. } => self.deny(
                address,
                "the new token's access differs from this connection's; reconnect to change it",
                true,
            ),
            // The load is under way; the token it was started with stands.
            Phase::Joining { .. } => {}
            Phase::Waiting | Phase::Shut => {
                self.next_key += 1;
                let key = self.next_key;
                entry.key = key;
                entry.phase = Phase::Joining { read_only, expires_at };
                let yjs = self.yjs.clone();
                let (doc, address) = (doc.to_owned(), address.to_owned());
                let access = if read_only { Access::ReadOnly } else { Access::ReadWrite };
                self.joins.push(
                    async move {
                        let result = yjs.join_with(&doc, access, Dialect::Hocuspocus).await;
                        Joined { address, key, result }
                    }
                    .boxed(),
                );
            }
        }
        Ok(())
    }

    /// A load finished: the document opens (authenticated, then its frames), or the socket
    /// closes with 1011 (the provider reconnects with backoff, as y-websocket does).
    fn joined(&mut self, done: Joined) {
        let Joined { address, key, result } = done;
        // Detached or refused meanwhile: the session is dropped, which leaves the document.
        let Some(entry) = self.docs.get_mut(&address) else { return };
        if entry.key != key {
            return;
        }
        let Phase::Joining { read_only, expires_at } = entry.phase else { return };
        match result {
            Ok(session) => {
                let inlet = session.inlet();
                entry.phase = Phase::Open { inlet, read_only, timers: Timers::for_token(expires_at) };
                self.outs.push(DocOut { key, prefix: entry.prefix.clone(), session: Some(session) });
                if !entry.queue.is_empty() {
                    self.to_forward.push_back(address.clone());
                }
                self.open.insert(key, address.clone());
                self.send_local(wire::authenticated_frame(&address, read_only));
                self.recompute_timers();
            }
            Err(e) => {
                let doc = wire::document_name(&address);
                tracing::error!(doc, error = %e, "cannot serve document");
                let reason = match e {
                    ServiceError::LoadFailed(_) => "document could not be loaded",
                    _ => "document unavailable",
                };
                self.local.push_back(Outbound::Close(Close::new(close::INTERNAL, reason)));
            }
        }
    }

    /// What one document sent or why it ended, as something to write (or nothing).
    fn doc_event(&mut self, key: u64, prefix: Bytes, event: DocEvent) -> Option<Outbound> {
        let address = self.open.get(&key)?;
        match event {
            DocEvent::Out(YjsOutbound::Frame(f)) => {
                Some(Outbound::Frame(Message::Binary(Bytes::from(wire::frame(&prefix, &f)))))
            }
            // The room ended this document's connection because of what the client sent: only
            // this document ends (Hocuspocus' CLOSE message), so a reconnect does not send the
            // same thing again; the socket stays for the others.
            DocEvent::Out(YjsOutbound::Close { code, reason })
                if matches!(code, close::PROTOCOL_ERROR | close::INVALID_DATA | close::POLICY) =>
            {
                let address = address.clone();
                tracing::info!(doc = wire::document_name(&address), code, %reason, "hocuspocus document closed");
                self.open.remove(&key);
                self.clear_queue(&address);
                if let Some(entry) = self.docs.get_mut(&address) {
                    entry.phase = Phase::Shut;
                }
                self.recompute_timers();
                Some(Outbound::Frame(Message::Binary(Bytes::from(wire::close_frame(&address, &reason)))))
            }
            // Storage or the document failed: the whole socket closes and the provider
            // reconnects and resyncs every document.
            DocEvent::Out(YjsOutbound::Close { code, reason }) => Some(Outbound::Close(Close::new(code, reason))),
            DocEvent::Ended { too_slow: true } => {
                Some(Outbound::Close(Close::new(close::TRY_AGAIN_LATER, "client too slow; reconnect to resync")))
            }
            DocEvent::Ended { too_slow: false } => {
                Some(Outbound::Close(Close::new(close::INTERNAL, "document closed")))
            }
        }
    }

    /// Token timers: ask for a fresh token, or refuse a document whose token expired.
    fn timers_fired(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut refresh = Vec::new();
        for (address, entry) in &mut self.docs {
            if let Phase::Open { timers, .. } = &mut entry.phase {
                if timers.expires_at.is_some_and(|t| t <= now) {
                    expired.push(address.clone());
                } else if timers.refresh_at.is_some_and(|t| t <= now) {
                    timers.refresh_at = None;
                    refresh.push(address.clone());
                }
            }
        }
        for address in refresh {
            self.send_local(wire::token_request_frame(&address));
        }
        for address in expired {
            self.state.metrics.rejected("token_expired");
            self.deny(&address, "forbidden: token expired", true);
        }
        self.recompute_timers();
    }

    /// Queues a room message for an address that is not open yet.
    fn enqueue(&mut self, address: &str, message: Bytes) -> Result<(), Close> {
        let len = message.len();
        if self.queued_frames >= MAX_QUEUED_FRAMES
            || (self.queued_bytes > 0 && self.queued_bytes + len > MAX_QUEUED_BYTES)
        {
            self.state.metrics.rejected("hocuspocus_queue_full");
            return Err(Close::new(close::POLICY, "too many messages waiting for a token or a document load"));
        }
        let Some(entry) = self.docs.get_mut(address) else { return Ok(()) };
        entry.queue.push_back(message);
        self.queued_frames += 1;
        self.queued_bytes += len;
        Ok(())
    }

    /// Hands an open document's queued messages over, oldest first. Cancel-safe: a message
    /// leaves the queue only once handed over.
    async fn forward_queued(&mut self, address: &str) {
        loop {
            let Some(entry) = self.docs.get_mut(address) else { return };
            let Phase::Open { inlet, .. } = &entry.phase else { return };
            let Some(message) = entry.queue.front().cloned() else { return };
            let inlet = inlet.clone();
            let handed = inlet.receive(message.clone()).await;
            entry.queue.pop_front();
            self.queued_frames -= 1;
            self.queued_bytes -= message.len();
            if !handed {
                // The document is gone; its outbound stream says why.
                self.clear_queue(address);
                return;
            }
        }
    }

    /// Leaves the documents whose token expired. Cancel-safe (a repeated leave is harmless).
    async fn leave_pending(&mut self) {
        while let Some(inlet) = self.to_leave.last() {
            inlet.leave().await;
            self.to_leave.pop();
        }
    }

    /// A message for the document's room.
    async fn for_room(&mut self, address: &str, message: Bytes) -> Result<(), Close> {
        let Some(entry) = self.docs.get(address) else {
            if self.docs.len() >= MAX_DOCUMENTS || address.len() > MAX_ADDRESS_BYTES {
                self.state.metrics.rejected("max_documents_per_socket");
                return Ok(());
            }
            self.docs.insert(
                address.to_owned(),
                Entry {
                    key: 0,
                    prefix: Bytes::from(wire::address_prefix(address)),
                    phase: Phase::Waiting,
                    queue: VecDeque::new(),
                },
            );
            return self.enqueue(address, message);
        };
        let inlet = match &entry.phase {
            Phase::Waiting | Phase::Joining { .. } => return self.enqueue(address, message),
            Phase::Shut => {
                self.state.metrics.rejected("hocuspocus_unauthenticated");
                return Ok(());
            }
            Phase::Open { inlet, .. } if entry.queue.is_empty() => inlet.clone(),
            // Behind the messages that waited for the load.
            Phase::Open { .. } => {
                self.enqueue(address, message)?;
                self.forward_queued(address).await;
                return Ok(());
            }
        };
        // False: the document is gone; its outbound stream says why.
        inlet.receive(message).await;
        Ok(())
    }

    /// The provider detached from a document.
    async fn detach(&mut self, address: &str) {
        self.clear_queue(address);
        if let Some(entry) = self.docs.remove(address) {
            if let Phase::Open { inlet, .. } = entry.phase {
                self.open.remove(&entry.key);
                inlet.leave().await;
                self.recompute_timers();
            }
        }
    }
}

impl EngineSession for HocuspocusEdge {
    async fn outbound(&mut self) -> Outbound {
        loop {
            if let Some(out) = self.local.pop_front() {
                return out;
            }
            self.leave_pending().await;
            while let Some(address) = self.to_forward.front().cloned() {
                self.forward_queued(&address).await;
                self.to_forward.pop_front();
            }
            if let Some(out) = self.local.pop_front() {
                return out;
            }
            let timer = self.next_timer;
            tokio::select! {
                Some(done) = self.joins.next(), if !self.joins.is_empty() => self.joined(done),
                Some((key, prefix, event)) = self.outs.next(), if !self.outs.is_empty() => {
                    if let Some(out) = self.doc_event(key, prefix, event) {
                        return out;
                    }
                }
                _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => self.timers_fired(),
                else => std::future::pending::<()>().await,
            }
        }
    }

    fn try_outbound(&mut self) -> Option<Outbound> {
        if let Some(out) = self.local.pop_front() {
            return Some(out);
        }
        while let Some(Some((key, prefix, event))) = self.outs.next().now_or_never() {
            if let Some(out) = self.doc_event(key, prefix, event) {
                return Some(out);
            }
        }
        None
    }

    async fn receive(&mut self, frame: Inbound) -> Result<(), Close> {
        self.leave_pending().await;
        let Inbound::Binary(bytes) = frame else {
            return Err(Close::new(close::INVALID_DATA, "Hocuspocus messages are binary frames"));
        };
        let (address, message) = match ClientFrame::decode(&bytes) {
            Ok(ClientFrame::Pong) => return Ok(()),
            Ok(ClientFrame::Addressed { address, message }) => (address, message),
            Err(e) => return Err(Close::new(close::PROTOCOL_ERROR, format!("malformed Hocuspocus message: {e}"))),
        };
        match message {
            ClientMessage::Token { token, .. } => self.authenticate(address, token),
            ClientMessage::Room(m) => self.for_room(address, bytes.slice_ref(m)).await,
            ClientMessage::SyncReply { body } => {
                let mut m = Vec::with_capacity(body.len() + 1);
                m.push(wire::MSG_SYNC as u8);
                m.extend_from_slice(body);
                self.for_room(address, Bytes::from(m)).await
            }
            ClientMessage::Close => {
                self.detach(address).await;
                Ok(())
            }
            ClientMessage::OtherAuth(_) | ClientMessage::Unknown(_) => {
                self.state.metrics.unknown_message(Protocol::Hocuspocus);
                Ok(())
            }
        }
    }

    /// The empty awareness update, addressed to a document the provider has (open or refused):
    /// the provider closes a socket that received nothing for 30 s, and a refused document must
    /// not make it reconnect to be refused again.
    fn keepalive_frame(&self) -> Option<Message> {
        let entry = self.docs.values().find(|e| matches!(e.phase, Phase::Open { .. } | Phase::Shut))?;
        Some(Message::Binary(Bytes::from(wire::frame(&entry.prefix, &KEEPALIVE_FRAME))))
    }

    fn keepalive_after(&self) -> Option<Duration> {
        Some(self.state.heartbeat.idle_keepalive)
    }

    async fn leave(mut self) {
        self.leave_pending().await;
        for entry in self.docs.values() {
            if let Phase::Open { inlet, .. } = &entry.phase {
                inlet.leave().await;
            }
        }
    }
}
