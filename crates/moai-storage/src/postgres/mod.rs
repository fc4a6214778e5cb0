//! The shared backend: PostgreSQL, for several moai instances serving the same data.
//!
//! Same contracts as SQLite, built for a database that other connections (other instances) write
//! at the same time:
//!
//! - writes go to one writer task per instance (see [`writer`]) that group-commits whatever is
//!   queued on one connection, each job in its own SAVEPOINT, and answers only after COMMIT;
//! - reads and compactions run on other pooled connections (`deadpool-postgres`), reads in one
//!   REPEATABLE READ snapshot each, so a compaction committing meanwhile is seen whole or not at
//!   all;
//! - everything lives in one schema (default `moai_storage`) with versioned migrations applied
//!   at open under an advisory lock (see [`migrations`]).

mod backoff;
mod connect;
mod covalue_store;
mod doc_journal;
mod failure;
mod inventory;
mod jobs;
mod migrations;
mod sql;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::sync::{oneshot, RwLock, RwLockReadGuard};

pub use connect::redact_url;
pub use migrations::SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION;

use crate::error::pg_detail;
use crate::{StorageError, StorageObserver};
use jobs::{Job, Op, Reply};
use sql::Sql;
use writer::Writer;

/// Tunables of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The schema that holds moai's tables (created at open). Several deployments can share a
    /// database under different schemas. Lower-case letters, digits and `_`. Default
    /// `moai_storage`.
    pub schema: String,
    /// With true (the default) moai leaves the server's `synchronous_commit` as configured (on
    /// by default: an acknowledged write survives a crash of the database server). With false
    /// its sessions set `synchronous_commit = off`: a crash of moai loses nothing acknowledged,
    /// but a crash of the database server may lose the last commits (the `--fsync false`
    /// trade-off of SQLite).
    pub fsync_every_commit: bool,
    /// The most writes one transaction takes. Default 512.
    pub max_batch: usize,
    /// Connections in the pool: one for the writer, the rest for reads and compactions.
    /// Default 8.
    pub pool_size: usize,
    /// How long connecting (TCP, TLS-less startup, authentication) may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long one batch, read or compaction may take before its connection is dropped and it
    /// fails: a server that stops answering must not hang writers forever. Default 30 s.
    pub operation_timeout: Duration,
    /// Pause after the first failed connection attempt of the writer; it doubles on every
    /// further failure (jittered) up to `reconnect_max`. Default 50 ms.
    pub reconnect_min: Duration,
    /// Default 5 s.
    pub reconnect_max: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: "moai_storage".into(),
            fsync_every_commit: true,
            max_batch: 512,
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// A handle to moai's storage in a PostgreSQL database. Cheap to clone; all clones share one
/// writer task and one pool.
#[derive(Clone)]
pub struct PostgresStorage {
    inner: Arc<Inner>,
}

/// What the writer task and the read paths share.
pub(crate) struct Shared {
    pool: Pool,
    sql: Sql,
    observer: Arc<dyn StorageObserver>,
    options: PostgresOptions,
    /// The server as logs may name it: no password.
    target: String,
}

struct Inner {
    shared: Arc<Shared>,
    writer: Writer,
    /// True once closed. Reads and compactions hold it for reading while they run, so close
    /// waits for them.
    closed: RwLock<bool>,
}

impl PostgresStorage {
    /// Connects to `url` (`postgres://user:password@host:port/db`), applies pending migrations
    /// and starts the writer task. Fails if the server cannot be reached now: there is no retry
    /// at open, the caller (the binary's initialisation) reports and exits.
    pub async fn open(
        url: &str,
        options: PostgresOptions,
        observer: Arc<dyn StorageObserver>,
    ) -> Result<Self, StorageError> {
        let (config, target) = connect::config(url, &options)?;
        let sql = Sql::new(&options.schema)?;
        let pool = connect::pool(config, &options)?;
        let shared = Arc::new(Shared { pool, sql, observer, options, target });
        {
            let mut conn = shared.pool.get().await.map_err(|e| connect::pool_error(&shared.target, e))?;
            let migrated = tokio::time::timeout(
                shared.options.operation_timeout.max(Duration::from_secs(60)),
                migrations::apply(&mut conn, &shared.sql),
            )
            .await;
            match migrated {
                Ok(result) => result?,
                Err(_) => {
                    drop(Object::take(conn));
                    return Err(StorageError::Timeout(shared.options.operation_timeout));
                }
            }
        }
        let writer = Writer::start(shared.clone());
        Ok(Self { inner: Arc::new(Inner { shared, writer, closed: RwLock::new(false) }) })
    }

    /// The server this storage writes to, without the password: `postgres://user@host:port/db`.
    pub fn target(&self) -> &str {
        &self.inner.shared.target
    }

    /// The schema holding moai's tables.
    pub fn schema(&self) -> &str {
        &self.inner.shared.options.schema
    }

    /// A small real write (one row rewritten and committed through the group commit): succeeds
    /// only if the database can be written. The server runs it while storage is failing, to
    /// notice recovery when no client writes.
    pub async fn probe(&self) -> Result<(), StorageError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job { op: Op::Probe, reply: Reply::Done(reply) }, answer).await
    }

    /// Bytes moai's tables take in the database (their heap, indexes and TOAST, as
    /// `pg_total_relation_size` counts them), for the server's dashboard. One catalog query on
    /// a pooled connection.
    pub async fn size_bytes(&self) -> Result<u64, StorageError> {
        let (_open, conn) = self.connection().await?;
        let schema = self.schema();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&schema];
        let query = conn.query_one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
            &params,
        );
        let result = tokio::time::timeout(self.timeout(), query).await;
        let row = self.finish(conn, result)?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    /// Waits for every write queued so far to commit (or fail), and for running reads and
    /// compactions to finish, then closes the pool. Later writes and reads fail with
    /// [`StorageError::Closed`].
    pub async fn close(&self) -> Result<(), StorageError> {
        self.inner.writer.close().await;
        *self.inner.closed.write().await = true;
        self.inner.shared.pool.close();
        Ok(())
    }

    /// Queues `job` for the writer and waits for its answer (sent after its batch's COMMIT).
    async fn submit<T>(&self, job: Job, answer: oneshot::Receiver<Result<T, StorageError>>) -> Result<T, StorageError> {
        self.inner.writer.submit(job).await?;
        answer.await.map_err(|_| StorageError::Closed)?
    }

    /// A pooled connection for a read or a compaction, with the guard that keeps close waiting
    /// until it is done.
    async fn connection(&self) -> Result<(RwLockReadGuard<'_, bool>, Object), StorageError> {
        let closed = self.inner.closed.read().await;
        if *closed {
            return Err(StorageError::Closed);
        }
        let shared = &self.inner.shared;
        match shared.pool.get().await {
            Ok(conn) => Ok((closed, conn)),
            Err(e) => {
                let e = connect::pool_error(&shared.target, e);
                if !matches!(e, StorageError::Closed) {
                    shared.observer.storage_failed(&e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Runs `work` on `conn` within the operation timeout. On any failure the connection is
    /// dropped rather than returned to the pool (it may be mid-transaction or dead), and a
    /// failure of the storage itself is reported to the observer.
    fn finish<T>(
        &self,
        conn: Object,
        result: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, StorageError> {
        let shared = &self.inner.shared;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                drop(Object::take(conn));
                if failure::is_storage_failure(&e) {
                    shared.observer.storage_failed(&pg_detail(&e));
                }
                Err(StorageError::Postgres(e))
            }
            Err(_) => {
                drop(Object::take(conn));
                let e = StorageError::Timeout(shared.options.operation_timeout);
                shared.observer.storage_failed(&e.to_string());
                Err(e)
            }
        }
    }

    fn timeout(&self) -> Duration {
        self.inner.shared.options.operation_timeout
    }
}
