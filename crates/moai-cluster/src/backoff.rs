//! Pacing of reconnection attempts to Redis: twice as long after each failure up to a cap, with
//! jitter, so the instances of a cluster that all lost Redis do not come back in lockstep.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Option<Duration>,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), current: None }
    }

    /// An attempt failed: the pause before the next one.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let next = self.current.map_or(self.min, |d| d.saturating_mul(2).min(self.max));
        self.current = Some(next);
        // Between half and all of it.
        let mut h = RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        let fraction = (h.finish() % 1024) as u32;
        next / 2 + (next / 2) * fraction / 1023
    }

    pub(crate) fn reset(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let pauses: Vec<_> = (0..6).map(|_| b.next_pause()).collect();
        let caps = [100, 200, 400, 800, 800, 800];
        for (p, cap) in pauses.iter().zip(caps) {
            assert!(*p <= Duration::from_millis(cap) && *p >= Duration::from_millis(cap / 2), "{p:?} vs {cap}");
        }
        b.reset();
        assert!(b.next_pause() <= Duration::from_millis(100));
    }
}
