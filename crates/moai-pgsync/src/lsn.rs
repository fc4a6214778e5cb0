//! Postgres log sequence numbers.
//!
//! Every position the engine hands out or accepts is anchored on an LSN, and clients see it as
//! Postgres' own `X/Y` text (two hex halves of a 64-bit WAL address). Parsing is strict because
//! LSNs arrive from untrusted clients and a lenient parser would silently move someone's position.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A WAL position. Ordered like `pg_lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    pub fn as_u64(self) -> u64 {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsnParseError {
    #[error("LSN must have the form X/Y (hex halves), got {0:?}")]
    Malformed(String),
    #[error("LSN half {0:?} is not 1-8 hex digits")]
    BadHalf(String),
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| LsnParseError::Malformed(s.to_owned()))?;
        Ok(Lsn((parse_half(hi)? << 32) | parse_half(lo)?))
    }
}

/// Postgres prints each half as up to 8 hex digits. `u32::from_str_radix` alone would accept a
/// leading `+`, so the digits are checked first.
fn parse_half(half: &str) -> Result<u64, LsnParseError> {
    if half.is_empty() || half.len() > 8 || !half.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(LsnParseError::BadHalf(half.to_owned()));
    }
    u32::from_str_radix(half, 16).map(u64::from).map_err(|_| LsnParseError::BadHalf(half.to_owned()))
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Same spelling as Postgres' pg_lsn output: upper-case hex, no padding.
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_postgres_form() {
        let lsn: Lsn = "0/16B3748".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16B3748));
        assert_eq!(lsn.to_string(), "0/16B3748");
        let big: Lsn = "1A/ff".parse().unwrap();
        assert_eq!(big, Lsn((0x1A << 32) | 0xFF));
        assert_eq!(big.to_string(), "1A/FF");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            "g/0",
            "0/+1",
            "+0/1",
            "-1/0",
            " 0/1",
            "0/1 ",
            "123456789/0",
            "0/123456789",
            "0x1/0",
            "0/1.5",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn orders_numerically_not_textually() {
        let a: Lsn = "0/FFFFFFFF".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert!(a < b);
        let c: Lsn = "0/9".parse().unwrap();
        let d: Lsn = "0/10".parse().unwrap();
        assert!(c < d);
    }

    #[test]
    fn serde_uses_text_form_and_rejects_garbage() {
        let json = serde_json::to_string(&Lsn(0x1_0000_00A0)).unwrap();
        assert_eq!(json, "\"1/A0\"");
        assert_eq!(serde_json::from_str::<Lsn>("\"1/A0\"").unwrap(), Lsn(0x1_0000_00A0));
        assert!(serde_json::from_str::<Lsn>("\"zz\"").is_err());
        assert!(serde_json::from_str::<Lsn>("12").is_err());
    }
}
