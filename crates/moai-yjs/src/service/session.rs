//! One socket's view of a document: the way in (frames to the document task) and the way out
//! (a bounded queue of frames the edge writes to the socket).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

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
}

pub struct Session {
    pub(crate) conn: ConnId,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) outbound: mpsc::Receiver<Outbound>,
    pub(crate) flags: Arc<SessionFlags>,
    pub(crate) left: bool,
}

impl Session {
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Hands one inbound frame to the document. Waits while the document's queue is full, which
    /// slows down reading from this socket instead of growing memory. Returns false if the
    /// document is gone (the outbound queue then says why).
    pub async fn receive(&self, frame: Bytes) -> bool {
        self.commands.send(Command::Frame { conn: self.conn, frame }).await.is_ok()
    }

    /// The next thing to write to the socket. `None` means the document dropped this session:
    /// see [`Session::was_too_slow`].
    pub async fn outbound(&mut self) -> Option<Outbound> {
        self.outbound.recv().await
    }

    /// The next thing to write, if one is queued right now.
    pub fn try_outbound(&mut self) -> Option<Outbound> {
        self.outbound.try_recv().ok()
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

impl Drop for Session {
    fn drop(&mut self) {
        // A session dropped without leave() (a panic or a cancelled task at the edge) still
        // leaves, so its presence does not linger.
        if !self.left {
            let _ = self.commands.try_send(Command::Leave { conn: self.conn });
        }
    }
}
