//! Per-account limits: requests per minute and tokens per minute, each a GCRA bucket per
//! account (`governor`, keyed by the account). A bucket holds a minute's worth and refills
//! continuously, so an account may spend its whole minute at once and then one request (or
//! token) every 60/limit seconds.
//!
//! **What tokens are charged.** A request is charged when it is admitted, before it is sent:
//! its prompt estimate (request bytes / 4) plus its max tokens (the server sets `max_tokens`
//! on requests that name none), an upper bound of what it can use. GCRA cannot give back what a
//! request did not use, so the limit holds against the budget callers ask for; the tokens they
//! really used are counted in `/metrics` from the upstream's usage.
//!
//! The request bucket is checked first: a request refused for tokens has still used one request.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::error::{Limit, LlmError};

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// Accounts idle long enough to be back at a full bucket are forgotten this often.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// One limit's state for one account after a decision, as the `x-ratelimit-*` headers tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The bucket's size (the per-minute limit).
    pub limit: u32,
    /// What is left now.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// The limits' state after a decision; None for a limit that is off (or was not reached).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateInfo {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

pub struct Limiter {
    requests: Option<Keyed>,
    tokens: Option<Keyed>,
    clock: DefaultClock,
    last_sweep: Mutex<Instant>,
}

impl Limiter {
    /// `requests_per_minute` and `tokens_per_minute` per account; 0 turns a limit off.
    pub fn per_minute(requests_per_minute: u32, tokens_per_minute: u32) -> Self {
        Self::new(
            NonZeroU32::new(requests_per_minute).map(Quota::per_minute),
            NonZeroU32::new(tokens_per_minute).map(Quota::per_minute),
        )
    }

    pub(crate) fn new(requests: Option<Quota>, tokens: Option<Quota>) -> Self {
        let clock = DefaultClock::default();
        let keyed =
            |q: Quota| -> Keyed { RateLimiter::new(q, DefaultKeyedStateStore::<String>::default(), clock.clone()) };
        Self {
            requests: requests.map(keyed),
            tokens: tokens.map(keyed),
            clock: clock.clone(),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Admits one request of `account` that is charged `tokens`, or says how long to wait.
    pub fn check(&self, account: &str, tokens: u32) -> Result<RateInfo, LlmError> {
        self.sweep_if_due();
        let key = account.to_owned();
        let mut info = RateInfo::default();
        if let Some(requests) = &self.requests {
            match requests.check_key(&key) {
                Ok(state) => info.requests = Some(window(&state)),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    let limit = not_until.quota().burst_size().get();
                    info.requests = Some(Window { limit, remaining: 0, reset: wait });
                    return Err(LlmError::RateLimited { limit: Limit::Requests, retry_after: wait, info });
                }
            }
        }
        if let Some(bucket) = &self.tokens {
            let n = NonZeroU32::new(tokens.max(1)).expect("at least 1");
            match bucket.check_key_n(&key, n) {
                Ok(Ok(state)) => info.tokens = Some(window(&state)),
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    let quota = not_until.quota();
                    let per_token = quota.replenish_interval().as_nanos().max(1);
                    // What is there now: the charge less what the wait would refill.
                    let missing = wait.as_nanos().div_ceil(per_token);
                    let remaining = u128::from(n.get()).saturating_sub(missing) as u32;
                    let limit = quota.burst_size().get();
                    let reset = quota.replenish_interval().saturating_mul(limit.saturating_sub(remaining));
                    info.tokens = Some(Window { limit, remaining, reset });
                    return Err(LlmError::RateLimited { limit: Limit::Tokens, retry_after: wait, info });
                }
                Err(insufficient) => return Err(LlmError::OverTokenLimit { needed: tokens, limit: insufficient.0 }),
            }
        }
        Ok(info)
    }

    /// Forgets accounts whose buckets are full again, at most once per [`SWEEP_EVERY`], so the
    /// maps hold only accounts active in the last minute or so.
    fn sweep_if_due(&self) {
        let Ok(mut last) = self.last_sweep.try_lock() else { return };
        if last.elapsed() < SWEEP_EVERY {
            return;
        }
        *last = Instant::now();
        for bucket in [&self.requests, &self.tokens].into_iter().flatten() {
            bucket.retain_recent();
            bucket.shrink_to_fit();
        }
    }

    /// Accounts the limiter currently remembers (for tests).
    pub fn tracked_accounts(&self) -> usize {
        self.requests.as_ref().or(self.tokens.as_ref()).map_or(0, |b| b.len())
    }
}

fn window(state: &StateSnapshot) -> Window {
    let quota = state.quota();
    let limit = quota.burst_size().get();
    let remaining = state.remaining_burst_capacity();
    Window { limit, remaining, reset: quota.replenish_interval().saturating_mul(limit.saturating_sub(remaining)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_account_are_limited_and_accounts_are_independent() {
        let l = Limiter::per_minute(2, 0);
        let first = l.check("a", 10).unwrap();
        assert_eq!(first.requests, Some(Window { limit: 2, remaining: 1, reset: Duration::from_secs(30) }));
        assert_eq!(first.tokens, None);
        assert_eq!(l.check("a", 10).unwrap().requests.unwrap().remaining, 0);
        match l.check("a", 10) {
            Err(LlmError::RateLimited { limit: Limit::Requests, retry_after, info }) => {
                assert!(retry_after > Duration::from_secs(29) && retry_after <= Duration::from_secs(30));
                assert_eq!(info.requests.unwrap().remaining, 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(l.check("b", 10).is_ok(), "another account has its own bucket");
        assert_eq!(l.tracked_accounts(), 2);
    }

    #[test]
    fn tokens_are_charged_by_the_request_and_refill_over_time() {
        // 1000 tokens per second instead of a minute, so the refill is observable.
        let quota = Quota::with_period(Duration::from_millis(1)).map(|q| q.allow_burst(1000.try_into().unwrap()));
        let l = Limiter::new(None, quota);
        let info = l.check("a", 600).unwrap();
        assert_eq!(info.tokens.unwrap().remaining, 400);
        match l.check("a", 600) {
            Err(LlmError::RateLimited { limit: Limit::Tokens, retry_after, info }) => {
                let w = info.tokens.unwrap();
                assert!(w.remaining >= 400 && w.remaining < 600, "{w:?}");
                assert!(retry_after <= Duration::from_millis(200), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(l.check("a", 1001), Err(LlmError::OverTokenLimit { needed: 1001, limit: 1000 })));
        std::thread::sleep(Duration::from_millis(300));
        assert!(l.check("a", 600).is_ok(), "the bucket refilled");
    }

    #[test]
    fn limits_at_zero_are_off() {
        let l = Limiter::per_minute(0, 0);
        for _ in 0..100 {
            assert_eq!(l.check("a", u32::MAX).unwrap(), RateInfo::default());
        }
    }
}
