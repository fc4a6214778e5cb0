//! Wire framing of the two client protocols the benchmark speaks (spec §1 and §2).
//!
//! y-websocket: every WebSocket binary frame is `varuint type` + body.
//! Hocuspocus: the same bodies behind a `varstring documentName` prefix, plus an Auth handshake,
//! SyncStatus acks and (v4) one-byte Ping/Pong frames without a name.
//!
//! Parsing never panics: malformed input is an `Err(FrameError)` that the caller counts.

use std::fmt;

pub const MSG_SYNC: u64 = 0;
pub const MSG_AWARENESS: u64 = 1;
pub const MSG_AUTH: u64 = 2;
pub const MSG_QUERY_AWARENESS: u64 = 3;
/// Hocuspocus only: a sync message that must not trigger another SyncStep1.
pub const HP_SYNC_REPLY: u64 = 4;
pub const HP_STATELESS: u64 = 5;
pub const HP_CLOSE: u64 = 7;
pub const HP_SYNC_STATUS: u64 = 8;
/// Hocuspocus v4 connection-level ping/pong (single byte, no document name).
pub const HP_PING: u8 = 9;
pub const HP_PONG: u8 = 10;

pub const SYNC_STEP1: u64 = 0;
pub const SYNC_STEP2: u64 = 1;
pub const SYNC_UPDATE: u64 = 2;

/// An empty Yjs v1 update: no structs, empty delete set.
pub const EMPTY_UPDATE: &[u8] = &[0, 0];
/// An empty state vector.
pub const EMPTY_STATE_VECTOR: &[u8] = &[0];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// y-websocket: one document per socket, named by the URL path.
    YWebsocket,
    /// Hocuspocus: document name inside every frame, Auth message first.
    Hocuspocus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(pub &'static str);

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for FrameError {}

// ---------------------------------------------------------------------------------------------
// lib0 primitives

pub fn write_var_uint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

pub fn write_var_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    write_var_uint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn read_var_uint(&mut self) -> Result<u64, FrameError> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let byte = *self.buf.get(self.pos).ok_or(FrameError("truncated varuint"))?;
            self.pos += 1;
            if shift >= 64 {
                return Err(FrameError("varuint too long"));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    pub fn read_var_bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let len = self.read_var_uint()?;
        let len = usize::try_from(len).map_err(|_| FrameError("length overflow"))?;
        let end = self.pos.checked_add(len).ok_or(FrameError("length overflow"))?;
        let bytes = self.buf.get(self.pos..end).ok_or(FrameError("truncated payload"))?;
        self.pos = end;
        Ok(bytes)
    }

    pub fn read_var_string(&mut self) -> Result<&'a str, FrameError> {
        std::str::from_utf8(self.read_var_bytes()?).map_err(|_| FrameError("invalid utf-8 string"))
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// What a server sent us, borrowed from the frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    SyncStep1(&'a [u8]),
    SyncStep2(&'a [u8]),
    Update(&'a [u8]),
    Awareness,
    QueryAwareness,
    /// y-websocket auth (permission denied) or Hocuspocus PermissionDenied.
    AuthDenied(String),
    /// Hocuspocus Authenticated(scope).
    AuthOk,
    /// Hocuspocus: server asks for the token again.
    AuthRequested,
    /// Hocuspocus SyncStatus: was our update applied?
    SyncStatus(bool),
    /// Hocuspocus v4 connection-level ping; answer with `Framer::pong`.
    Ping,
    /// Hocuspocus CLOSE for this document.
    Close,
    /// A message for another document (Hocuspocus multiplexing; we never subscribe to two).
    OtherDocument,
    /// A well-formed message of a type we do not use (stateless, unknown types).
    Ignored(u64),
}

/// Encodes and decodes frames for one document on one socket.
#[derive(Clone, Debug)]
pub struct Framer {
    protocol: Protocol,
    /// Pre-encoded `varstring documentName` (Hocuspocus), empty for y-websocket.
    prefix: Vec<u8>,
    doc: String,
}

impl Framer {
    pub fn new(protocol: Protocol, doc: &str) -> Self {
        let mut prefix = Vec::new();
        if protocol == Protocol::Hocuspocus {
            write_var_bytes(&mut prefix, doc.as_bytes());
        }
        Self { protocol, prefix, doc: doc.to_owned() }
    }

    fn start(&self, ty: u64, capacity: usize) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.prefix.len() + 8 + capacity);
        buf.extend_from_slice(&self.prefix);
        write_var_uint(&mut buf, ty);
        buf
    }

    fn sync(&self, subtype: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = self.start(MSG_SYNC, payload.len());
        write_var_uint(&mut buf, subtype);
        write_var_bytes(&mut buf, payload);
        buf
    }

    pub fn sync_step1(&self, state_vector: &[u8]) -> Vec<u8> {
        self.sync(SYNC_STEP1, state_vector)
    }

    pub fn sync_step2(&self, update: &[u8]) -> Vec<u8> {
        self.sync(SYNC_STEP2, update)
    }

    pub fn update(&self, update: &[u8]) -> Vec<u8> {
        self.sync(SYNC_UPDATE, update)
    }

    /// The frames a client sends right after the socket opens (spec §1.4 / §2.3):
    /// Hocuspocus first authenticates (empty token when none), then both send SyncStep1.
    pub fn opening(&self, state_vector: &[u8], token: &str) -> Vec<Vec<u8>> {
        let mut frames = Vec::with_capacity(2);
        if self.protocol == Protocol::Hocuspocus {
            let mut auth = self.start(MSG_AUTH, token.len() + 2);
            write_var_uint(&mut auth, 0); // Token
            write_var_bytes(&mut auth, token.as_bytes());
            frames.push(auth);
        }
        frames.push(self.sync_step1(state_vector));
        frames
    }

    pub fn pong() -> Vec<u8> {
        vec![HP_PONG]
    }

    pub fn parse<'a>(&self, frame: &'a [u8]) -> Result<Incoming<'a>, FrameError> {
        let mut r = Reader::new(frame);
        if self.protocol == Protocol::Hocuspocus {
            if frame == [HP_PING] {
                return Ok(Incoming::Ping);
            }
            if frame == [HP_PONG] {
                return Ok(Incoming::Ignored(u64::from(HP_PONG)));
            }
            if r.read_var_string()? != self.doc {
                return Ok(Incoming::OtherDocument);
            }
        }
        let ty = r.read_var_uint()?;
        match (self.protocol, ty) {
            (_, MSG_SYNC) | (Protocol::Hocuspocus, HP_SYNC_REPLY) => {
                let subtype = r.read_var_uint()?;
                let payload = r.read_var_bytes()?;
                match subtype {
                    SYNC_STEP1 => Ok(Incoming::SyncStep1(payload)),
                    SYNC_STEP2 => Ok(Incoming::SyncStep2(payload)),
                    SYNC_UPDATE => Ok(Incoming::Update(payload)),
                    _ => Err(FrameError("unknown sync subtype")),
                }
            }
            (_, MSG_AWARENESS) => {
                r.read_var_bytes()?;
                Ok(Incoming::Awareness)
            }
            (_, MSG_QUERY_AWARENESS) => Ok(Incoming::QueryAwareness),
            (Protocol::YWebsocket, MSG_AUTH) => {
                let _denied = r.read_var_uint()?;
                Ok(Incoming::AuthDenied(r.read_var_string().unwrap_or("").to_owned()))
            }
            (Protocol::Hocuspocus, MSG_AUTH) => match r.read_var_uint()? {
                0 => Ok(Incoming::AuthRequested),
                1 => Ok(Incoming::AuthDenied(r.read_var_string().unwrap_or("").to_owned())),
                2 => Ok(Incoming::AuthOk),
                _ => Err(FrameError("unknown auth subtype")),
            },
            (Protocol::Hocuspocus, HP_SYNC_STATUS) => Ok(Incoming::SyncStatus(r.read_var_uint()? == 1)),
            (Protocol::Hocuspocus, HP_CLOSE) => Ok(Incoming::Close),
            (Protocol::Hocuspocus, HP_STATELESS) => Ok(Incoming::Ignored(ty)),
            (_, other) => Ok(Incoming::Ignored(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varuint_roundtrip() {
        for v in [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX] {
            let mut buf = Vec::new();
            write_var_uint(&mut buf, v);
            assert_eq!(Reader::new(&buf).read_var_uint().unwrap(), v);
        }
        let mut buf = Vec::new();
        write_var_uint(&mut buf, 128);
        assert_eq!(buf, [0x80, 0x01]);
    }

    #[test]
    fn y_websocket_frames_match_the_spec_examples() {
        let f = Framer::new(Protocol::YWebsocket, "doc");
        assert_eq!(f.sync_step1(EMPTY_STATE_VECTOR), [0, 0, 1, 0]);
        assert_eq!(f.sync_step2(EMPTY_UPDATE), [0, 1, 2, 0, 0]);
        assert_eq!(f.parse(&[0, 1, 2, 0, 0]).unwrap(), Incoming::SyncStep2(&[0, 0]));
        assert_eq!(f.parse(&[1, 1, 0]).unwrap(), Incoming::Awareness);
    }

    #[test]
    fn hocuspocus_frames_carry_the_document_name() {
        let f = Framer::new(Protocol::Hocuspocus, "d");
        let opening = f.opening(EMPTY_STATE_VECTOR, "");
        assert_eq!(opening[0], [1, b'd', 2, 0, 0]);
        assert_eq!(opening[1], [1, b'd', 0, 0, 1, 0]);
        assert_eq!(f.parse(&[1, b'd', 8, 1]).unwrap(), Incoming::SyncStatus(true));
        assert_eq!(f.parse(&[1, b'd', 4, 0, 1, 0]).unwrap(), Incoming::SyncStep1(&[0]));
        assert_eq!(f.parse(&[1, b'e', 8, 1]).unwrap(), Incoming::OtherDocument);
        assert_eq!(f.parse(&[9]).unwrap(), Incoming::Ping);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let f = Framer::new(Protocol::YWebsocket, "doc");
        for bad in [&[][..], &[0x80], &[0, 1, 5, 0], &[0, 9, 0], &[0xff; 11]] {
            assert!(f.parse(bad).is_err(), "{bad:?}");
        }
        let h = Framer::new(Protocol::Hocuspocus, "doc");
        assert!(h.parse(&[5, b'a']).is_err());
    }
}
