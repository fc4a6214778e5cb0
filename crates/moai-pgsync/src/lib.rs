//! moai-pgsync: the Postgres change feed engine behind moai's `/api/sync`.
//!
//! Everything in this crate is sans-IO: bytes and events in, values and actions out. The
//! replicator (pgwire-replication + tokio) and the WebSocket edge live outside and drive it.
//!
//! Flow: XLogData payload → [`pgoutput::Decoder`] → [`transaction_assembler::TransactionAssembler`]
//! → committed [`transaction_assembler::Transaction`]s keyed by `(commit_lsn, seq)` →
//! `change_history` (replicator, not here) → page queries driven by [`session::Session`], which
//! speaks [`protocol`] and filters with [`shape`].

pub mod lsn;
pub mod pg_time;
pub mod pgoutput;
pub mod position;
pub mod protocol;
pub mod session;
pub mod shape;
pub mod transaction_assembler;
pub mod value_mapping;

pub use lsn::{Lsn, LsnParseError};
pub use position::Position;
