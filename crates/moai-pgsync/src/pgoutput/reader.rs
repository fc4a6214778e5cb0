//! Bounds-checked big-endian cursor over one pgoutput message.
//!
//! All reads go through here so there is exactly one place that can get bounds wrong; every
//! method returns `DecodeError::Truncated` rather than indexing past the end.

use super::error::DecodeError;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated { offset: self.pos, needed: n - self.remaining().min(n) })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// A NUL-terminated string. Names are identifiers in the server encoding; we require UTF-8
    /// (the only encoding moai supports) rather than guessing.
    pub(crate) fn cstr(&mut self) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = &self.buf[self.pos..];
        let nul = rest.iter().position(|&b| b == 0).ok_or(DecodeError::UnterminatedString { offset: start })?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::InvalidUtf8 { offset: start })?.to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// A signed 32-bit length followed by that many bytes.
    pub(crate) fn len_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let at = self.pos;
        let len = self.i32()?;
        let len =
            usize::try_from(len).map_err(|_| DecodeError::NegativeCount { what, value: i64::from(len), offset: at })?;
        self.bytes(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_big_endian_and_reports_truncation() {
        let mut r = Reader::new(&[0x00, 0x01, 0xff, 0xff, 0xff, 0xfe]);
        assert_eq!(r.i16().unwrap(), 1);
        assert_eq!(r.i32().unwrap(), -2);
        assert_eq!(r.u8(), Err(DecodeError::Truncated { offset: 6, needed: 1 }));

        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u64(), Err(DecodeError::Truncated { offset: 0, needed: 5 }));
        // A failed read consumes nothing.
        assert_eq!(r.offset(), 0);
    }

    #[test]
    fn cstr_requires_terminator_and_utf8() {
        assert_eq!(Reader::new(b"abc\0x").cstr().unwrap(), "abc");
        assert_eq!(Reader::new(b"abc").cstr(), Err(DecodeError::UnterminatedString { offset: 0 }));
        assert_eq!(Reader::new(b"\xff\0").cstr(), Err(DecodeError::InvalidUtf8 { offset: 0 }));
    }

    #[test]
    fn len_prefixed_rejects_negative_and_huge_lengths() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(r.len_prefixed("len"), Err(DecodeError::NegativeCount { .. })));
        let mut r = Reader::new(&[0x7f, 0xff, 0xff, 0xff, 1]);
        assert!(matches!(r.len_prefixed("len"), Err(DecodeError::Truncated { .. })));
        let mut r = Reader::new(&[0, 0, 0, 2, 9, 8, 7]);
        assert_eq!(r.len_prefixed("len").unwrap(), &[9, 8]);
        assert_eq!(r.remaining(), 1);
    }
}
