//! Test hook: records the data frames clients send, one file per frame, so the fuzz targets can
//! be seeded from real client traffic (docs/fuzzing.md). Enabled only by the hidden
//! `--test-capture-frames DIR` flag; at most [`PER_PROTOCOL`] frames per protocol are kept.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::Protocol;

/// Frames kept per protocol.
pub const PER_PROTOCOL: usize = 2000;

pub struct FrameCapture {
    dir: PathBuf,
    counts: [AtomicUsize; 4],
}

impl FrameCapture {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), counts: Default::default() }
    }

    /// Writes one inbound frame (best effort: a failed write is only logged).
    pub(crate) fn record(&self, protocol: Protocol, frame: &[u8]) {
        let (slot, name) = match protocol {
            Protocol::Yjs => (0, "yjs"),
            Protocol::Cojson => (1, "cojson"),
            Protocol::Pgsync => (2, "pgsync"),
            Protocol::Hocuspocus => (3, "hocuspocus"),
        };
        let n = self.counts[slot].fetch_add(1, Ordering::Relaxed);
        if n >= PER_PROTOCOL {
            return;
        }
        let dir = self.dir.join(name);
        let path = dir.join(format!("{}-{n:05}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, frame)) {
            tracing::warn!(path = %path.display(), error = %e, "frame capture failed");
        }
    }
}
