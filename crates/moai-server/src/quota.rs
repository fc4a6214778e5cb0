//! Per-key counters of open connections, so one client cannot take every slot: connections per
//! IP address (checked at accept) and WebSocket sessions per token subject (checked at upgrade).
//! A [`QuotaGuard`] holds one unit until it is dropped. Memory is bounded by what is open: a key
//! whose count drops to zero is removed.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// At most `max` units per key; `max == 0` means no limit.
pub struct Quota<K: Eq + Hash + Clone + Send + Sync + 'static> {
    max: usize,
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash + Clone + Send + Sync + 'static> Quota<K> {
    pub fn new(max: usize) -> Self {
        Self { max, counts: Arc::default() }
    }

    /// Takes one unit for `key`, or None if the key is at its limit.
    pub fn try_acquire(&self, key: &K) -> Option<QuotaGuard> {
        if self.max == 0 {
            return Some(QuotaGuard(None));
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        let (counts, key) = (self.counts.clone(), key.clone());
        Some(QuotaGuard(Some(Box::new(move || {
            let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = counts.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&key);
                }
            }
        }))))
    }

    /// Keys with at least one unit taken.
    #[cfg(test)]
    pub fn keys(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One unit of a [`Quota`], given back on drop.
pub struct QuotaGuard(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_at_most_max_units_and_gets_them_back() {
        let q = Quota::new(2);
        let a1 = q.try_acquire(&"a").unwrap();
        let _a2 = q.try_acquire(&"a").unwrap();
        assert!(q.try_acquire(&"a").is_none(), "third unit refused");
        let b = q.try_acquire(&"b").unwrap();
        drop(a1);
        assert!(q.try_acquire(&"a").is_some(), "a released unit can be taken again");
        drop(b);
        assert_eq!(q.keys(), 1, "a key at zero is forgotten");
    }

    #[test]
    fn zero_means_unlimited() {
        let q = Quota::new(0);
        let guards: Vec<_> = (0..1000).map(|_| q.try_acquire(&1).unwrap()).collect();
        assert_eq!(guards.len(), 1000);
        assert_eq!(q.keys(), 0);
    }
}
