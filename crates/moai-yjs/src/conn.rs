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
