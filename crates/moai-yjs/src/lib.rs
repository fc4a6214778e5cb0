//! moai-yjs: the sans-IO core of moai's Yjs support.
//!
//! It speaks the y-websocket protocol (docs/protocols/yjs.md §2–§3) for unmodified `yjs` +
//! `y-websocket` clients, without owning sockets, timers or storage: the server edge feeds it
//! connects, frames and closes, and executes the [`Action`]s it returns (see [`room`] for the
//! ordering contract that makes every update durable before it is broadcast).
//!
//! * [`protocol`] — frame codec (one message per frame) and [`KEEPALIVE_FRAME`].
//! * [`hocuspocus`] — the Hocuspocus envelope (document address, auth, sync status) around the
//!   same messages, for `@hocuspocus/provider` clients.
//! * [`awareness`] — presence tracking with removal on disconnect and fast rejoin.
//! * [`room`] — the per-document state machine.
//! * [`load`] — rebuilding a document from snapshot + journal.
//! * [`service`] — the async driver: one owner task per document, persistence through
//!   [`moai_storage::DocJournal`] before broadcast, bounded outboxes, compaction, eviction.

pub mod apply;
pub mod awareness;
pub mod cluster;
pub mod conn;
pub mod hocuspocus;
mod lib0;
pub mod load;
pub mod plausible;
pub mod protocol;
pub mod room;
pub mod service;

#[cfg(test)]
mod test_util;

#[cfg(debug_assertions)]
pub use apply::set_test_panic_marker;
pub use apply::ApplyError;
pub use awareness::{AwarenessEntry, AwarenessTracker, AwarenessUpdate};
pub use conn::{Access, ConnId, Dialect};
pub use lib0::DecodeError;
pub use load::{load_doc, load_room, LoadError};
pub use plausible::Policy;
pub use protocol::{AuthMessage, Message, MessageReader, SyncMessage, KEEPALIVE_FRAME};
pub use room::{Action, Room, RoomError, RoomStats, CLOSE_INVALID_PAYLOAD, CLOSE_PROTOCOL_ERROR};

/// Re-exported so the driver uses exactly the yrs version this crate was built and tested with.
pub use yrs;
