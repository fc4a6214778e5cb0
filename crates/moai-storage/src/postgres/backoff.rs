//! Pacing of reconnection attempts: after a failed attempt the writer waits before the next one,
//! twice as long each time up to a cap, with jitter so that several instances that lost the same
//! server do not reconnect in lockstep.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio::time::Instant;

pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    /// The pause after the last failure (`None`: the last attempt succeeded).
    current: Option<Duration>,
    next_attempt: Option<Instant>,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), current: None, next_attempt: None }
    }

    /// Waits until the next attempt is due (at once after a success).
    pub(super) async fn wait(&self) {
        if let Some(at) = self.next_attempt {
            tokio::time::sleep_until(at).await;
        }
    }

    /// An attempt failed: the next one waits longer. Returns the pause.
    pub(super) fn failed(&mut self) -> Duration {
        let next = match self.current {
            None => self.min,
            Some(d) => d.saturating_mul(2).min(self.max),
        };
        self.current = Some(next);
        let pause = jitter(next);
        self.next_attempt = Some(Instant::now() + pause);
        pause
    }

    pub(super) fn succeeded(&mut self) {
        self.current = None;
        self.next_attempt = None;
    }
}

/// A pause between half and all of `d`, drawn from the process's random hash keys.
fn jitter(d: Duration) -> Duration {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    let fraction = (h.finish() % 1024) as u32; // 0..1023
    d / 2 + (d / 2) * fraction / 1023
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut nominal = Duration::from_millis(50);
        for _ in 0..12 {
            let pause = b.failed();
            assert!(pause >= nominal / 2 && pause <= nominal, "{pause:?} for {nominal:?}");
            nominal = (nominal * 2).min(Duration::from_secs(5));
        }
        assert_eq!(b.current, Some(Duration::from_secs(5)));
        b.succeeded();
        assert!(b.next_attempt.is_none());
        assert!(b.failed() <= Duration::from_millis(50));
    }
}
