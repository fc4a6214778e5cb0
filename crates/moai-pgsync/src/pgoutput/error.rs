//! Typed failures of pgoutput decoding.
//!
//! The bytes come off the network, so every malformed input maps to one of these instead of a
//! panic; the replicator decides whether to reconnect or stop.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is empty")]
    Empty,
    #[error("truncated: needed {needed} more byte(s) at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownMessageType(u8),
    #[error("message type {tag:?} needs protocol version {min_version}, decoder runs version {version}")]
    NeedsNewerProtocol { tag: char, min_version: u32, version: u32 },
    #[error("unsupported pgoutput protocol version {0} (supported: 1-4)")]
    UnsupportedProtocolVersion(u32),
    #[error("message type {0:?} (two-phase commit) is not supported")]
    UnsupportedMessage(char),
    #[error("string at offset {offset} has no NUL terminator")]
    UnterminatedString { offset: usize },
    #[error("string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: usize },
    #[error("negative {what} {value} at offset {offset}")]
    NegativeCount { what: &'static str, value: i64, offset: usize },
    #[error("unknown tuple column kind {kind:#04x} at offset {offset}")]
    UnknownColumnKind { kind: u8, offset: usize },
    #[error("expected tuple marker {expected} at offset {offset}, found {found:#04x}")]
    UnexpectedTupleMarker { expected: &'static str, found: u8, offset: usize },
    #[error("unknown replica identity {0:#04x}")]
    UnknownReplicaIdentity(u8),
    #[error("{remaining} trailing byte(s) after a complete {tag:?} message")]
    TrailingBytes { tag: char, remaining: usize },
    #[error("stream message {tag:?} outside of a stream block")]
    NotInStream { tag: char },
    #[error("stream start while already inside a stream block")]
    NestedStreamStart,
}
