//! One socket's view of a document: the way in (frames to the document task) and the way out
//! (a bounded queue of frames the edge writes to the socket).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};

use super::doc_task::Command;
use crate::ConnId;

/// What the edge must do with the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Write one binary frame.
    Frame(Bytes),
    /// Close the socket with this code and reason.
    Close { code: u16, reason: String },
}

/// Flags the document task sets on a session it dropped.
#[derive(Default, Debug)]
pub(crate) struct SessionFlags {
    /// The outbox overflowed: the client could not keep up.
    pub(crate) too_slow: AtomicBool,
    /// Bytes of frames in the outbox (added by the document task before queueing, taken off
    /// here when the edge takes the frame).
    pub(crate) queued_bytes: AtomicUsize,
}

pub struct YjsSession {
    pub(crate) conn: ConnId,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) outbound: mpsc::Receiver<Outbound>,
    pub(crate) flags: Arc<SessionFlags>,
    /// The document's inbound budget in bytes, shared by all its sessions.
    pub(crate) inbound: Arc<Semaphore>,
    pub(crate) left: bool,
}

impl YjsSession {
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Hands one inbound frame to the document. Waits while the document's queue is full, which
    /// slows down reading from this socket instead of growing memory. Returns false if the
    /// document is gone (the outbound queue then says why).
    pub async fn receive(&self, frame: Bytes) -> bool {
        send_frame(self.conn, &self.commands, &self.inbound, frame).await
    }

    /// A handle that hands frames to the document for this session, for an edge that keeps the
    /// session itself where it waits for outbound frames (one socket serving several documents).
    pub fn inlet(&self) -> YjsInlet {
        YjsInlet { conn: self.conn, commands: self.commands.clone(), inbound: self.inbound.clone() }
    }

    /// [`YjsSession::outbound`] as a poll, for an edge that waits on many sessions at once.
    pub fn poll_outbound(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outbound>> {
        self.outbound.poll_recv(cx).map(|out| self.taken(out))
    }

    /// The next thing to write to the socket. `None` means the document dropped this session:
    /// see [`YjsSession::was_too_slow`].
    pub async fn outbound(&mut self) -> Option<Outbound> {
        let out = self.outbound.recv().await;
        self.taken(out)
    }

    fn taken(&self, out: Option<Outbound>) -> Option<Outbound> {
        if let Some(Outbound::Frame(f)) = &out {
            self.flags.queued_bytes.fetch_sub(f.len(), Ordering::Relaxed);
        }
        out
    }

    /// The next thing to write, if one is queued right now.
    pub fn try_outbound(&mut self) -> Option<Outbound> {
        let out = self.outbound.try_recv().ok();
        self.taken(out)
    }

    /// Whether the session was dropped because its outbox overflowed.
    pub fn was_too_slow(&self) -> bool {
        self.flags.too_slow.load(Ordering::Relaxed)
    }

    /// Leaves the document (its awareness states are removed for everyone else).
    pub async fn leave(mut self) {
        self.left = true;
        let _ = self.commands.send(Command::Leave { conn: self.conn }).await;
    }
}

/// The way in of a [`YjsSession`] ([`YjsSession::inlet`]). Cheap to clone.
#[derive(Clone)]
pub struct YjsInlet {
    conn: ConnId,
    commands: mpsc::Sender<Command>,
    inbound: Arc<Semaphore>,
}

impl YjsInlet {
    /// [`YjsSession::receive`]. Cancel-safe: a call that has not returned has handed nothing over.
    pub async fn receive(&self, frame: Bytes) -> bool {
        send_frame(self.conn, &self.commands, &self.inbound, frame).await
    }

    /// Leaves the document, like [`YjsSession::leave`]; the session's outbound queue then ends.
    pub async fn leave(&self) {
        let _ = self.commands.send(Command::Leave { conn: self.conn }).await;
    }
}

async fn send_frame(conn: ConnId, commands: &mpsc::Sender<Command>, inbound: &Arc<Semaphore>, frame: Bytes) -> bool {
    // A frame larger than the whole budget takes all of it (and waits for it).
    let want = frame.len().clamp(1, super::doc_task::MAX_INBOUND_PERMITS) as u32;
    let Ok(budget) = inbound.clone().acquire_many_owned(want).await else { return false };
    commands.send(Command::Frame { conn, frame, budget }).await.is_ok()
}

impl Drop for YjsSession {
    fn drop(&mut self) {
        // A session dropped without leave() (a panic or a cancelled task at the edge) still
        // leaves, so its presence does not linger.
        if !self.left {
            let _ = self.commands.try_send(Command::Leave { conn: self.conn });
        }
    }
}
