//! moai-pgsync-client: a small Rust client for moai's Postgres change feed (`/api/sync`).
//!
//! It connects over WebSocket (optionally with a bearer token), sends `hello` with its shapes
//! and the store's resume point (generation + last applied position), applies the snapshot
//! and every committed transaction to a [`Store`] as idempotent upserts/patches/deletes keyed
//! by `table + key`, applies a transaction only once its `last` part arrived, acks transaction
//! ends after applying them, handles `must_refetch`, and reconnects by itself with capped,
//! jittered exponential backoff, resuming where it left off.
//!
//! ```no_run
//! # async fn demo() {
//! use moai_pgsync_client::{spawn, ClientConfig, MemoryStore, Shape};
//! let cfg = ClientConfig::new("ws://127.0.0.1:4201/api/sync", "device-1", vec![Shape::table("items", "public.items")]);
//! let client = spawn(cfg, MemoryStore::new());
//! let mut status = client.status();
//! status.wait_for(|s| s.up_to_date).await.unwrap();
//! println!("{} rows", client.store().lock().unwrap().table("public.items").len());
//! # }
//! ```
//!
//! Protocol reference: docs/pgsync-protocol.md. Why this crate has its own message types
//! instead of reusing moai-pgsync's: see [`messages`].

pub mod backoff;
pub mod client;
pub mod error;
pub mod messages;
pub mod position;
pub mod session;
pub mod store;

pub use backoff::{Backoff, BackoffConfig};
pub use client::{spawn, ClientConfig, ClientHandle, Status, TokenProvider};
pub use error::{ClientError, ProtocolError, StoreError};
pub use messages::{Op, Row, Shape, Transaction};
pub use position::{Lsn, Position, ResumePoint};
pub use store::{key_text, MemoryStore, Store};
