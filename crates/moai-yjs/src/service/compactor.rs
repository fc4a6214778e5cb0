//! The thread that rebuilds snapshots.
//!
//! Compaction decodes and re-encodes a whole document: O(document) CPU that nobody waits for.
//! On a small machine it competes with the live path (a 10 MB document's rebuild showed up as
//! edit-latency stalls on 2 cores). So compactions run one at a time on one dedicated thread at
//! the lowest CPU priority: they use idle CPU, yield to live traffic, and at most one document's
//! rebuild is in memory at once.

use std::sync::mpsc;
use std::thread;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Compactor {
    jobs: mpsc::Sender<Job>,
}

impl Compactor {
    pub(crate) fn start() -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let spawned = thread::Builder::new().name("moai-yjs-compactor".into()).spawn(move || {
            lower_priority();
            for job in queue {
                // A panic (yrs on a bad document) fails that one compaction (its caller sees
                // the job vanish and keeps the journal); the thread serves the next.
                if crate::apply::contain(job).is_err() {
                    tracing::error!("a compaction panicked; the document keeps its journal");
                }
            }
        });
        if let Err(e) = spawned {
            // Without the thread every compaction fails (and is retried later); the live path
            // is unaffected and the journal stays intact.
            tracing::error!(error = %e, "could not start the compaction thread");
        }
        Self { jobs }
    }

    /// Runs `work` on the compaction thread. `None` if the thread is gone.
    pub(crate) async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.jobs.send(job).ok()?;
        result.await.ok()
    }
}

/// Nice 19 for the calling thread (on Linux the nice value is per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority has no memory-safety preconditions; `who = 0` is the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}
