//! Who an instance is on the bus: a random 64-bit id chosen at start, so a restarted instance
//! is a new one (its old presence expires with its old heartbeat).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// One moai process in the cluster. Shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub u64);

impl InstanceId {
    /// A fresh id, from the process's random hash keys and the clock.
    pub fn random() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        h.write_u32(std::process::id());
        InstanceId(h.finish().max(1))
    }

    /// Parses the 16-hex-digit form written by `Display`.
    pub fn parse(s: &[u8]) -> Option<Self> {
        if s.len() != 16 {
            return None;
        }
        let s = std::str::from_utf8(s).ok()?;
        u64::from_str_radix(s, 16).ok().map(InstanceId)
    }
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_differ() {
        let a = InstanceId::random();
        let b = InstanceId::random();
        assert_ne!(a, b);
        assert_eq!(InstanceId::parse(a.to_string().as_bytes()), Some(a));
        assert_eq!(InstanceId::parse(b"xyz"), None);
        assert_eq!(InstanceId::parse(b"000000000000000g"), None);
    }
}
