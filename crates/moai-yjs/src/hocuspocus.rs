//! The Hocuspocus wire format (docs/protocols/hocuspocus.md), sans-IO.
//!
//! A Hocuspocus frame is `varstring address` + `varuint type` + body. The address names the
//! document (`@hocuspocus/provider` 4 may append `\0` and a session id, so that two providers of
//! one document can share a socket); every reply carries the address it answers. Types 0–3 have
//! exactly the y-websocket bodies, so what follows the address is what a [`crate::Room`] speaks
//! (plus [`MSG_STATELESS`] and [`MSG_SYNC_STATUS`], which the room uses only with connections
//! joined as [`crate::Dialect::Hocuspocus`]). The rest (auth, close, ping/pong) is handled at the
//! edge with the helpers here.
//!
//! Decoding borrows from the frame and never panics: anything we cannot parse is a typed
//! [`DecodeError`].

use crate::lib0::{write_bytes, write_var_u64, DecodeError, Reader};

pub const MSG_SYNC: u64 = 0;
pub const MSG_AWARENESS: u64 = 1;
pub const MSG_AUTH: u64 = 2;
pub const MSG_QUERY_AWARENESS: u64 = 3;
/// A sync message that must not be answered with another SyncStep1 (server to server).
pub const MSG_SYNC_REPLY: u64 = 4;
/// A string for the application: client → server (Hocuspocus' `onStateless` hook) and server →
/// client (the provider's `stateless` event).
pub const MSG_STATELESS: u64 = 5;
/// Hocuspocus' server-internal fan-out of a stateless message; a client must not send it.
pub const MSG_BROADCAST_STATELESS: u64 = 6;
/// The document's connection ends (client: the provider detached; server: with a reason).
pub const MSG_CLOSE: u64 = 7;
/// Acknowledges one document update: `1` applied (for moai: durable), `0` refused.
pub const MSG_SYNC_STATUS: u64 = 8;
/// Connection-level ping and pong of provider 4: one byte, no address.
pub const MSG_PING: u8 = 9;
pub const MSG_PONG: u8 = 10;

/// Auth subtypes. Client → server: the token. Server → client: a token request (same subtype,
/// no body), permission denied with a reason, authenticated with a scope.
pub const AUTH_TOKEN: u64 = 0;
pub const AUTH_PERMISSION_DENIED: u64 = 1;
pub const AUTH_AUTHENTICATED: u64 = 2;

/// The scope strings of the authenticated message (the provider's `authorizedScope`).
pub const SCOPE_READ_WRITE: &str = "read-write";
pub const SCOPE_READ_ONLY: &str = "readonly";

/// Separates the document name from a provider's session id in an address.
pub const SESSION_SEPARATOR: char = '\0';

/// One frame from a Hocuspocus client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    /// The provider's answer to a connection-level ping (provider 4).
    Pong,
    /// A message about one document.
    Addressed { address: &'a str, message: ClientMessage<'a> },
}

/// What a client says about one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// A message for the document's room, from its type on: sync (0), awareness (1), query
    /// awareness (3) or stateless (5). Bytes are not checked further here; the room does that.
    Room(&'a [u8]),
    /// A sync message sent as [`MSG_SYNC_REPLY`]; `body` is the sync subtype and payload, to be
    /// handed to the room behind a [`MSG_SYNC`] type.
    SyncReply { body: &'a [u8] },
    /// The token for this document. Provider 4 appends its version.
    Token { token: &'a str, provider_version: Option<&'a str> },
    /// Another auth subtype (only servers send them); ignored.
    OtherAuth(u64),
    /// The provider detached from this document.
    Close,
    /// A type we do not know, or one a client must not send ([`MSG_BROADCAST_STATELESS`],
    /// [`MSG_SYNC_STATUS`]); ignored and counted.
    Unknown(u64),
}

impl<'a> ClientFrame<'a> {
    /// Decodes one client frame. Never panics.
    pub fn decode(frame: &'a [u8]) -> Result<Self, DecodeError> {
        if frame == [MSG_PONG] {
            return Ok(ClientFrame::Pong);
        }
        let mut reader = Reader::new(frame);
        let address = reader.read_str()?;
        let body = reader.take_rest();
        Ok(ClientFrame::Addressed { address, message: ClientMessage::decode(body)? })
    }
}

impl<'a> ClientMessage<'a> {
    /// Decodes what follows the address.
    fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(body);
        let kind = reader.read_var_u64()?;
        Ok(match kind {
            MSG_SYNC | MSG_AWARENESS | MSG_QUERY_AWARENESS | MSG_STATELESS => ClientMessage::Room(body),
            MSG_SYNC_REPLY => ClientMessage::SyncReply { body: reader.take_rest() },
            MSG_AUTH => match reader.read_var_u64()? {
                AUTH_TOKEN => {
                    let token = reader.read_str()?;
                    // Provider 4 appends its version; older ones end here.
                    let provider_version = if reader.is_empty() { None } else { Some(reader.read_str()?) };
                    ClientMessage::Token { token, provider_version }
                }
                other => ClientMessage::OtherAuth(other),
            },
            MSG_CLOSE => ClientMessage::Close,
            other => ClientMessage::Unknown(other),
        })
    }
}

/// The document name of an address (the part before a provider 4 session id).
pub fn document_name(address: &str) -> &str {
    address.split_once(SESSION_SEPARATOR).map_or(address, |(doc, _)| doc)
}

/// The address as the varstring every frame about it starts with.
pub fn address_prefix(address: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(address.len() + 2);
    write_bytes(&mut out, address.as_bytes());
    out
}

/// `prefix` (from [`address_prefix`]) followed by `message` (a room message, from its type on).
pub fn frame(prefix: &[u8], message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + message.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(message);
    out
}

/// "Authenticated": the document is open with this scope.
pub fn authenticated_frame(address: &str, read_only: bool) -> Vec<u8> {
    let mut out = address_prefix(address);
    write_var_u64(&mut out, MSG_AUTH);
    write_var_u64(&mut out, AUTH_AUTHENTICATED);
    write_bytes(&mut out, if read_only { SCOPE_READ_ONLY } else { SCOPE_READ_WRITE }.as_bytes());
    out
}

/// "Permission denied" with a reason: the provider emits `authenticationFailed` and stays
/// connected without reconnecting.
pub fn permission_denied_frame(address: &str, reason: &str) -> Vec<u8> {
    let mut out = address_prefix(address);
    write_var_u64(&mut out, MSG_AUTH);
    write_var_u64(&mut out, AUTH_PERMISSION_DENIED);
    write_bytes(&mut out, reason.as_bytes());
    out
}

/// Asks the provider for its token again (it answers with a token message, calling its token
/// function if it has one).
pub fn token_request_frame(address: &str) -> Vec<u8> {
    let mut out = address_prefix(address);
    write_var_u64(&mut out, MSG_AUTH);
    write_var_u64(&mut out, AUTH_TOKEN);
    out
}

/// The server ends this document's connection (the socket stays open for the others).
pub fn close_frame(address: &str, reason: &str) -> Vec<u8> {
    let mut out = address_prefix(address);
    write_var_u64(&mut out, MSG_CLOSE);
    write_bytes(&mut out, reason.as_bytes());
    out
}

/// The room message acknowledging one update (`applied`: it is durable).
pub fn sync_status_message(applied: bool) -> Vec<u8> {
    vec![MSG_SYNC_STATUS as u8, u8::from(applied)]
}

/// The room message carrying a stateless payload.
pub fn stateless_message(payload: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 6);
    write_var_u64(&mut out, MSG_STATELESS);
    write_bytes(&mut out, payload.as_bytes());
    out
}

/// If `message` (a room message, from its type on) is a stateless message, its payload.
pub fn stateless_payload(message: &[u8]) -> Option<Result<&str, DecodeError>> {
    let mut reader = Reader::new(message);
    if reader.read_var_u64().ok()? != MSG_STATELESS {
        return None;
    }
    Some(reader.read_str().and_then(|payload| match reader.remaining() {
        0 => Ok(payload),
        n => Err(DecodeError::TrailingBytes(n)),
    }))
}

/// The room message with an update's acknowledgement, if `message` is one; for tests and tools.
pub fn sync_status_of(message: &[u8]) -> Option<bool> {
    let mut reader = Reader::new(message);
    if reader.read_var_u64().ok()? != MSG_SYNC_STATUS {
        return None;
    }
    reader.read_var_u64().ok().map(|v| v == 1)
}

/// The address and the rest of a server frame; for tests and tools that read what moai sends.
pub fn split_server_frame(frame: &[u8]) -> Result<(&str, &[u8]), DecodeError> {
    let mut reader = Reader::new(frame);
    let address = reader.read_str()?;
    Ok((address, reader.take_rest()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::XorShift;

    fn client_frame(address: &str, message: &[u8]) -> Vec<u8> {
        frame(&address_prefix(address), message)
    }

    fn token_frame(address: &str, token: &str, version: Option<&str>) -> Vec<u8> {
        let mut out = address_prefix(address);
        write_var_u64(&mut out, MSG_AUTH);
        write_var_u64(&mut out, AUTH_TOKEN);
        write_bytes(&mut out, token.as_bytes());
        if let Some(v) = version {
            write_bytes(&mut out, v.as_bytes());
        }
        out
    }

    #[test]
    fn provider_frames_decode() {
        // What @hocuspocus/provider 3 sends first: "doc", Auth, Token "t".
        assert_eq!(
            ClientFrame::decode(&[3, b'd', b'o', b'c', 2, 0, 1, b't']),
            Ok(ClientFrame::Addressed {
                address: "doc",
                message: ClientMessage::Token { token: "t", provider_version: None }
            })
        );
        // Provider 4 appends its version.
        assert_eq!(
            ClientFrame::decode(&token_frame("doc", "", Some("4.8.0"))),
            Ok(ClientFrame::Addressed {
                address: "doc",
                message: ClientMessage::Token { token: "", provider_version: Some("4.8.0") }
            })
        );
        // SyncStep1 with an empty state vector: the room gets the y-websocket message.
        let step1 = [0u8, 0, 1, 0];
        assert_eq!(
            ClientFrame::decode(&client_frame("doc", &step1)),
            Ok(ClientFrame::Addressed { address: "doc", message: ClientMessage::Room(&step1) })
        );
        let stateless = stateless_message("hi");
        assert_eq!(
            ClientFrame::decode(&client_frame("doc", &stateless)),
            Ok(ClientFrame::Addressed { address: "doc", message: ClientMessage::Room(&stateless) })
        );
        assert_eq!(stateless_payload(&stateless), Some(Ok("hi")));
        assert_eq!(stateless_payload(&step1), None);
        assert_eq!(
            ClientFrame::decode(&client_frame("doc", &[MSG_CLOSE as u8])),
            Ok(ClientFrame::Addressed { address: "doc", message: ClientMessage::Close })
        );
        assert_eq!(
            ClientFrame::decode(&client_frame("doc", &[4, 2, 2, 0, 0])),
            Ok(ClientFrame::Addressed { address: "doc", message: ClientMessage::SyncReply { body: &[2, 2, 0, 0] } })
        );
        assert_eq!(
            ClientFrame::decode(&client_frame("doc", &[6, 1, b'x'])),
            Ok(ClientFrame::Addressed { address: "doc", message: ClientMessage::Unknown(6) })
        );
        assert_eq!(ClientFrame::decode(&[MSG_PONG]), Ok(ClientFrame::Pong));
    }

    #[test]
    fn session_addresses_name_their_document() {
        assert_eq!(document_name("notes"), "notes");
        assert_eq!(document_name("notes\0k3j2"), "notes");
        assert_eq!(document_name("\0x"), "");
    }

    #[test]
    fn server_frames_have_the_provider_layout() {
        assert_eq!(authenticated_frame("d", false), b"\x01d\x02\x02\x0aread-write");
        assert_eq!(authenticated_frame("d", true), b"\x01d\x02\x02\x08readonly");
        assert_eq!(permission_denied_frame("d", "no"), b"\x01d\x02\x01\x02no");
        assert_eq!(token_request_frame("d"), b"\x01d\x02\x00");
        assert_eq!(close_frame("d", "bye"), b"\x01d\x07\x03bye");
        assert_eq!(sync_status_message(true), [8, 1]);
        assert_eq!(sync_status_of(&sync_status_message(false)), Some(false));
        let f = frame(&address_prefix("d"), &sync_status_message(true));
        assert_eq!(split_server_frame(&f), Ok(("d", &[8u8, 1][..])));
    }

    #[test]
    fn malformed_frames_are_typed_errors() {
        assert_eq!(ClientFrame::decode(&[]), Err(DecodeError::UnexpectedEnd));
        // The v4 ping is a server message; from a client it is an address that runs past the end.
        assert!(matches!(ClientFrame::decode(&[MSG_PING]), Err(DecodeError::LengthOutOfBounds { .. })));
        // An address with no message after it.
        assert_eq!(ClientFrame::decode(&[1, b'd']), Err(DecodeError::UnexpectedEnd));
        assert_eq!(ClientFrame::decode(&[1, 0xff, 0]), Err(DecodeError::InvalidUtf8));
        // A token message cut short, or with a bad string.
        assert_eq!(ClientFrame::decode(&[1, b'd', 2]), Err(DecodeError::UnexpectedEnd));
        assert!(ClientFrame::decode(&[1, b'd', 2, 0, 5, b'a']).is_err());
        assert_eq!(stateless_payload(&[5, 1, b'a', 0]), Some(Err(DecodeError::TrailingBytes(1))));
    }

    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut rng = XorShift::new(0x5eed_0008);
        let seeds: Vec<Vec<u8>> = vec![
            token_frame("doc", "u:abc", Some("4.8.0")),
            client_frame("doc\0s1", &[0, 0, 1, 0]),
            client_frame("doc", &stateless_message("payload")),
            client_frame("doc", &[MSG_CLOSE as u8]),
            client_frame("doc", &[4, 1, 2, 0, 0]),
        ];
        for i in 0..20_000 {
            let frame = if i % 2 == 0 {
                let len = rng.below(24);
                rng.bytes(len)
            } else {
                let seed = rng.below(seeds.len());
                rng.mutate(&seeds[seed])
            };
            if let Ok(ClientFrame::Addressed { message: ClientMessage::Room(m), .. }) = ClientFrame::decode(&frame) {
                let _ = stateless_payload(m);
            }
            let _ = split_server_frame(&frame);
            let _ = sync_status_of(&frame);
        }
    }
}
