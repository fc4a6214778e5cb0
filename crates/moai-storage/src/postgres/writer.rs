//! The writer task with group commit, PostgreSQL's counterpart of `sqlite/writer.rs` with the
//! same guarantees.
//!
//! One task per instance owns one connection. It takes whatever is queued (up to `max_batch`),
//! opens one transaction, runs each job inside its own SAVEPOINT, commits once, and only then
//! answers every job. A job that fails rolls back to its savepoint and fails alone; the rest
//! commit. If BEGIN, COMMIT, a savepoint or the connection fails, or the batch outlives the
//! operation timeout, every job of the batch fails and the connection is dropped (the server
//! rolls back whatever it had): nothing is acknowledged that is not committed.
//!
//! Losing the connection fails the batch at once; later batches take a fresh connection from
//! the pool, with a jittered exponential backoff between failed attempts, so a stopped server
//! sees a few attempts a second at first and one every few seconds after, never a storm.
//!
//! Every outcome is reported to the [`StorageObserver`] as SQLite's writer does: a commit clears
//! a failure, a failed connection, BEGIN or COMMIT or a job failing for a storage reason
//! (see `failure.rs`) reports one, which the server shows in /health.
//!
//! The queue is bounded: when engines outrun the database they wait to enqueue (backpressure).

use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::Object;
use tokio::sync::{mpsc, oneshot};

use super::backoff::Backoff;
use super::failure::is_storage_failure;
use super::jobs::{Job, Ran};
use super::{connect, Shared};
use crate::error::pg_detail;
use crate::StorageError;

/// The bound on queued writes (as SQLite's).
const QUEUE_DEPTH: usize = 8192;

enum Command {
    Write(Job),
    Close(oneshot::Sender<()>),
}

pub(super) struct Writer {
    tx: mpsc::Sender<Command>,
}

impl Writer {
    pub(super) fn start(shared: Arc<Shared>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(shared, rx));
        Self { tx }
    }

    pub(super) async fn submit(&self, job: Job) -> Result<(), StorageError> {
        self.tx.send(Command::Write(job)).await.map_err(|_| StorageError::Closed)
    }

    /// Commits everything queued before it, then stops the task. Idempotent.
    pub(super) async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// The writer's connection and the pacing of its reconnection attempts.
struct Link {
    conn: Option<Object>,
    backoff: Backoff,
}

impl Link {
    /// The connection to run the next batch on: the one held, or a fresh one from the pool
    /// (after the backoff, if the last attempt failed).
    async fn connect(&mut self, shared: &Shared) -> Result<(), String> {
        if self.conn.as_ref().is_some_and(|c| c.is_closed()) {
            // The server closed it while idle (a restart): replace it without failing anyone.
            self.discard();
        }
        if self.conn.is_some() {
            return Ok(());
        }
        self.backoff.wait().await;
        match shared.pool.get().await {
            Ok(conn) => {
                self.backoff.succeeded();
                self.conn = Some(conn);
                Ok(())
            }
            Err(e) => {
                let pause = self.backoff.failed();
                let error = connect::pool_error(&shared.target, e);
                tracing::warn!(error = %error, next_attempt_in = ?pause, "storage writer: no connection");
                Err(error.to_string())
            }
        }
    }

    /// Drops the connection for good (not back into the pool): its state is unknown.
    fn discard(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }
}

async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Command>) {
    let max_batch = shared.options.max_batch.max(1);
    let mut link =
        Link { conn: None, backoff: Backoff::new(shared.options.reconnect_min, shared.options.reconnect_max) };
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    let mut closing: Option<oneshot::Sender<()>> = None;
    while closing.is_none() {
        match rx.recv().await {
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
            commit_batch(&shared, &mut link, &mut batch).await;
        }
    }
    rx.close();
    // Writes that raced with close still get an answer: they are committed, not dropped.
    let mut others = Vec::new();
    while let Ok(cmd) = rx.try_recv() {
        match cmd {
            Command::Write(job) => batch.push(job),
            Command::Close(reply) => others.push(reply),
        }
        if batch.len() >= max_batch {
            commit_batch(&shared, &mut link, &mut batch).await;
        }
    }
    if !batch.is_empty() {
        commit_batch(&shared, &mut link, &mut batch).await;
    }
    drop(link.conn.take()); // back to the pool, which close() then closes
    for reply in closing.into_iter().chain(others) {
        let _ = reply.send(());
    }
}

/// Why a batch failed as a whole.
struct Broken {
    message: String,
}

async fn commit_batch(shared: &Shared, link: &mut Link, batch: &mut Vec<Job>) {
    let started = Instant::now();
    let count = batch.len();
    let mut ran: Vec<Ran> = Vec::with_capacity(count);
    // A job that failed for a storage reason (its savepoint rolled back, the batch went on).
    let mut failure: Option<String> = None;
    let outcome = match link.connect(shared).await {
        Err(message) => Err(Broken { message }),
        Ok(()) => match link.conn.as_ref() {
            None => Err(Broken { message: "no connection".into() }),
            Some(conn) => {
                let timeout = shared.options.operation_timeout;
                match tokio::time::timeout(timeout, run_batch(conn, shared, batch, &mut ran, &mut failure)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Broken {
                        message: format!("the batch did not commit within {timeout:?}; its connection was dropped"),
                    }),
                }
            }
        },
    };
    let commit: Result<(), String> = match outcome {
        Ok(()) => {
            shared.observer.batch_committed(count, started.elapsed());
            if failure.is_none() {
                shared.observer.storage_ok();
            }
            Ok(())
        }
        Err(Broken { message }) => {
            link.discard();
            tracing::error!(error = %message, "storage: batch failed; failing {count} writes");
            failure = Some(message.clone());
            Err(message)
        }
    };
    if let Some(reason) = &failure {
        shared.observer.storage_failed(reason);
    }
    let mut ran = ran.into_iter();
    for job in batch.drain(..) {
        job.reply.send(ran.next().unwrap_or(Ran::NotRun), commit.as_ref().map(|_| ()).map_err(String::as_str));
    }
}

/// BEGIN, every job in its savepoint, COMMIT. `ran` receives each job's outcome as it runs.
async fn run_batch(
    conn: &Object,
    shared: &Shared,
    batch: &[Job],
    ran: &mut Vec<Ran>,
    failure: &mut Option<String>,
) -> Result<(), Broken> {
    let broken = |what: &str, e: tokio_postgres::Error| Broken { message: format!("{what} failed: {}", pg_detail(&e)) };
    conn.batch_execute("BEGIN").await.map_err(|e| broken("BEGIN", e))?;
    for job in batch {
        conn.batch_execute("SAVEPOINT job").await.map_err(|e| broken("SAVEPOINT", e))?;
        match job.op.run(conn, &shared.sql).await {
            Ok(output) => {
                conn.batch_execute("RELEASE SAVEPOINT job").await.map_err(|e| broken("RELEASE SAVEPOINT", e))?;
                ran.push(Ran::Ok(output));
            }
            Err(e) => {
                let storage = is_storage_failure(&e);
                if storage {
                    *failure = Some(pg_detail(&e));
                }
                ran.push(Ran::Failed(e));
                // Undo this job only; the batch goes on. If even that fails (the connection is
                // gone), the batch is lost.
                conn.batch_execute("ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job")
                    .await
                    .map_err(|e| broken("ROLLBACK TO SAVEPOINT", e))?;
            }
        }
    }
    conn.batch_execute("COMMIT").await.map_err(|e| broken("COMMIT", e))
}
