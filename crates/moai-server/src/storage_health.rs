//! Whether storage can be written, as /health reports it. The storage writer reports every
//! failure and every clean commit ([`moai_storage::StorageObserver`]); this keeps the last word,
//! forwards commit statistics to [`Metrics`], and lets the binary's probe loop find out when
//! to probe.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moai_storage::StorageObserver;

use crate::Metrics;

pub struct StorageHealth {
    metrics: Arc<Metrics>,
    failure: Mutex<Option<String>>,
}

impl StorageHealth {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { metrics, failure: Mutex::new(None) })
    }

    /// Why storage is failing, if it is.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl StorageObserver for StorageHealth {
    fn batch_committed(&self, writes: usize, latency: Duration) {
        StorageObserver::batch_committed(self.metrics.as_ref(), writes, latency);
    }

    fn storage_failed(&self, reason: &str) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            tracing::error!(reason, "storage is failing; /health reports it until a write succeeds again");
        }
        *failure = Some(reason.to_owned());
    }

    fn storage_ok(&self) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.take().is_some() {
            tracing::info!("storage writes work again");
        }
    }
}
