//! lib0 primitive encodings (varuint, length-prefixed bytes, strings) used by every y-websocket
//! message. Kept separate so the bounds checks that protect us from untrusted input live in one
//! place: every read is checked against the remaining buffer before slicing, so a hostile length
//! can never cause an allocation or an out-of-bounds panic.

use thiserror::Error;

/// Why a frame or payload could not be decoded. Every variant is caused by the peer's bytes,
/// never by a bug on our side.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("unexpected end of input")]
    UnexpectedEnd,
    #[error("varuint does not fit in 64 bits")]
    VarUintOverflow,
    #[error("declared length {declared} exceeds the {remaining} remaining bytes")]
    LengthOutOfBounds { declared: u64, remaining: usize },
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("unknown sync message subtype {0}")]
    UnknownSyncSubtype(u64),
    #[error("awareness state of client {client_id} is not valid JSON")]
    InvalidAwarenessJson { client_id: u64 },
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
}

/// Cursor over an untrusted byte slice. Borrowed results point into the input, so decoding a
/// multi-megabyte SyncStep2 does not copy it.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Everything not consumed yet; consumes it.
    pub(crate) fn take_rest(&mut self) -> &'a [u8] {
        let rest = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        rest
    }

    /// Unsigned LEB128. Rejects encodings that would overflow u64 instead of silently wrapping,
    /// so two different byte strings never decode to the same client id or clock.
    pub(crate) fn read_var_u64(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        let mut shift: u32 = 0;
        loop {
            let byte = *self.buf.get(self.pos).ok_or(DecodeError::UnexpectedEnd)?;
            self.pos += 1;
            let bits = u64::from(byte & 0x7f);
            // The 10th byte may only carry the single remaining bit of a u64.
            if shift == 63 && bits > 1 {
                return Err(DecodeError::VarUintOverflow);
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
            if shift > 63 {
                return Err(DecodeError::VarUintOverflow);
            }
        }
    }

    /// One raw byte.
    pub(crate) fn read_u8(&mut self) -> Result<u8, DecodeError> {
        let byte = *self.buf.get(self.pos).ok_or(DecodeError::UnexpectedEnd)?;
        self.pos += 1;
        Ok(byte)
    }

    /// Skips `n` raw bytes.
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::UnexpectedEnd);
        }
        self.pos += n;
        Ok(())
    }

    /// varuint8array: length, then that many raw bytes.
    pub(crate) fn read_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let declared = self.read_var_u64()?;
        let remaining = self.remaining();
        let len = usize::try_from(declared)
            .ok()
            .filter(|len| *len <= remaining)
            .ok_or(DecodeError::LengthOutOfBounds { declared, remaining })?;
        let start = self.pos;
        self.pos += len;
        Ok(&self.buf[start..start + len])
    }

    /// varstring: varuint8array holding UTF-8.
    pub(crate) fn read_str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.read_bytes()?).map_err(|_| DecodeError::InvalidUtf8)
    }
}

pub(crate) fn write_var_u64(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(crate) fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_var_u64(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        write_var_u64(&mut out, v);
        out
    }

    #[test]
    fn varuint_matches_lib0_examples() {
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
    }

    #[test]
    fn varuint_round_trips_edges() {
        for v in [0, 1, 127, 128, 16383, 16384, u32::MAX as u64, (1 << 53) - 1, u64::MAX] {
            let bytes = enc(v);
            let mut r = Reader::new(&bytes);
            assert_eq!(r.read_var_u64(), Ok(v));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn truncated_varuint_is_an_error() {
        assert_eq!(Reader::new(&[]).read_var_u64(), Err(DecodeError::UnexpectedEnd));
        assert_eq!(Reader::new(&[0x80]).read_var_u64(), Err(DecodeError::UnexpectedEnd));
        assert_eq!(Reader::new(&[0xff, 0xff]).read_var_u64(), Err(DecodeError::UnexpectedEnd));
    }

    #[test]
    fn overlong_varuint_is_rejected() {
        // u64::MAX is 9 × 0xff then 0x01; a 0x02 in the last byte would need a 65th bit.
        let mut bytes = vec![0xff; 9];
        bytes.push(0x02);
        assert_eq!(Reader::new(&bytes).read_var_u64(), Err(DecodeError::VarUintOverflow));
        // Eleven continuation bytes never terminate within 64 bits.
        assert_eq!(Reader::new(&[0x80; 11]).read_var_u64(), Err(DecodeError::VarUintOverflow));
    }

    #[test]
    fn length_past_the_end_is_rejected_without_allocating() {
        let mut huge = Vec::new();
        write_var_u64(&mut huge, u64::MAX);
        huge.extend_from_slice(b"abc");
        assert_eq!(
            Reader::new(&huge).read_bytes(),
            Err(DecodeError::LengthOutOfBounds { declared: u64::MAX, remaining: 3 })
        );
        assert_eq!(
            Reader::new(&[0x04, 1, 2, 3]).read_bytes(),
            Err(DecodeError::LengthOutOfBounds { declared: 4, remaining: 3 })
        );
    }

    #[test]
    fn invalid_utf8_string_is_rejected() {
        assert_eq!(Reader::new(&[0x02, 0xc3, 0x28]).read_str(), Err(DecodeError::InvalidUtf8));
        assert_eq!(Reader::new(&[0x02, b'h', b'i']).read_str(), Ok("hi"));
    }
}
