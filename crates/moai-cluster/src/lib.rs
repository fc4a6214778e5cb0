//! moai's cluster room: several moai instances that serve the same documents and CoValues,
//! sharing storage (PostgreSQL, S3) and talking through Redis.
//!
//! What crosses instances is small and always already durable: an engine publishes a change
//! only after its own storage write has committed, so an instance that receives it never has to
//! store it again, and a message the bus loses is never data lost — it is repaired from storage
//! or from another instance (docs/cluster.md).
//!
//! The bus is topic-based and engine-agnostic: an engine [`Bus::join`]s a topic per open
//! document (a Redis stream, read by id, so gaps are detectable), publishes `(kind, payload)`
//! pairs with [`Topic::publish`] and receives [`BusEvent`]s: other instances' messages, a
//! [`BusEvent::Resync`] when something may have been missed (the link to Redis was lost, the
//! stream was trimmed past what this instance had read, its own queue overflowed), and
//! [`BusEvent::InstanceGone`] when another instance stopped heartbeating (its presence must go).
//!
//! Dependency rule: the cluster never imports an engine or the server; engines use it as they
//! use storage.

mod backoff;
mod bus;
mod config;
mod heartbeat;
mod instance;
mod link;
mod publisher;
mod reader;
mod status;
mod stream_reply;
mod topics;

pub use bus::{Bus, BusEvent, Inbox, Joiner, Membership, Topic};
pub use config::BusConfig;
pub use instance::InstanceId;
pub use status::{BusStats, BusStatus};

/// Why the bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The Redis URL is not one the client understands.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(#[source] redis::RedisError),
}
