//! Reconnect delays: capped exponential backoff with "equal jitter".
//!
//! Without jitter, every client of a restarted server reconnects in lock-step and the server
//! gets the whole fleet's hellos (and snapshots) in the same instant, again and again. With
//! "full jitter" (uniform in `[0, base]`) some clients retry almost at once, which hammers a
//! server that is still starting. Equal jitter, uniform in `[base/2, base]`, spreads the fleet
//! over half the interval and still guarantees a minimum pause. The base doubles from
//! `initial` per failed attempt and is capped at `max`, so the delay never exceeds `max`. A
//! connection that made progress (reached `up_to_date`) resets the schedule.
//!
//! The random source is a small splitmix64 generator seeded per client (time and address of
//! the state), which is plenty for spreading retries and keeps the crate free of `rand`.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { initial: Duration::from_millis(250), max: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        let time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let addr = &cfg as *const BackoffConfig as u64;
        Self::with_seed(cfg, time ^ addr.rotate_left(32))
    }

    /// A deterministic schedule (tests).
    pub fn with_seed(cfg: BackoffConfig, seed: u64) -> Self {
        Backoff { cfg, attempt: 0, rng: seed }
    }

    /// The un-jittered delay of the next attempt: `initial * 2^attempt`, capped at `max`.
    pub fn base(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.cfg.initial.saturating_mul(factor).min(self.cfg.max)
    }

    /// The delay before the next attempt; advances the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base();
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        // Uniform in [half, base]: the jittered part is (base - half) * u, u in [0, 1).
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        half + (base - half).mul_f64(u)
    }

    /// After a connection that made progress.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: BackoffConfig = BackoffConfig { initial: Duration::from_millis(100), max: Duration::from_secs(5) };

    #[test]
    fn delays_grow_exponentially_within_jitter_bounds_and_are_capped() {
        let mut b = Backoff::with_seed(CFG, 42);
        let mut bases = Vec::new();
        for _ in 0..200 {
            let base = b.base();
            let d = b.next_delay();
            assert!(d >= base / 2 && d <= base, "{d:?} outside [{:?}, {base:?}]", base / 2);
            assert!(d <= CFG.max, "never above the cap");
            bases.push(base);
        }
        let ms: Vec<u128> = bases.iter().take(8).map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(bases.windows(2).all(|w| w[0] <= w[1]), "monotonic bases");
        assert!(bases[7..].iter().all(|d| *d == CFG.max), "capped for good (no overflow at high attempts)");
    }

    #[test]
    fn jitter_spreads_clients_and_is_not_constant() {
        // 100 clients at the capped step: delays spread over [max/2, max].
        let delays: Vec<Duration> = (0..100u64)
            .map(|seed| {
                let mut b = Backoff::with_seed(CFG, seed);
                for _ in 0..10 {
                    b.next_delay();
                }
                b.next_delay()
            })
            .collect();
        let min = *delays.iter().min().unwrap();
        let max = *delays.iter().max().unwrap();
        assert!(min >= CFG.max / 2 && max <= CFG.max);
        assert!(max - min > CFG.max / 4, "spread {min:?}..{max:?} too narrow");
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 90, "jittered, not lock-step");
        // One client's consecutive capped delays differ too.
        let mut b = Backoff::with_seed(CFG, 7);
        let seq: Vec<Duration> = (0..20).map(|_| b.next_delay()).skip(10).collect();
        assert!(seq.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn reset_starts_over_and_same_seed_is_reproducible() {
        let mut a = Backoff::with_seed(CFG, 1);
        let mut b = Backoff::with_seed(CFG, 1);
        let da: Vec<_> = (0..5).map(|_| a.next_delay()).collect();
        let db: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(da, db);
        a.reset();
        assert_eq!(a.attempt(), 0);
        assert_eq!(a.base(), CFG.initial);
        assert!(a.next_delay() <= CFG.initial);
    }
}
