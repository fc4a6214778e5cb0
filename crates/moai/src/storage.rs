//! Which storage backend serves (`--storage`), whether Yjs snapshots go to object storage
//! (`--s3-url`), and what the binary does with storage that the engines do not: open it, probe it
//! while it fails, close it last at shutdown. The engines only see `Arc<dyn DocJournal>` and
//! `Arc<dyn CoValueStore>`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moai_storage::{
    redact_url, CoValueStore, DocJournal, ObjectSnapshots, ObjectStoreOptions, PostgresOptions, PostgresStorage,
    SnapshotObjects, SqliteOptions, SqliteStorage, StorageError, StorageObserver,
};

use crate::cli::StoreArgs;

/// Where storage lives, as given by `--storage` (or `--db-path`).
#[derive(Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// `sqlite:PATH`: the embedded default, a file.
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`: a database shared by several instances.
    Postgres(String),
}

/// The `--storage` value parser.
pub fn parse_url(s: &str) -> Result<StorageUrl, String> {
    if let Some(path) = s.strip_prefix("sqlite:") {
        // `sqlite://path` is accepted too, for those who write URLs out of habit.
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err("sqlite: needs a file path, e.g. sqlite:./local-sync.db".into());
        }
        return Ok(StorageUrl::Sqlite(PathBuf::from(path)));
    }
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return Ok(StorageUrl::Postgres(s.to_owned()));
    }
    Err("expected sqlite:PATH or postgres://user:password@host:port/database".into())
}

/// Never shows a password: this is what logs and `--help` errors print.
impl fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            StorageUrl::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Bytes of a SQLite database: its file and its write-ahead log (`-wal`, absent when empty).
async fn sqlite_size(path: &Path) -> Result<u64, String> {
    let file = tokio::fs::metadata(path).await.map_err(|e| format!("{}: {e}", path.display()))?.len();
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal = tokio::fs::metadata(PathBuf::from(wal)).await.map_or(0, |m| m.len());
    Ok(file + wal)
}

/// The open backend.
#[derive(Clone)]
pub enum Storage {
    Sqlite(SqliteStorage),
    Postgres(PostgresStorage),
}

impl Storage {
    /// How the dashboard measures this storage's size: the SQLite file and its WAL, or moai's
    /// tables in PostgreSQL. `objects`: Yjs snapshots are in object storage (not counted).
    pub fn size_probe(&self, url: &StorageUrl, objects: bool) -> moai_server::StorageSize {
        let elsewhere = if objects { " (Yjs snapshots in object storage not counted)" } else { "" };
        match (self, url) {
            (Storage::Postgres(pg), _) => {
                let pg = pg.clone();
                moai_server::StorageSize {
                    what: format!("PostgreSQL tables in schema {}{elsewhere}", pg.schema()),
                    measure: Arc::new(move || {
                        let pg = pg.clone();
                        Box::pin(async move { pg.size_bytes().await.map_err(|e| e.to_string()) })
                    }),
                }
            }
            (Storage::Sqlite(_), url) => {
                let path = match url {
                    StorageUrl::Sqlite(path) => path.clone(),
                    StorageUrl::Postgres(_) => PathBuf::new(),
                };
                moai_server::StorageSize {
                    what: format!("SQLite database {} and its WAL{elsewhere}", path.display()),
                    measure: Arc::new(move || {
                        let path = path.clone();
                        Box::pin(async move { sqlite_size(&path).await })
                    }),
                }
            }
        }
    }

    /// Opens (creating and migrating) the backend `url` names. `fsync`: see `--fsync`.
    pub async fn open(url: &StorageUrl, fsync: bool, observer: Arc<dyn StorageObserver>) -> anyhow::Result<Storage> {
        match url {
            StorageUrl::Sqlite(path) => {
                let options = SqliteOptions { fsync_every_commit: fsync, ..SqliteOptions::default() };
                let p = path.clone();
                let storage = tokio::task::spawn_blocking(move || SqliteStorage::open(&p, options, observer))
                    .await
                    .context("storage open task failed")?
                    .with_context(|| format!("opening storage at {}", path.display()))?;
                Ok(Storage::Sqlite(storage))
            }
            StorageUrl::Postgres(raw) => {
                let options = PostgresOptions { fsync_every_commit: fsync, ..PostgresOptions::default() };
                let storage = PostgresStorage::open(raw, options, observer)
                    .await
                    .with_context(|| format!("opening storage at {url}"))?;
                Ok(Storage::Postgres(storage))
            }
        }
    }

    pub fn journal(&self) -> Arc<dyn DocJournal> {
        match self {
            Storage::Sqlite(s) => Arc::new(s.clone()),
            Storage::Postgres(s) => Arc::new(s.clone()),
        }
    }

    /// The journal with its Yjs snapshots in `objects` instead of the database.
    pub fn journal_with_snapshots_in(&self, objects: SnapshotObjects) -> Arc<dyn DocJournal> {
        match self {
            Storage::Sqlite(s) => Arc::new(ObjectSnapshots::new(s.clone(), objects)),
            Storage::Postgres(s) => Arc::new(ObjectSnapshots::new(s.clone(), objects)),
        }
    }

    pub fn covalues(&self) -> Arc<dyn CoValueStore> {
        match self {
            Storage::Sqlite(s) => Arc::new(s.clone()),
            Storage::Postgres(s) => Arc::new(s.clone()),
        }
    }

    /// A small real write; see the backends' `probe`.
    pub async fn probe(&self) -> Result<(), StorageError> {
        match self {
            Storage::Sqlite(s) => s.probe().await,
            Storage::Postgres(s) => s.probe().await,
        }
    }

    /// Drains queued writes and closes.
    pub async fn close(&self) -> Result<(), StorageError> {
        match self {
            Storage::Sqlite(s) => s.close().await,
            Storage::Postgres(s) => s.close().await,
        }
    }

    /// How often to probe while storage looks healthy (`None`: only while it fails). A local file
    /// does not vanish between writes; a database server does, and an idle instance should
    /// still show it on /health.
    pub fn probe_when_healthy(&self) -> Option<Duration> {
        match self {
            Storage::Sqlite(_) => None,
            Storage::Postgres(_) => Some(Duration::from_secs(5)),
        }
    }
}

/// Where Yjs snapshots go, from `--s3-url` or `--s3-bucket`/`--s3-prefix` (and the region,
/// endpoint and timeout flags); `None` when neither is given: snapshots stay in the database.
/// Empty values count as unset (an environment variable set to "").
pub fn object_storage(args: &StoreArgs) -> anyhow::Result<Option<ObjectStoreOptions>> {
    let given = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    let (url, bucket, prefix) = (given(&args.s3_url), given(&args.s3_bucket), given(&args.s3_prefix));
    let mut options = match (url, bucket) {
        (Some(_), Some(_)) => anyhow::bail!("--s3-url (MOAI_S3_URL) and --s3-bucket (S3_BUCKET) both given; use one"),
        (Some(url), None) => {
            if prefix.is_some() {
                anyhow::bail!("--s3-prefix (S3_PREFIX) goes with --s3-bucket; with --s3-url the prefix is its path");
            }
            ObjectStoreOptions::from_url(&url).map_err(|e| anyhow::anyhow!("--s3-url: {e}"))?
        }
        (None, Some(bucket)) => ObjectStoreOptions::new(bucket, prefix.unwrap_or_default()),
        (None, None) => {
            if prefix.is_some() || given(&args.s3_endpoint).is_some() {
                anyhow::bail!("--s3-prefix and --s3-endpoint need a bucket: --s3-url or --s3-bucket (S3_BUCKET)");
            }
            return Ok(None);
        }
    };
    options.region = given(&args.s3_region);
    options.endpoint = given(&args.s3_endpoint);
    options.timeout = args.s3_timeout;
    Ok(Some(options))
}
