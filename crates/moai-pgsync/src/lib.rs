//! moai-pgsync: the Postgres change feed engine behind moai's `/api/sync`.
//!
//! The core is sans-IO: bytes and events in, values and actions out. The async edge against a
//! real PostgreSQL (tokio, tokio-postgres, pgwire-replication) is [`service::PgSync`] (one
//! `SessionTask` per client) with [`replicator`] (slot → `change_history`) and
//! [`change_history`] (writes, pages, retention). The WebSocket edge only moves text frames in
//! and out of [`service::PgSync::run_session`].
//!
//! Flow: XLogData payload → [`pgoutput::Decoder`] → [`transaction_assembler::TransactionAssembler`]
//! → committed [`transaction_assembler::Transaction`]s keyed by `(commit_lsn, seq)` →
//! `change_history` (replicator, not here) → page queries decided by each client's
//! [`subscription::Subscription`], which speaks [`protocol`]; [`filter`] decides with [`shape`]
//! what each client sees of a change.

pub mod access;
pub(crate) mod change_history;
pub mod config;
mod db;
pub mod filter;
pub mod lsn;
pub mod pg_time;
pub mod pgoutput;
pub mod position;
pub mod protocol;
pub mod raw_row;
pub mod replicator;
pub mod service;
pub mod shape;
pub mod subscription;
pub mod transaction_assembler;
pub mod value_mapping;

pub use access::Access;
pub use config::{Error, PgSyncConfig};
pub use lsn::{Lsn, LsnParseError};
pub use position::Position;
pub use replicator::{FeedState, Phase};
pub use service::{PgSync, SessionEnd, SnapshotConnections};
