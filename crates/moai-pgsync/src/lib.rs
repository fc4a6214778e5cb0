//! moai-pgsync: the Postgres change feed engine behind moai's `/api/sync`.
//!
//! The core is sans-IO: bytes and events in, values and actions out. The async edge against a
//! real PostgreSQL (tokio, tokio-postgres, pgwire-replication) is [`PgSync`] (`engine.rs`;
//! one `SessionTask` per client in `session_task.rs`, with `snapshot.rs`, `registry.rs`,
//! `catalog.rs`) with [`replicator`] (slot → `change_history`), `change_history.rs` (writes,
//! pages) and `maintenance.rs` (retention, registry expiry). The WebSocket edge only moves text
//! frames in and out of [`PgSync::run_session`].
//!
//! Flow: XLogData payload → [`pgoutput::Decoder`] → [`transaction_assembler::TransactionAssembler`]
//! → committed [`transaction_assembler::Transaction`]s keyed by `(commit_lsn, seq)` →
//! `change_history` (replicator, not here) → page queries decided by each client's
//! [`subscription::Subscription`], which speaks [`protocol`]; [`filter`] decides with [`shape`]
//! what each client sees of a change.

pub mod access;
mod catalog;
pub(crate) mod change_history;
pub mod config;
mod db;
mod engine;
mod error;
pub mod filter;
mod follower;
pub mod lsn;
mod maintenance;
pub mod pg_time;
pub mod pgoutput;
pub mod position;
pub mod protocol;
pub mod raw_row;
mod registry;
pub mod replicator;
mod session_task;
pub mod shape;
mod snapshot;
pub mod subscription;
pub mod transaction_assembler;
pub mod value_mapping;

pub use access::Access;
pub use config::PgSyncConfig;
pub use engine::{FeedStatus, PgSync, SessionEnd, SessionFailure};
pub use error::Error;
pub use lsn::{Lsn, LsnParseError};
pub use position::Position;
pub use replicator::{FeedState, Phase};
pub use snapshot::SnapshotConnections;
