//! Which storage the test servers run on: `MOAI_TEST_STORAGE` unset (or `sqlite`): SQLite at the
//! test's `--db-path`, as always; `postgres`: PostgreSQL (`--storage postgres://…`), so that a
//! suite written for the default backend also checks the shared one (scripts/test runs the
//! real-client interop suites a second time this way); `postgres+s3`: the same, with Yjs
//! snapshots in an S3-compatible bucket (`--s3-url`, a moto server started once per test
//! process) and a small compaction threshold (4 KiB), so that the suites' documents really are
//! compacted into objects and loaded back from them.
//!
//! On PostgreSQL every distinct `--db-path` gets a fresh database of its own on one throwaway
//! cluster shared by the whole test process (`initdb` once, not per server). The database belongs
//! to the test, not to the server process: a test that restarts its server on the same
//! `--db-path` (after SIGTERM or `kill -9`) finds its data again, exactly as with the SQLite file.
//! The cluster is stopped and deleted when the test process exits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::moto;
use super::pg::PgCluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestStorage {
    Sqlite,
    Postgres,
    PostgresS3,
}

/// The backend `MOAI_TEST_STORAGE` asks for. Any other value fails the test rather than
/// silently testing SQLite.
pub fn test_storage() -> TestStorage {
    match std::env::var("MOAI_TEST_STORAGE").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => TestStorage::Sqlite,
        Ok("postgres") => TestStorage::Postgres,
        Ok("postgres+s3") => TestStorage::PostgresS3,
        Ok(other) => panic!("MOAI_TEST_STORAGE={other:?}: expected sqlite, postgres or postgres+s3"),
    }
}

struct Shared {
    cluster: PgCluster,
    /// `--db-path` → the database standing for it.
    databases: HashMap<PathBuf, String>,
    /// The S3 server of `postgres+s3`, with one bucket for all; each database has its prefix.
    objects: Option<moto::Moto>,
}

/// The bucket of `postgres+s3` (each test database writes under a prefix of its own).
const BUCKET: &str = "moai-interop";

/// The arguments that put a server started with `--db-path db` on the test storage (empty on
/// SQLite). The database, and the objects of `postgres+s3`, belong to `db`: a restarted server
/// finds them again.
pub fn storage_args(db: &Path) -> Vec<String> {
    let Some(url) = storage_for(db) else { return Vec::new() };
    let mut args = vec!["--storage".to_owned(), url.clone()];
    let shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(objects) = shared.as_ref().and_then(|s| s.objects.as_ref()) {
        let prefix = url.rsplit('/').next().unwrap_or("db").to_owned();
        args.extend([
            "--s3-url".to_owned(),
            format!("s3://{BUCKET}/{prefix}"),
            "--s3-endpoint".to_owned(),
            objects.endpoint(),
            "--s3-region".to_owned(),
            moto::REGION.to_owned(),
            "--yjs-compact-bytes".to_owned(),
            "4KiB".to_owned(),
        ]);
    }
    args
}

/// The environment a server on the test storage needs (S3 credentials for `postgres+s3`).
pub fn storage_env() -> Vec<(&'static str, &'static str)> {
    match test_storage() {
        TestStorage::PostgresS3 => {
            vec![("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID), ("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)]
        }
        _ => Vec::new(),
    }
}

static SHARED: Mutex<Option<Shared>> = Mutex::new(None);

/// The `--storage` value for a server started with `--db-path db`: `None` on SQLite (the server
/// uses `db`); on PostgreSQL the URL of the database standing for `db`, created the first time
/// `db` is seen.
pub fn storage_for(db: &Path) -> Option<String> {
    if test_storage() == TestStorage::Sqlite {
        return None;
    }
    let mut shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let shared = shared.get_or_insert_with(|| {
        let cluster = PgCluster::start();
        let objects = (test_storage() == TestStorage::PostgresS3).then(|| {
            let moto = moto::Moto::start();
            moto.create_bucket(BUCKET);
            moto
        });
        stop_cluster_at_exit();
        Shared { cluster, databases: HashMap::new(), objects }
    });
    let port = shared.cluster.port;
    let next = shared.databases.len();
    let name = shared
        .databases
        .entry(db.to_path_buf())
        .or_insert_with(|| {
            let name = format!("moai_test_{next}");
            create_database(port, &name);
            name
        })
        .clone();
    Some(format!("postgres://postgres@127.0.0.1:{port}/{name}"))
}

/// `CREATE DATABASE` on a thread of its own: callers may be inside a tokio runtime (async tests),
/// where starting another one on the same thread would panic.
fn create_database(port: u16, name: &str) {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let statement = format!("CREATE DATABASE {name}");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
            let connection = tokio::spawn(connection);
            client.batch_execute(&statement).await.expect("create the test database");
            drop(client);
            let _ = connection.await;
        });
    })
    .join()
    .expect("creating the test database");
}

/// The cluster lives in a static, which Rust never drops: stop it (and delete its directory)
/// when the test process exits, or a `postgres` would outlive every test run.
fn stop_cluster_at_exit() {
    extern "C" {
        fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
    }
    extern "C" fn stop() {
        // A panic must not unwind out of an exit handler.
        let _ = std::panic::catch_unwind(|| {
            let taken = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
            drop(taken);
        });
    }
    // SAFETY: registers a plain function with no arguments; the C library calls it once at exit.
    let registered = unsafe { atexit(stop) };
    assert_eq!(registered, 0, "atexit failed");
}

/// The storage a server started with `--db-path db` wrote, opened directly (stop the server
/// first), for tests that check what is stored.
pub enum Stored {
    Sqlite(moai_storage::SqliteStorage),
    Postgres(moai_storage::PostgresStorage),
}

impl Stored {
    pub async fn open(db: &Path) -> Stored {
        let observer = std::sync::Arc::new(moai_storage::NoopObserver);
        match storage_for(db) {
            None => Stored::Sqlite(moai_storage::SqliteStorage::open(db, Default::default(), observer).unwrap()),
            Some(url) => {
                Stored::Postgres(moai_storage::PostgresStorage::open(&url, Default::default(), observer).await.unwrap())
            }
        }
    }

    pub fn covalues(&self) -> &dyn moai_storage::CoValueStore {
        match self {
            Stored::Sqlite(s) => s,
            Stored::Postgres(s) => s,
        }
    }

    pub fn journal(&self) -> &dyn moai_storage::DocJournal {
        match self {
            Stored::Sqlite(s) => s,
            Stored::Postgres(s) => s,
        }
    }

    pub async fn close(&self) {
        match self {
            Stored::Sqlite(s) => s.close().await.unwrap(),
            Stored::Postgres(s) => s.close().await.unwrap(),
        }
    }
}
