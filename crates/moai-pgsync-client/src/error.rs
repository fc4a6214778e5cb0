//! The client's error types.
//!
//! Hand-written instead of thiserror to keep the dependency list to what moai itself already
//! has (see Cargo.toml). [`ClientError`] is what ends [`super::client::ClientHandle::join`];
//! everything transient (network, server restarts, overload) is retried, not returned.

use std::error::Error as StdError;
use std::fmt;

/// A server frame that does not follow the protocol. The connection is dropped and retried:
/// a well-behaved server never sends one, so it is treated like a broken connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl ProtocolError {
    pub fn new(message: impl Into<String>) -> Self {
        ProtocolError(message.into())
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "protocol error: {}", self.0)
    }
}

impl StdError for ProtocolError {}

/// An error from the application's [`super::store::Store`]. The client stops: it cannot know
/// whether retrying would apply a transaction twice into a store that failed half-way.
#[derive(Debug)]
pub struct StoreError(pub Box<dyn StdError + Send + Sync>);

impl StoreError {
    pub fn msg(message: impl Into<String>) -> Self {
        StoreError(message.into().into())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store: {}", self.0)
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// Why the client stopped for good.
#[derive(Debug)]
pub enum ClientError {
    /// The server refused the token (WebSocket close 4401/4403 or `error{code:"unauthorized"}`)
    /// and no token provider was configured to get a new one.
    Unauthorized(String),
    /// The server rejected the request itself (`bad_request`, `shape_invalid`): retrying the
    /// same hello cannot succeed.
    Rejected { code: String, message: String },
    /// The local store failed.
    Store(StoreError),
    /// The configuration cannot work (e.g. an unparseable URL).
    Config(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Unauthorized(m) => write!(f, "unauthorized: {m}"),
            ClientError::Rejected { code, message } => write!(f, "rejected by the server ({code}): {message}"),
            ClientError::Store(e) => write!(f, "{e}"),
            ClientError::Config(m) => write!(f, "configuration: {m}"),
        }
    }
}

impl StdError for ClientError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            ClientError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for ClientError {
    fn from(e: StoreError) -> Self {
        ClientError::Store(e)
    }
}
