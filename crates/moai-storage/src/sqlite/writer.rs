//! The single writer with group commit.
//!
//! SQLite allows one writer at a time and every commit costs an fsync. Engines want to await
//! durability for each small update (a keystroke, a CoJSON transaction), so one writer thread
//! drains whatever is queued, runs each job in its own SAVEPOINT inside one transaction, commits
//! once, and only then answers every job. Under load hundreds of writes share one fsync; when
//! idle a lone write commits immediately (no timer, no added latency).
//!
//! A job that fails rolls back to its savepoint and fails alone; the rest of the batch commits.
//! If the COMMIT itself fails, every job of the batch gets the error: nothing is acknowledged
//! that is not on disk. On some errors (a full disk, an I/O error) SQLite rolls back the whole
//! transaction, not just the statement: the jobs before are lost with it, and the jobs after
//! would run in autocommit mode, each committing on its own while reported as failed. The
//! writer checks for that after every job and then fails the whole batch without running the
//! rest, so what a writer is told always matches what is on disk.
//!
//! Every outcome is reported to the [`StorageObserver`]: a commit clears a failure, a failed
//! BEGIN/COMMIT, a rolled-back batch or a job failing for a storage reason (full, I/O,
//! read-only, corrupt) reports one, which the server shows in /health.

use std::sync::Arc;
use std::thread;
use std::time::Instant;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::{StorageError, StorageObserver};

/// Called after the batch's COMMIT with its outcome; delivers the job's result to its waiter.
type Finish = Box<dyn FnOnce(Result<(), &str>) + Send>;
/// Runs inside the batch transaction (`Some`) or is told it will not run (`None`, the batch was
/// lost), and returns how to finish.
/// Also says whether the job failed for a storage reason (full, I/O, read-only, …).
type Job = Box<dyn FnOnce(Option<&Connection>) -> (Finish, Option<String>) + Send>;

enum Command {
    Write(Job),
    Close(oneshot::Sender<Result<(), StorageError>>),
}

/// The bound on queued writes. When engines outrun the disk they wait here (backpressure)
/// instead of growing memory without limit.
const QUEUE_DEPTH: usize = 8192;

pub(super) struct Writer {
    tx: mpsc::Sender<Command>,
}

impl Writer {
    pub(super) fn start(conn: Connection, max_batch: usize, observer: Arc<dyn StorageObserver>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        thread::Builder::new()
            .name("moai-sqlite-writer".into())
            .spawn(move || run(conn, rx, max_batch, observer))
            .expect("spawning the storage writer thread");
        Self { tx }
    }

    pub(super) async fn write<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, result) = oneshot::channel::<Result<T, StorageError>>();
        let job: Job = Box::new(move |conn| {
            let outcome = conn.map(|conn| in_savepoint(conn, f));
            let storage_failure = match &outcome {
                Some(Err(e)) if is_storage_failure(e) => Some(e.to_string()),
                _ => None,
            };
            let finish: Finish = Box::new(move |commit: Result<(), &str>| {
                let out = match (outcome, commit) {
                    (None, Err(msg)) | (Some(Ok(_)), Err(msg)) => Err(StorageError::CommitFailed(msg.to_owned())),
                    (None, Ok(())) => Err(StorageError::CommitFailed("not run".into())),
                    (Some(Err(e)), _) => Err(StorageError::Sqlite(e)),
                    (Some(Ok(value)), Ok(())) => Ok(value),
                };
                let _ = reply.send(out);
            });
            (finish, storage_failure)
        });
        self.tx.send(Command::Write(job)).await.map_err(|_| StorageError::Closed)?;
        result.await.map_err(|_| StorageError::Closed)?
    }

    pub(super) async fn close(&self) -> Result<(), StorageError> {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Close(reply)).await.is_err() {
            return Ok(()); // already closed
        }
        done.await.unwrap_or(Ok(()))
    }
}

fn in_savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    conn.execute_batch("SAVEPOINT job")?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            // Undo this job only; the batch goes on.
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

fn run(conn: Connection, mut rx: mpsc::Receiver<Command>, max_batch: usize, observer: Arc<dyn StorageObserver>) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    let mut closing: Option<oneshot::Sender<Result<(), StorageError>>> = None;
    while closing.is_none() {
        // Block for the first command, then take whatever else is already queued.
        match rx.blocking_recv() {
            Some(Command::Write(job)) => batch.push(job),
            Some(Command::Close(reply)) => closing = Some(reply),
            None => break,
        }
        while batch.len() < max_batch && closing.is_none() {
            match rx.try_recv() {
                Ok(Command::Write(job)) => batch.push(job),
                Ok(Command::Close(reply)) => closing = Some(reply),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_batch(&conn, &mut batch, observer.as_ref());
        }
    }
    rx.close();
    // Writes that raced with close still get an answer: they are committed, not dropped.
    while let Ok(cmd) = rx.try_recv() {
        match cmd {
            Command::Write(job) => batch.push(job),
            Command::Close(reply) => {
                let _ = reply.send(Ok(()));
            }
        }
    }
    if !batch.is_empty() {
        commit_batch(&conn, &mut batch, observer.as_ref());
    }
    let result = conn
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .map_err(StorageError::from)
        .and_then(|_| conn.close().map_err(|(_, e)| StorageError::from(e)));
    if let Err(e) = &result {
        tracing::warn!(error = %e, "closing the database");
    }
    if let Some(reply) = closing {
        let _ = reply.send(result);
    }
}

/// Whether a job's error means the storage itself is failing (rather than the job's own input).
fn is_storage_failure(e: &rusqlite::Error) -> bool {
    use rusqlite::ffi::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(DiskFull | SystemIoFailure | ReadOnly | DatabaseCorrupt | CannotOpen | NotADatabase | OutOfMemory)
    )
}

fn commit_batch(conn: &Connection, batch: &mut Vec<Job>, observer: &dyn StorageObserver) {
    let started = Instant::now();
    let count = batch.len();
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let msg = e.to_string();
        tracing::error!(error = %msg, "storage: BEGIN failed; failing {count} writes");
        observer.storage_failed(&msg);
        for job in batch.drain(..) {
            (job(None).0)(Err(&msg));
        }
        return;
    }
    let mut finishers: Vec<Finish> = Vec::with_capacity(count);
    let mut lost: Option<String> = None;
    let mut failure: Option<String> = None;
    for job in batch.drain(..) {
        if lost.is_some() {
            finishers.push(job(None).0);
            continue;
        }
        let (finish, storage_failure) = job(Some(conn));
        finishers.push(finish);
        if storage_failure.is_some() {
            failure = storage_failure;
        }
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back: everything of this batch is gone.
            let msg = "the storage failed and rolled back this batch (disk full or I/O error)".to_owned();
            tracing::error!("storage: transaction rolled back by SQLite; failing {count} writes");
            lost = Some(msg);
        }
    }
    let commit = match &lost {
        Some(msg) => Err(msg.clone()),
        None => conn.execute_batch("COMMIT").map_err(|e| {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            e.to_string()
        }),
    };
    match &commit {
        Ok(()) => {
            observer.batch_committed(count, started.elapsed());
            if failure.is_none() {
                observer.storage_ok();
            }
        }
        Err(msg) => {
            tracing::error!(error = %msg, "storage: COMMIT failed; failing {count} writes");
            failure = Some(msg.clone());
        }
    }
    if let Some(msg) = &failure {
        observer.storage_failed(msg);
    }
    for finish in finishers {
        finish(commit.as_ref().map(|_| ()).map_err(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    struct Batches(Mutex<Vec<usize>>);
    impl StorageObserver for Batches {
        fn batch_committed(&self, writes: usize, _latency: Duration) {
            self.0.lock().unwrap().push(writes);
        }
    }

    /// Holds the writer inside a first job, so that writes queued meanwhile share the next
    /// batch. Returns that job and the sender that releases it.
    async fn hold(
        writer: &Arc<Writer>,
    ) -> (tokio::task::JoinHandle<Result<(), StorageError>>, std::sync::mpsc::Sender<()>) {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let w = writer.clone();
        let first = tokio::spawn(async move {
            w.write(move |_| {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok(())
            })
            .await
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap()).await.unwrap();
        (first, release_tx)
    }

    fn memory_writer(observer: Arc<Batches>) -> Writer {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(v INTEGER NOT NULL)").unwrap();
        Writer::start(conn, 512, observer)
    }

    /// Writes queued while a commit is in progress share the next transaction.
    #[tokio::test]
    async fn queued_writes_share_one_commit() {
        let observer = Arc::new(Batches(Mutex::new(Vec::new())));
        let writer = Arc::new(memory_writer(observer.clone()));
        // Hold the writer inside a first job until 100 more writes are queued behind it.
        let (first, release_tx) = hold(&writer).await;
        let mut rest = Vec::new();
        for i in 0..100 {
            let w = writer.clone();
            rest.push(tokio::spawn(
                async move { w.write(move |c| c.execute("INSERT INTO t(v) VALUES (?1)", [i])).await },
            ));
        }
        while QUEUE_DEPTH - writer.tx.capacity() < 100 {
            tokio::task::yield_now().await;
        }
        release_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        for r in rest {
            assert_eq!(r.await.unwrap().unwrap(), 1);
        }
        assert_eq!(*observer.0.lock().unwrap(), vec![1, 100]);
    }

    /// A failing job rolls back alone; its neighbours in the batch commit.
    #[tokio::test]
    async fn a_failing_write_does_not_fail_its_batch() {
        let observer = Arc::new(Batches(Mutex::new(Vec::new())));
        let writer = Arc::new(memory_writer(observer));
        let ok1 = writer.write(|c| c.execute("INSERT INTO t(v) VALUES (1)", []));
        let bad = writer.write(|c| {
            c.execute("INSERT INTO t(v) VALUES (2)", [])?;
            c.execute("INSERT INTO t(v) VALUES (NULL)", []) // NOT NULL violation
        });
        let ok2 = writer.write(|c| c.execute("INSERT INTO t(v) VALUES (3)", []));
        let (a, b, c) = tokio::join!(ok1, bad, ok2);
        assert!(a.is_ok() && c.is_ok());
        assert!(b.is_err());
        let values: Vec<i64> = writer
            .write(|c| {
                let mut s = c.prepare("SELECT v FROM t ORDER BY v")?;
                let rows = s.query_map([], |r| r.get(0))?.collect::<Result<Vec<i64>, _>>();
                rows
            })
            .await
            .unwrap();
        assert_eq!(values, vec![1, 3], "the failed job's first insert was rolled back with it");
    }

    /// On a full disk SQLite may roll back the whole batch transaction. What each writer is
    /// told must match what is on disk: no job may commit in autocommit mode after the
    /// rollback while being reported as failed. A real full filesystem: a small tmpfs (root).
    #[tokio::test]
    async fn a_batch_rolled_back_by_a_full_disk_reports_exactly_what_is_on_disk() {
        let is_root =
            std::process::Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false);
        if !is_root {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(mounted.success());
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(dir.path().to_path_buf());
        let db = dir.path().join("t.db");
        let conn = Connection::open(&db).unwrap();
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).unwrap();
        conn.execute_batch("CREATE TABLE t(k TEXT PRIMARY KEY, v BLOB)").unwrap();
        let observer = Arc::new(Batches(Mutex::new(Vec::new())));
        let writer = Arc::new(Writer::start(conn, 512, observer));
        // Leave ~300 KB free.
        let filler = dir.path().join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            let free = 2 * 1024 * 1024 - 300 * 1024;
            f.write_all(&vec![0u8; free]).unwrap();
        }
        let (first, release_tx) = hold(&writer).await;
        let insert = |k: &'static str, len: usize| {
            let w = writer.clone();
            tokio::spawn(async move {
                w.write(move |c| {
                    c.execute("INSERT INTO t(k, v) VALUES (?1, zeroblob(?2))", rusqlite::params![k, len as i64])
                })
                .await
            })
        };
        let a = insert("a", 1000);
        let b = insert("b", 4 << 20); // does not fit
        let c = insert("c", 1000);
        while QUEUE_DEPTH - writer.tx.capacity() < 3 {
            tokio::task::yield_now().await;
        }
        release_tx.send(()).unwrap();
        let _ = first.await.unwrap();
        let (a, b, c) = (a.await.unwrap(), b.await.unwrap(), c.await.unwrap());
        assert!(b.is_err(), "4 MB cannot fit in 300 KB");
        std::fs::remove_file(&filler).unwrap();
        let present = |k: &'static str| {
            let w = writer.clone();
            async move {
                w.write(move |c| c.query_row("SELECT count(*) FROM t WHERE k = ?1", [k], |r| r.get::<_, i64>(0)))
                    .await
                    .unwrap()
                    == 1
            }
        };
        assert_eq!(a.is_ok(), present("a").await, "a: told {a:?}");
        assert_eq!(c.is_ok(), present("c").await, "c: told {c:?}");
        assert!(!present("b").await);
    }
}
