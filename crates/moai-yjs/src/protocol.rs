//! y-websocket message framing: `varuint type` + body, one message per WebSocket binary frame.
//!
//! Decoding borrows from the frame (a SyncStep2 can be megabytes) and never panics; anything we
//! cannot parse is a typed [`DecodeError`]. Unknown top-level types decode to
//! [`Message::Unknown`] instead of failing, because the JS client also logs and continues on
//! them and the edge wants to count, not disconnect.
//!
//! Outgoing frames always contain exactly one message: the JS client reads only the first
//! message of a frame, so concatenating (as yrs' `Protocol::start` does) silently loses data.

use crate::lib0::{write_bytes, write_var_u64, DecodeError, Reader};

pub const MSG_SYNC: u64 = 0;
pub const MSG_AWARENESS: u64 = 1;
pub const MSG_AUTH: u64 = 2;
pub const MSG_QUERY_AWARENESS: u64 = 3;

pub const SYNC_STEP1: u64 = 0;
pub const SYNC_STEP2: u64 = 1;
pub const SYNC_UPDATE: u64 = 2;

const AUTH_PERMISSION_DENIED: u64 = 0;

/// Empty awareness update (`n = 0`). Harmless to every client, and it counts as "a message"
/// for y-websocket's 30 s silence timer, so the edge sends it to idle sockets (docs/protocols/yjs.md §5).
pub const KEEPALIVE_FRAME: [u8; 3] = [0x01, 0x01, 0x00];

/// One decoded message. Payloads borrow from the frame they were decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Sync(SyncMessage<'a>),
    /// Encoded awareness update (see [`crate::awareness::AwarenessUpdate`]).
    Awareness(&'a [u8]),
    Auth(AuthMessage<'a>),
    QueryAwareness,
    /// A top-level type we do not know; its body is the rest of the frame and is skipped.
    Unknown(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncMessage<'a> {
    /// Payload: the sender's encoded state vector (v1).
    Step1(&'a [u8]),
    /// Payload: a v1 update with everything the receiver's state vector lacked.
    Step2(&'a [u8]),
    /// Payload: an incremental v1 update.
    Update(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMessage<'a> {
    PermissionDenied {
        reason: &'a str,
    },
    /// Any other auth subtype (yrs sends `1` for "granted"); JS ignores these, so do we.
    Other(u64),
}

impl<'a> Message<'a> {
    /// Decodes exactly one message occupying the whole frame. Trailing bytes are an error: a
    /// well-formed y-websocket peer never sends them, and accepting them would hide a second
    /// message that we would then silently drop. Use [`MessageReader`] for peers that pack
    /// several messages into one frame.
    pub fn decode(frame: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(frame);
        let msg = read_message(&mut reader)?;
        match reader.remaining() {
            0 => Ok(msg),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    /// Encodes this message as one frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.payload_len());
        match self {
            Message::Sync(sync) => {
                write_var_u64(&mut out, MSG_SYNC);
                let (subtype, payload) = match sync {
                    SyncMessage::Step1(p) => (SYNC_STEP1, p),
                    SyncMessage::Step2(p) => (SYNC_STEP2, p),
                    SyncMessage::Update(p) => (SYNC_UPDATE, p),
                };
                write_var_u64(&mut out, subtype);
                write_bytes(&mut out, payload);
            }
            Message::Awareness(update) => {
                write_var_u64(&mut out, MSG_AWARENESS);
                write_bytes(&mut out, update);
            }
            Message::Auth(AuthMessage::PermissionDenied { reason }) => {
                write_var_u64(&mut out, MSG_AUTH);
                write_var_u64(&mut out, AUTH_PERMISSION_DENIED);
                write_bytes(&mut out, reason.as_bytes());
            }
            Message::Auth(AuthMessage::Other(subtype)) => {
                write_var_u64(&mut out, MSG_AUTH);
                write_var_u64(&mut out, *subtype);
            }
            Message::QueryAwareness => write_var_u64(&mut out, MSG_QUERY_AWARENESS),
            Message::Unknown(tag) => write_var_u64(&mut out, *tag),
        }
        out
    }

    fn payload_len(&self) -> usize {
        match self {
            Message::Sync(SyncMessage::Step1(p))
            | Message::Sync(SyncMessage::Step2(p))
            | Message::Sync(SyncMessage::Update(p))
            | Message::Awareness(p) => p.len(),
            Message::Auth(AuthMessage::PermissionDenied { reason }) => reason.len(),
            _ => 0,
        }
    }
}

/// Iterates the messages of a frame that may hold several (yrs-based peers concatenate
/// SyncStep1 and awareness). Stops after the first error, since the remaining bytes can no
/// longer be delimited; a [`Message::Unknown`] also ends the frame for the same reason.
pub struct MessageReader<'a> {
    reader: Reader<'a>,
    done: bool,
}

impl<'a> MessageReader<'a> {
    pub fn new(frame: &'a [u8]) -> Self {
        MessageReader { reader: Reader::new(frame), done: false }
    }
}

impl<'a> Iterator for MessageReader<'a> {
    type Item = Result<Message<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.reader.is_empty() {
            return None;
        }
        let item = read_message(&mut self.reader);
        if item.is_err() {
            self.done = true;
        }
        Some(item)
    }
}

fn read_message<'a>(reader: &mut Reader<'a>) -> Result<Message<'a>, DecodeError> {
    match reader.read_var_u64()? {
        MSG_SYNC => {
            let subtype = reader.read_var_u64()?;
            let payload = reader.read_bytes()?;
            match subtype {
                SYNC_STEP1 => Ok(Message::Sync(SyncMessage::Step1(payload))),
                SYNC_STEP2 => Ok(Message::Sync(SyncMessage::Step2(payload))),
                SYNC_UPDATE => Ok(Message::Sync(SyncMessage::Update(payload))),
                other => Err(DecodeError::UnknownSyncSubtype(other)),
            }
        }
        MSG_AWARENESS => Ok(Message::Awareness(reader.read_bytes()?)),
        MSG_AUTH => match reader.read_var_u64()? {
            AUTH_PERMISSION_DENIED => Ok(Message::Auth(AuthMessage::PermissionDenied { reason: reader.read_str()? })),
            other => {
                // Body layout of other subtypes is not specified; skip it.
                reader.take_rest();
                Ok(Message::Auth(AuthMessage::Other(other)))
            }
        },
        MSG_QUERY_AWARENESS => Ok(Message::QueryAwareness),
        other => {
            reader.take_rest();
            Ok(Message::Unknown(other))
        }
    }
}

/// Frame helpers for the messages the server sends.
pub fn sync_step1_frame(state_vector: &[u8]) -> Vec<u8> {
    Message::Sync(SyncMessage::Step1(state_vector)).encode()
}

pub fn sync_step2_frame(update: &[u8]) -> Vec<u8> {
    Message::Sync(SyncMessage::Step2(update)).encode()
}

pub fn sync_update_frame(update: &[u8]) -> Vec<u8> {
    Message::Sync(SyncMessage::Update(update)).encode()
}

pub fn awareness_frame(awareness_update: &[u8]) -> Vec<u8> {
    Message::Awareness(awareness_update).encode()
}

pub fn permission_denied_frame(reason: &str) -> Vec<u8> {
    Message::Auth(AuthMessage::PermissionDenied { reason }).encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::XorShift;

    #[test]
    fn spec_byte_examples() {
        // Fresh client's SyncStep1, the reply for an empty doc, and the keepalive (docs/protocols/yjs.md §2.5).
        assert_eq!(sync_step1_frame(&[0x00]), [0x00, 0x00, 0x01, 0x00]);
        assert_eq!(sync_step2_frame(&[0x00, 0x00]), [0x00, 0x01, 0x02, 0x00, 0x00]);
        assert_eq!(Message::decode(&KEEPALIVE_FRAME), Ok(Message::Awareness(&[0x00])));
        assert_eq!(awareness_frame(&[0x00]), KEEPALIVE_FRAME);
        assert_eq!(Message::decode(&[0x03]), Ok(Message::QueryAwareness));
    }

    #[test]
    fn every_variant_round_trips() {
        let big = vec![7u8; 300]; // length needs a two-byte varuint
        let msgs = [
            Message::Sync(SyncMessage::Step1(&[0x00])),
            Message::Sync(SyncMessage::Step2(&big)),
            Message::Sync(SyncMessage::Update(&[1, 2, 3])),
            Message::Awareness(&[0x00]),
            Message::Auth(AuthMessage::PermissionDenied { reason: "nope ✋" }),
            Message::QueryAwareness,
        ];
        for msg in msgs {
            let frame = msg.encode();
            assert_eq!(Message::decode(&frame), Ok(msg.clone()), "frame {frame:?}");
        }
    }

    #[test]
    fn unknown_types_are_reported_not_failed() {
        assert_eq!(Message::decode(&[0x64, 1, 2, 3]), Ok(Message::Unknown(100)));
        assert_eq!(Message::decode(&[0x80, 0x01]), Ok(Message::Unknown(128)));
        assert_eq!(Message::decode(&[0x02, 0x01]), Ok(Message::Auth(AuthMessage::Other(1))));
    }

    #[test]
    fn malformed_frames_are_typed_errors() {
        assert_eq!(Message::decode(&[]), Err(DecodeError::UnexpectedEnd));
        // sync without subtype / without payload length / payload cut short
        assert_eq!(Message::decode(&[0x00]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(Message::decode(&[0x00, 0x02]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(
            Message::decode(&[0x00, 0x02, 0x05, 1, 2]),
            Err(DecodeError::LengthOutOfBounds { declared: 5, remaining: 2 })
        );
        // huge declared length (2^63) must not allocate or panic
        let mut huge = vec![0x01];
        write_var_u64(&mut huge, 1 << 63);
        assert!(matches!(Message::decode(&huge), Err(DecodeError::LengthOutOfBounds { .. })));
        assert_eq!(Message::decode(&[0x00, 0x03, 0x00]), Err(DecodeError::UnknownSyncSubtype(3)));
        assert_eq!(Message::decode(&[0x01, 0x01, 0x00, 0x00]), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(Message::decode(&[0x02, 0x00, 0x01, 0xff]), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn reader_splits_concatenated_messages() {
        let mut frame = sync_step1_frame(&[0x00]);
        frame.extend_from_slice(&KEEPALIVE_FRAME);
        frame.push(MSG_QUERY_AWARENESS as u8);
        let msgs: Vec<_> = MessageReader::new(&frame).collect();
        assert_eq!(
            msgs,
            vec![
                Ok(Message::Sync(SyncMessage::Step1(&[0x00]))),
                Ok(Message::Awareness(&[0x00])),
                Ok(Message::QueryAwareness),
            ]
        );
        // An error ends iteration instead of resynchronising on garbage.
        let msgs: Vec<_> = MessageReader::new(&[0x01, 0x05, 0x00, 0x03]).collect();
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].is_err());
    }

    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut rng = XorShift::new(0x5eed_0001);
        let seeds: Vec<Vec<u8>> = vec![
            sync_step1_frame(&[0x01, 0x05, 0x03]),
            sync_update_frame(&[0x01, 0x02, 0x03, 0x04]),
            awareness_frame(&[0x01, 0x07, 0x01, 0x02, b'{', b'}']),
            permission_denied_frame("denied"),
        ];
        for i in 0..20_000 {
            let frame = if i % 2 == 0 {
                let len = rng.below(24);
                rng.bytes(len)
            } else {
                let seed = rng.below(seeds.len());
                rng.mutate(&seeds[seed])
            };
            // Whatever happens, it must be a value, and whatever we accepted must survive our
            // own re-encoding unchanged (varuints may be non-canonical, so compare messages).
            if let Ok(msg) = Message::decode(&frame) {
                assert_eq!(Message::decode(&msg.encode()), Ok(msg));
            }
            for item in MessageReader::new(&frame) {
                let _ = item;
            }
        }
    }
}
