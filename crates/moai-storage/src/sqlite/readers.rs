//! A small pool of read-only connections. Reads (loading a document, answering a reconnect
//! storm from stored state) run on blocking threads so they never stall the async runtime,
//! and in WAL mode they never wait for the writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::StorageError;

pub(super) struct ReaderPool {
    path: PathBuf,
    idle: Arc<Mutex<Vec<Connection>>>,
    max_idle: usize,
}

impl ReaderPool {
    pub(super) fn open(path: &Path, size: usize) -> rusqlite::Result<Self> {
        let idle = (0..size).map(|_| super::open_reader(path)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { path: path.to_path_buf(), idle: Arc::new(Mutex::new(idle)), max_idle: size })
    }

    pub(super) async fn read<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let idle = self.idle.clone();
        let path = self.path.clone();
        let max_idle = self.max_idle;
        tokio::task::spawn_blocking(move || {
            // Take an idle connection, or open one more when all are busy; the pool keeps at
            // most `max_idle` afterwards.
            let conn = match idle.lock().map(|mut v| v.pop()) {
                Ok(Some(c)) => c,
                _ => super::open_reader(&path)?,
            };
            let result = f(&conn);
            if let Ok(mut v) = idle.lock() {
                if v.len() < max_idle {
                    v.push(conn);
                }
            }
            Ok(result?)
        })
        .await
        .map_err(|_| StorageError::Closed)?
    }
}
