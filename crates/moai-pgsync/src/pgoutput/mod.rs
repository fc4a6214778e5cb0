//! pgoutput logical replication protocol: a hand-written, sans-IO decoder.
//!
//! We own the decoder because TOAST, relation and type handling are exactly where sync
//! correctness lives (what clients rely on: unchanged TOAST columns in docs/pgsync-protocol.md
//! §4, relation changes in §10 item 4, types in §13). Input is one XLogData payload; nothing
//! here touches a socket. Protocol versions 1-4 are accepted; v2 stream messages are decoded,
//! v3 two-phase messages are rejected with a typed error (moai never enables `two_phase`).

mod decoder;
mod error;
mod message;
mod reader;
mod relation_cache;

#[cfg(test)]
mod tests;

pub use decoder::Decoder;
pub use error::DecodeError;
pub use message::*;
pub use relation_cache::{RelationCache, RelationUpdate};
