//! Connection identity. The core never sees sockets; the driver names each socket with a
//! `ConnId` it chooses (unique within a room for the room's lifetime) and maps actions back.

/// Opaque, driver-assigned connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What a connection may do to the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Read, write and show presence.
    #[default]
    ReadWrite,
    /// Read and show presence; document updates from it are dropped (a read-only token).
    ReadOnly,
}

/// The protocol a connection speaks, which decides a few of the room's answers (the frames are
/// y-websocket messages either way; the edge adds what its protocol needs around them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// y-websocket: the server's SyncStep1 on connect; a read-only connection's first update is
    /// answered with y-protocols' permission-denied message.
    #[default]
    YWebsocket,
    /// Hocuspocus (docs/protocols/hocuspocus.md): every client SyncStep1 is answered with
    /// SyncStep2 and then the server's SyncStep1 (none on connect); every update and SyncStep2
    /// is acknowledged with a sync-status message once durable (refused ones, e.g. from a
    /// read-only connection, with `0`); stateless messages go to the document's other
    /// Hocuspocus connections.
    Hocuspocus,
}
