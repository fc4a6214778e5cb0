//! The readiness contract.
//!
//! moai listens at once and initialises in the background (open storage, migrate, start
//! engines). Orchestration polls `/health` and sends traffic only once it says ready; sync
//! endpoints answer 503 until then. Unlike the original service, /health is not 200 while
//! initialising, so a platform health check that gates on 2xx really holds traffic back.

use std::sync::Arc;

use tokio::sync::watch;

use crate::Engines;

#[derive(Clone)]
pub enum Phase {
    /// Listening, not yet able to sync.
    Initializing,
    /// Every enabled engine is up.
    Ready(Arc<Engines>),
    /// Initialisation failed; the process is about to exit non-zero.
    Failed(Arc<str>),
    /// Shutting down: existing sessions are being closed, new ones refused.
    Draining,
}

/// Shared, cheaply cloned readiness state.
#[derive(Clone)]
pub struct Readiness {
    tx: Arc<watch::Sender<Phase>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self { tx: Arc::new(watch::channel(Phase::Initializing).0) }
    }

    pub fn phase(&self) -> Phase {
        self.tx.borrow().clone()
    }

    /// The engines, if and only if the server is ready.
    pub fn engines(&self) -> Option<Arc<Engines>> {
        match &*self.tx.borrow() {
            Phase::Ready(engines) => Some(engines.clone()),
            _ => None,
        }
    }

    pub fn set_ready(&self, engines: Engines) {
        self.tx.send_replace(Phase::Ready(Arc::new(engines)));
    }

    pub fn set_failed(&self, reason: impl Into<Arc<str>>) {
        self.tx.send_replace(Phase::Failed(reason.into()));
    }

    pub fn set_draining(&self) {
        self.tx.send_replace(Phase::Draining);
    }
}
