//! One socket's view of the CoJSON engine: the way in (decoded frames to the relay task) and
//! the way out (a bounded queue of messages the edge writes to the socket).
//!
//! Frames are decoded here, on the edge's task, and messages are encoded to text here too, when
//! the edge takes them: JSON work for one socket runs on that socket's task, in parallel, and
//! the single relay task only does what needs the shared state (verification, known states).
//! A message the relay fanned out to many peers is one shared [`Outgoing`], encoded by the first
//! socket task that takes it; the others reuse its text.
//!
//! Closing: the relay task never blocks on a socket. To close a session (relay decision, full
//! outbox, storage failure) it records the close here and drops its end of the queue; the next
//! [`CojsonSession::outbound`] returns that close at once, ahead of anything still queued (the
//! peer resyncs on reconnect, so stale queued frames are worth nothing).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Semaphore};

use super::relay_task::Command;
use crate::message::{frame_is_clean, parse_frame, Incoming, Outgoing, SyncMessage};
use crate::relay::PeerId;

/// A frame is not extended with further queued messages once it is this long (a single longer
/// message still goes whole).
const COALESCE_BYTES: usize = 64 * 1024;

/// What the edge must do with the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Write one text frame: one cojson message, or several joined by `"\n"` when more than
    /// one was ready at once (cojson clients split frames on `"\n"`, as their own batching
    /// sends them).
    Text(String),
    /// Close the socket with this code and reason. Nothing follows it.
    Close { code: u16, reason: String },
}

/// What became of one inbound frame. Material for logs and metrics; the session stays open
/// whatever the frame held, as cojson's transport does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// Messages handed to the relay.
    pub messages: usize,
    /// Lines that were JSON but not a valid message (dropped one by one).
    pub bad_messages: usize,
    /// Content messages dropped because the session is read-only.
    pub read_only_dropped: usize,
    /// The frame had a line that is not JSON and was dropped whole (cojson-transport-ws does the
    /// same: one `JSON.parse` failure drops the frame).
    pub dropped_frame: bool,
}

/// The service has stopped; the session is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the CoJSON service has stopped")]
pub struct ServiceStopped;

/// Bytes of frames one session may have queued for the relay task, not yet handled. The relay
/// handles (verifies) content on one task, in queue order: without a per-session share, one
/// client pipelining large frames filled the whole queue (8192 frames of up to the frame limit
/// each) and everyone else waited behind it. With it, a client's message waits behind at most
/// this much of each other connected client's work, and what all sessions hold queued is
/// bounded by connections × this.
pub const INFLIGHT_BYTES: usize = 4 << 20;

/// Shared between the session and the relay task: a close the task decided on.
#[derive(Default, Debug)]
pub(crate) struct SessionShared {
    close: Mutex<Option<(u16, String)>>,
    /// Bytes of messages in the outbox ([`Outgoing::approx_bytes`]): added by the relay task
    /// before queueing, taken off here when the edge takes the message.
    pub(crate) queued_bytes: std::sync::atomic::AtomicUsize,
}

impl SessionShared {
    /// Records the close; the first one wins.
    pub(crate) fn set_close(&self, code: u16, reason: String) {
        let mut slot = self.close.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((code, reason));
        }
    }

    fn take_close(&self) -> Option<(u16, String)> {
        self.close.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

pub struct CojsonSession {
    pub(crate) peer: PeerId,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) outbox: mpsc::Receiver<Outgoing>,
    pub(crate) shared: Arc<SessionShared>,
    /// This session's share of the relay task's queue, in bytes of frames ([`INFLIGHT_BYTES`]).
    pub(crate) inflight: Arc<Semaphore>,
    /// Content from this session is dropped ([`super::CojsonService::connect_with`]).
    pub(crate) read_only: bool,
    /// A close (or the end) was returned; nothing more comes out.
    pub(crate) finished: bool,
    pub(crate) left: bool,
}

impl CojsonSession {
    /// The relay's number for this connection (for log lines).
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Hands one inbound text frame to the relay: split on `"\n"`, each line decoded. A frame
    /// with a line that is not JSON is dropped whole; a line that is JSON but not a valid
    /// message is dropped alone; pings and unknown objects are ignored. Never closes the
    /// session. Waits while this session has [`INFLIGHT_BYTES`] of frames queued for the relay
    /// (or the relay's queue is full), which slows down reading this socket instead of growing
    /// memory, and keeps one busy client from filling the queue ahead of everyone else.
    pub async fn receive(&self, frame: &str) -> Result<Received, ServiceStopped> {
        let lines = parse_frame(frame);
        let mut received = Received::default();
        if !frame_is_clean(&lines) {
            tracing::debug!(peer = self.peer.0, "cojson frame with invalid JSON dropped");
            received.dropped_frame = true;
            return Ok(received);
        }
        let mut messages = Vec::with_capacity(lines.len());
        for line in lines {
            match line {
                Ok(Incoming::Sync(SyncMessage::Content(_))) if self.read_only => received.read_only_dropped += 1,
                Ok(Incoming::Sync(msg)) => messages.push(msg),
                Ok(Incoming::Ping { .. } | Incoming::Ignored) => {}
                Err(e) => {
                    tracing::debug!(peer = self.peer.0, error = %e, "invalid cojson message dropped");
                    received.bad_messages += 1;
                }
            }
        }
        received.messages = messages.len();
        if !messages.is_empty() {
            // A frame larger than the whole share takes all of it.
            let bytes = u32::try_from(frame.len().clamp(1, INFLIGHT_BYTES)).unwrap_or(u32::MAX);
            let permit = self.inflight.clone().acquire_many_owned(bytes).await.map_err(|_| ServiceStopped)?;
            let command = Command::Messages { peer: self.peer, messages, _inflight: permit };
            self.commands.send(command).await.map_err(|_| ServiceStopped)?;
        }
        Ok(received)
    }

    /// The next thing to write to the socket. After an [`Outbound::Close`], or when the service
    /// has stopped, `None`.
    pub async fn outbound(&mut self) -> Option<Outbound> {
        if self.finished {
            return None;
        }
        if let Some(close) = self.closing() {
            return Some(close);
        }
        match self.outbox.recv().await {
            Some(msg) => {
                self.taken(&msg);
                Some(Outbound::Text(self.frame_from(msg)))
            }
            // The relay task dropped its end: a close was recorded first, or the service ended.
            None => {
                self.finished = true;
                self.shared.take_close().map(|(code, reason)| Outbound::Close { code, reason })
            }
        }
    }

    /// The next thing to write if one is ready right now.
    pub fn try_outbound(&mut self) -> Option<Outbound> {
        if self.finished {
            return None;
        }
        if let Some(close) = self.closing() {
            return Some(close);
        }
        match self.outbox.try_recv() {
            Ok(msg) => {
                self.taken(&msg);
                Some(Outbound::Text(self.frame_from(msg)))
            }
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                self.finished = true;
                self.shared.take_close().map(|(code, reason)| Outbound::Close { code, reason })
            }
        }
    }

    /// One text frame starting with `first`, followed by every message already queued behind
    /// it (joined by `"\n"`) up to [`COALESCE_BYTES`]: one socket write and one client wakeup
    /// for a burst. Messages shared by many peers were encoded once ([`Outgoing::json`]).
    fn frame_from(&mut self, first: Outgoing) -> String {
        let mut frame = String::from(first.json());
        while frame.len() < COALESCE_BYTES {
            let Ok(next) = self.outbox.try_recv() else { break };
            self.taken(&next);
            let json = next.json();
            frame.reserve(json.len() + 1);
            frame.push('\n');
            frame.push_str(json);
        }
        frame
    }

    fn taken(&self, msg: &Outgoing) {
        self.shared.queued_bytes.fetch_sub(msg.approx_bytes(), std::sync::atomic::Ordering::Relaxed);
    }

    fn closing(&mut self) -> Option<Outbound> {
        let (code, reason) = self.shared.take_close()?;
        self.finished = true;
        Some(Outbound::Close { code, reason })
    }

    /// Leaves: the relay forgets this peer's subscriptions and pending work. Call it when the
    /// socket closes, for whatever reason (dropping the session does it too).
    pub async fn leave(mut self) {
        self.left = true;
        let _ = self.commands.send(Command::Leave { peer: self.peer }).await;
    }
}

impl Drop for CojsonSession {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        // Dropped without leave() (a cancelled edge task): still leave, or the relay would keep
        // this peer's subscriptions forever. Leave goes through the same queue as messages, so it
        // is never handled before a message sent earlier.
        let leave = Command::Leave { peer: self.peer };
        if let Err(mpsc::error::TrySendError::Full(leave)) = self.commands.try_send(leave) {
            let commands = self.commands.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = commands.send(leave).await;
                });
            }
        }
    }
}
