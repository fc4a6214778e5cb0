//! The embedded default backend: SQLite in WAL mode at `DB_PATH`.
//!
//! Writes go to one writer thread (see [`writer`]) that batches them into shared transactions;
//! reads use a small pool of read-only connections on blocking threads, which WAL lets run
//! beside the writer.

mod backup;
mod covalue_store;
mod doc_journal;
mod inventory;
mod migrations;
mod readers;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags};

pub use backup::{
    backup_sqlite, check_sqlite_backup, restore_sqlite, BackupInfo, CopyProgress,
    PAGES_PER_STEP as BACKUP_PAGES_PER_STEP,
};
pub use migrations::SCHEMA_VERSION;

use crate::{StorageError, StorageObserver};
use readers::ReaderPool;
use writer::Writer;

/// Tunables of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `synchronous=FULL` fsyncs every group commit, so acknowledged data survives power loss,
    /// not only a process crash. Off (NORMAL) survives `kill -9` but may lose the last commits on
    /// power loss. Default: true.
    pub fsync_every_commit: bool,
    /// The most writes one transaction takes. Larger batches amortise fsync further but delay
    /// the first waiter. Default 512.
    pub max_batch: usize,
    /// Read-only connections for concurrent reads. Default 4.
    pub readers: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self { fsync_every_commit: true, max_batch: 512, readers: 4 }
    }
}

/// A handle to an open SQLite database. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct SqliteStorage {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Writer,
    readers: ReaderPool,
}

impl SqliteStorage {
    /// Opens (creating if needed) the database at `path`, applies pending migrations, and starts
    /// the writer thread. Blocking: call it from `spawn_blocking` in async code.
    pub fn open(path: &Path, options: SqliteOptions, observer: Arc<dyn StorageObserver>) -> Result<Self, StorageError> {
        let open_err = |source| StorageError::Open { path: path.display().to_string(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // A missing parent directory is the most common first-run failure; create it, and if
            // that is not allowed, the open below reports the real cause.
            let _ = std::fs::create_dir_all(parent);
        }
        let mut conn = Connection::open(path).map_err(open_err)?;
        configure_writer(&conn, &options).map_err(open_err)?;
        migrations::apply(&mut conn)?;

        let readers = ReaderPool::open(path, options.readers.max(1)).map_err(open_err)?;
        let writer = Writer::start(conn, options.max_batch.max(1), observer);
        Ok(Self { inner: Arc::new(Inner { path: path.to_path_buf(), writer, readers }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Waits for every write submitted so far to commit, checkpoints the WAL into the main
    /// file and stops the writer. Writes submitted afterwards fail with
    /// [`StorageError::Closed`].
    pub async fn close(&self) -> Result<(), StorageError> {
        self.inner.writer.close().await
    }

    /// A small real write (one page rewritten and committed, fsync included): succeeds only if
    /// the database can be written. The server runs it while storage is failing, to notice
    /// recovery when no client writes.
    pub async fn probe(&self) -> Result<(), StorageError> {
        self.write(|c| {
            c.execute("UPDATE schema_migrations SET applied_at = applied_at WHERE version = 1", []).map(drop)
        })
        .await
    }

    /// Runs `f` inside the next group commit and resolves once that commit is durable.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.inner.writer.write(f).await
    }

    /// Runs `f` on a read-only connection on a blocking thread.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.inner.readers.read(f).await
    }
}

fn configure_writer(conn: &Connection, options: &SqliteOptions) -> rusqlite::Result<()> {
    // journal_mode returns a row; query it so a read-only file or non-database fails here, at
    // open, with SQLite's own message.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Only possible on exotic filesystems or in-memory paths; a clear message beats a
        // silently weaker durability guarantee.
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("could not enable WAL journal mode (got {mode})")),
        ));
    }
    let sync = if options.fsync_every_commit { "FULL" } else { "NORMAL" };
    conn.execute_batch(&format!("PRAGMA synchronous={sync}; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;"))
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=ON;")?;
    Ok(conn)
}
