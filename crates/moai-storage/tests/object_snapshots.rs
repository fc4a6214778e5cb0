//! What only `ObjectSnapshots` has (the `DocJournal` contracts it keeps are in contract.rs): the
//! object layout, a database snapshot from before object storage, a crash between the PUT and
//! the journal trim, compactions of several instances racing, and an object store that stops
//! answering, is gone, or has no bucket. Each test starts a real S3-compatible server
//! (tests/support/moto.rs).
//!
//! Updates here are tokens (`u17;`) and a snapshot is the sorted set of the tokens folded into
//! it: merging is idempotent and order-free like applying Yjs updates, so "every update is
//! somewhere" can be checked exactly.

#[path = "support/moto.rs"]
mod moto;
#[path = "../../moai-pgsync/tests/support/pg.rs"]
mod pg;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use moai_storage::object_store::aws::AmazonS3Builder;
use moai_storage::object_store::path::Path as ObjectPath;
use moai_storage::object_store::{ObjectStore, ObjectStoreExt};
use moai_storage::{
    DocJournal, Folded, MemoryStorage, NoopObserver, ObjectSnapshots, ObjectStoreOptions, PostgresOptions,
    PostgresStorage, SnapshotObjects, SqliteOptions, SqliteStorage, StorageError, StoredDoc, TrimJournal,
    LEGACY_SNAPSHOT_SEQ,
};

/// Every server has this bucket. Its name is unique to the process and server: a test that
/// kills its server must never reach another test's server that took over the port.
struct Server {
    moto: moto::Moto,
    bucket: String,
}

impl std::ops::Deref for Server {
    type Target = moto::Moto;
    fn deref(&self) -> &moto::Moto {
        &self.moto
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut moto::Moto {
        &mut self.moto
    }
}

async fn moto() -> Server {
    tokio::task::spawn_blocking(|| {
        let moto = moto::Moto::start();
        let bucket = format!("moai-{}-{}", std::process::id(), moto.port);
        moto.create_bucket(&bucket);
        Server { moto, bucket }
    })
    .await
    .unwrap()
}

fn options(moto: &Server, url: &str, timeout: Duration) -> ObjectStoreOptions {
    ObjectStoreOptions {
        endpoint: Some(moto.endpoint()),
        region: Some(moto::REGION.into()),
        access_key_id: Some(moto::ACCESS_KEY_ID.into()),
        secret_access_key: Some(moto::SECRET_ACCESS_KEY.into()),
        timeout,
        ..ObjectStoreOptions::from_url(url).unwrap()
    }
}

async fn objects(moto: &Server) -> SnapshotObjects {
    let url = format!("s3://{}/snapshots", moto.bucket);
    SnapshotObjects::open(options(moto, &url, Duration::from_secs(10))).await.unwrap()
}

/// A client of the bucket of our own, to look at the objects as a backup tool would.
fn raw_client(moto: &Server) -> impl ObjectStore {
    moai_storage::install_tls_provider();
    AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_region(moto::REGION)
        .with_bucket_name(&moto.bucket)
        .with_access_key_id(moto::ACCESS_KEY_ID)
        .with_secret_access_key(moto::SECRET_ACCESS_KEY)
        .build()
        .unwrap()
}

fn token(n: u64) -> Vec<u8> {
    format!("u{n};").into_bytes()
}

fn tokens(bytes: &[u8]) -> BTreeSet<String> {
    String::from_utf8(bytes.to_vec()).unwrap().split_terminator(';').map(str::to_owned).collect()
}

/// Everything a load holds.
fn contents(stored: &StoredDoc) -> BTreeSet<String> {
    let mut all = stored.snapshot.as_deref().map(tokens).unwrap_or_default();
    for (_, update) in &stored.updates {
        all.extend(tokens(update));
    }
    all
}

/// What a compaction of `stored` writes: everything it holds, as one snapshot.
fn merged(stored: &StoredDoc) -> Vec<u8> {
    contents(stored).into_iter().map(|t| format!("{t};")).collect::<String>().into_bytes()
}

fn expect(range: impl IntoIterator<Item = u64>) -> BTreeSet<String> {
    range.into_iter().map(|n| format!("u{n}")).collect()
}

/// Loads and compacts what it loaded.
async fn compact(store: &dyn DocJournal, doc: &str) -> Result<(), StorageError> {
    let stored = store.load(doc).await?;
    store.compact(doc, merged(&stored), stored.folded()).await
}

#[tokio::test]
async fn each_document_is_one_object_at_its_percent_encoded_key_and_the_database_keeps_no_snapshot() {
    let moto = moto().await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStorage::open(&dir.path().join("moai.db"), SqliteOptions::default(), Arc::new(NoopObserver)).unwrap();
    let store = ObjectSnapshots::new(sqlite.clone(), objects(&moto).await);
    for (i, doc) in ["plain-id_v1.2", "team/plan 1", "100%"].into_iter().enumerate() {
        store.append_many(doc, vec![token(i as u64), token(10 + i as u64)]).await.unwrap();
        compact(&store, doc).await.unwrap();
        let inner = sqlite.load(doc).await.unwrap();
        assert_eq!((inner.snapshot, inner.updates.len()), (None, 0), "{doc}: the database holds nothing of it");
        assert_eq!(contents(&store.load(doc).await.unwrap()), expect([i as u64, 10 + i as u64]), "{doc}");
    }

    let raw = raw_client(&moto);
    let mut keys: Vec<String> = raw.list(None).map_ok(|m| m.location.to_string()).try_collect().await.unwrap();
    keys.sort();
    assert_eq!(keys, ["snapshots/100%25.bin", "snapshots/plain-id_v1.2.bin", "snapshots/team%2Fplan%201.bin"]);
    assert_eq!(store.objects().key("team/plan 1"), "snapshots/team%2Fplan%201.bin");
    // The object is the snapshot the compaction wrote, byte for byte.
    let object = raw.get(&ObjectPath::parse("snapshots/plain-id_v1.2.bin").unwrap()).await.unwrap();
    assert_eq!(object.bytes().await.unwrap().as_ref(), b"u0;u10;");
    sqlite.close().await.unwrap();
}

/// A journal that "crashes" (fails) once when told to trim: what a process killed between the
/// PUT and the trim leaves behind.
struct CrashBeforeTrim {
    inner: SqliteStorage,
    crash: AtomicBool,
}

#[async_trait]
impl DocJournal for CrashBeforeTrim {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
        self.inner.append_many(doc, updates).await
    }
    async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError> {
        self.inner.load(doc).await
    }
    async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError> {
        self.inner.compact(doc, snapshot, folded).await
    }
}

#[async_trait]
impl TrimJournal for CrashBeforeTrim {
    async fn trim(&self, doc: &str, folded: Folded) -> Result<(), StorageError> {
        if self.crash.swap(false, Ordering::SeqCst) {
            return Err(StorageError::CommitFailed("killed before the trim".into()));
        }
        self.inner.trim(doc, folded).await
    }
}

#[tokio::test]
async fn a_crash_between_the_put_and_the_trim_leaves_only_entries_the_snapshot_already_has() {
    let moto = moto().await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStorage::open(&dir.path().join("moai.db"), SqliteOptions::default(), Arc::new(NoopObserver)).unwrap();
    let journal = CrashBeforeTrim { inner: sqlite.clone(), crash: AtomicBool::new(true) };
    let store = ObjectSnapshots::new(journal, objects(&moto).await);
    store.append_many("d", (1..=3).map(token).collect()).await.unwrap();
    assert!(compact(&store, "d").await.is_err(), "the trim failed");

    // The object holds 1..3 and so does the journal: loading both is harmless.
    let after = store.load("d").await.unwrap();
    assert_eq!(tokens(after.snapshot.as_deref().unwrap()), expect(1..=3));
    assert_eq!(after.updates.len(), 3);
    assert_eq!(contents(&after), expect(1..=3));
    // The next compaction starts from that object and removes the leftovers.
    store.append("d", token(4)).await.unwrap();
    compact(&store, "d").await.unwrap();
    let last = store.load("d").await.unwrap();
    assert!(last.updates.is_empty());
    assert_eq!(contents(&last), expect(1..=4));
    sqlite.close().await.unwrap();
}

/// The journal backends under `ObjectSnapshots`, for tests that run against each.
enum Db {
    Memory,
    Sqlite,
    Postgres,
}

/// Runs `$body` with `$journal` a fresh journal backend of each kind, named `$name`.
macro_rules! for_each_db {
    (|$journal:ident, $name:ident| $body:expr) => {
        for db in [Db::Memory, Db::Sqlite, Db::Postgres] {
            match db {
                Db::Memory => {
                    let $journal = Arc::new(MemoryStorage::new());
                    let $name = "memory";
                    $body
                }
                Db::Sqlite => {
                    let dir = tempfile::tempdir().unwrap();
                    let $journal = SqliteStorage::open(
                        &dir.path().join("moai.db"),
                        SqliteOptions::default(),
                        Arc::new(NoopObserver),
                    )
                    .unwrap();
                    let $name = "sqlite";
                    $body
                }
                Db::Postgres => {
                    let cluster = tokio::task::spawn_blocking(pg::PgCluster::start).await.unwrap();
                    let $journal =
                        PostgresStorage::open(&cluster.url(), PostgresOptions::default(), Arc::new(NoopObserver))
                            .await
                            .unwrap();
                    let $name = "postgres";
                    $body
                }
            }
        }
    };
}

/// A snapshot written to the database before object storage was configured.
#[tokio::test]
async fn a_database_snapshot_from_before_loads_and_the_first_compaction_moves_it_into_the_object() {
    let moto = moto().await;
    let objects = objects(&moto).await;
    for_each_db!(|db, name| {
        let doc = format!("legacy-{name}");
        let doc = doc.as_str();
        // Before: the database compacts by itself.
        db.append_many(doc, vec![token(1), token(2)]).await.unwrap();
        let before = db.load(doc).await.unwrap();
        db.compact(doc, merged(&before), before.folded()).await.unwrap();
        db.append(doc, token(3)).await.unwrap();

        // With object storage: the database's snapshot is the document's snapshot until the
        // first compaction writes the object and deletes it from the database.
        let store = ObjectSnapshots::new(db.clone(), objects.clone());
        let loaded = store.load(doc).await.unwrap();
        assert_eq!(loaded.snapshot.as_deref().map(tokens), Some(expect(1..=2)), "{name}");
        assert!(loaded.snapshot_version.is_some(), "{name}");
        assert_eq!(contents(&loaded), expect(1..=3), "{name}");
        store.compact(doc, merged(&loaded), loaded.folded()).await.unwrap();
        let inner = db.load(doc).await.unwrap();
        assert_eq!((inner.snapshot, inner.snapshot_version, inner.updates.len()), (None, None, 0), "{name}");
        assert_eq!(contents(&store.load(doc).await.unwrap()), expect(1..=3), "{name}");

        // An instance without object storage (misconfigured) compacts into the database again:
        // both snapshots exist. The database's comes as an extra entry, and the next compaction
        // moves it into the object too.
        db.append(doc, token(4)).await.unwrap();
        let stray = db.load(doc).await.unwrap();
        db.compact(doc, merged(&stray), stray.folded()).await.unwrap();
        db.append(doc, token(5)).await.unwrap();
        let both = store.load(doc).await.unwrap();
        assert_eq!(both.snapshot.as_deref().map(tokens), Some(expect(1..=3)), "{name}: the object");
        assert_eq!(both.updates[0].0, LEGACY_SNAPSHOT_SEQ, "{name}");
        assert_eq!(tokens(&both.updates[0].1), expect(4..=4), "{name}: the database's snapshot");
        assert_eq!(contents(&both), expect(1..=5), "{name}");
        store.compact(doc, merged(&both), both.folded()).await.unwrap();
        let inner = db.load(doc).await.unwrap();
        assert_eq!((inner.snapshot, inner.updates.len()), (None, 0), "{name}");
        let last = store.load(doc).await.unwrap();
        assert!(last.updates.is_empty(), "{name}");
        assert_eq!(contents(&last), expect(1..=5), "{name}");
    });
}

/// Two instances (each its own `ObjectSnapshots`, sharing the database and the bucket) compact
/// one document: the one that loaded first and writes second loses and changes nothing; every
/// update survives, and a reader after a restart finds them all.
#[tokio::test]
async fn a_delayed_compaction_loses_to_the_one_that_wrote_first_and_nothing_is_lost() {
    let moto = moto().await;
    let objects = objects(&moto).await;
    for_each_db!(|db, name| {
        let doc = format!("race-{name}");
        let doc = doc.as_str();
        let a = ObjectSnapshots::new(db.clone(), objects.clone());
        let b = ObjectSnapshots::new(db.clone(), objects.clone());
        let mut n = 0;
        for round in 0..3 {
            // A loads, B appends more and compacts (its load holds more than A's), then A
            // compacts from its older load: it must lose.
            a.append(doc, token(n)).await.unwrap();
            n += 1;
            let slow = a.load(doc).await.unwrap();
            b.append(doc, token(n)).await.unwrap();
            n += 1;
            compact(&b, doc).await.unwrap();
            a.append(doc, token(n)).await.unwrap(); // after B's load: must stay in the journal
            n += 1;
            let lost = a.compact(doc, merged(&slow), slow.folded()).await;
            assert!(matches!(lost, Err(StorageError::CompactionConflict { .. })), "{name} {round}: {lost:?}");
            let now = a.load(doc).await.unwrap();
            assert_eq!(contents(&now), expect(0..n), "{name} {round}");
            assert_eq!(now.updates.len(), 1, "{name} {round}: only the entry B had not loaded");

            // And the other way round: both load the same state, the first to write wins.
            let first = a.load(doc).await.unwrap();
            let second = b.load(doc).await.unwrap();
            b.compact(doc, merged(&second), second.folded()).await.unwrap();
            let lost = a.compact(doc, merged(&first), first.folded()).await;
            assert!(matches!(lost, Err(StorageError::CompactionConflict { .. })), "{name} {round}: {lost:?}");
        }
        // A restarted instance finds everything.
        let reader = ObjectSnapshots::new(db.clone(), objects.clone());
        assert_eq!(contents(&reader.load(doc).await.unwrap()), expect(0..n), "{name}");
    });
}

/// Appends and compactions of two instances at full speed: whatever wins each race, every
/// acknowledged update is in the snapshot or the journal at the end.
#[tokio::test]
async fn compactions_racing_with_appends_on_two_instances_never_lose_an_acknowledged_update() {
    let moto = moto().await;
    let objects = objects(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moai.db");
    let sqlite = SqliteStorage::open(&path, SqliteOptions::default(), Arc::new(NoopObserver)).unwrap();
    let cluster = tokio::task::spawn_blocking(pg::PgCluster::start).await.unwrap();
    let pg =
        || async { PostgresStorage::open(&cluster.url(), PostgresOptions::default(), Arc::new(NoopObserver)).await };
    type Instance = Arc<dyn DocJournal>;
    let instances: [(&str, Instance, Instance); 2] = [
        (
            "sqlite",
            Arc::new(ObjectSnapshots::new(sqlite.clone(), objects.clone())),
            Arc::new(ObjectSnapshots::new(sqlite.clone(), objects.clone())),
        ),
        (
            "postgres",
            Arc::new(ObjectSnapshots::new(pg().await.unwrap(), objects.clone())),
            Arc::new(ObjectSnapshots::new(pg().await.unwrap(), objects.clone())),
        ),
    ];
    for (name, one, two) in instances {
        let doc = format!("busy-{name}");
        let done = Arc::new(AtomicBool::new(false));
        let mut appenders = Vec::new();
        for (i, store) in [one.clone(), two.clone()].into_iter().enumerate() {
            let doc = doc.clone();
            appenders.push(tokio::spawn(async move {
                for k in 0..60u64 {
                    store.append(&doc, token(i as u64 * 1000 + k)).await.unwrap();
                }
            }));
        }
        let mut compactors = Vec::new();
        for store in [one.clone(), two.clone()] {
            let (doc, done) = (doc.clone(), done.clone());
            compactors.push(tokio::spawn(async move {
                let (mut won, mut lost) = (0, 0);
                // At least once, however soon the appenders are done.
                loop {
                    match compact(store.as_ref(), &doc).await {
                        Ok(()) => won += 1,
                        Err(StorageError::CompactionConflict { .. }) => lost += 1,
                        Err(e) => panic!("{e}"),
                    }
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                }
                (won, lost)
            }));
        }
        for a in appenders {
            a.await.unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let mut won = 0;
        let mut lost = 0;
        for c in compactors {
            let (w, l) = c.await.unwrap();
            (won, lost) = (won + w, lost + l);
        }
        eprintln!("{name}: {won} compactions went through, {lost} lost a race");
        assert!(won > 0, "{name}: some compaction went through");
        let all: BTreeSet<String> = expect((0..60).chain(1000..1060));
        assert_eq!(contents(&one.load(&doc).await.unwrap()), all, "{name}");
        compact(two.as_ref(), &doc).await.unwrap();
        let last = one.load(&doc).await.unwrap();
        assert!(last.updates.is_empty(), "{name}");
        assert_eq!(contents(&last), all, "{name}");
    }
    // After a restart of the SQLite instance, it is all there too.
    sqlite.close().await.unwrap();
    let reopened = SqliteStorage::open(&path, SqliteOptions::default(), Arc::new(NoopObserver)).unwrap();
    let reader = ObjectSnapshots::new(reopened, objects);
    assert_eq!(contents(&reader.load("busy-sqlite").await.unwrap()), expect((0..60).chain(1000..1060)));
}

#[tokio::test]
async fn an_object_store_that_stops_answering_fails_loads_and_compactions_in_time_and_appends_go_on() {
    let mut moto = moto().await;
    let timeout = Duration::from_millis(1500);
    let objects =
        SnapshotObjects::open(options(&moto, &format!("s3://{}/snapshots", moto.bucket), timeout)).await.unwrap();
    let journal = Arc::new(MemoryStorage::new());
    let store = ObjectSnapshots::new(journal.clone(), objects);
    store.append_many("d", vec![token(1), token(2)]).await.unwrap();
    compact(&store, "d").await.unwrap();
    store.append("d", token(3)).await.unwrap();
    let loaded = store.load("d").await.unwrap();

    moto.pause();
    // The compaction's PUT gets no answer: it fails within the timeout and the journal is as it
    // was.
    let started = Instant::now();
    let failed = store.compact("d", merged(&loaded), loaded.folded()).await;
    assert!(matches!(failed, Err(StorageError::ObjectStore { operation: "PUT", .. })), "{failed:?}");
    assert!(started.elapsed() < timeout + Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(journal.load("d").await.unwrap().updates.len(), 1, "the journal was not touched");
    // Appends do not need the object store.
    store.append("d", token(4)).await.unwrap();
    // A load fails (never an empty document), in time.
    let started = Instant::now();
    let failed = store.load("d").await;
    assert!(matches!(failed, Err(StorageError::ObjectStore { operation: "GET", .. })), "{failed:?}");
    assert!(started.elapsed() < timeout + Duration::from_secs(2), "took {:?}", started.elapsed());

    // Back: everything is there, and compaction works again.
    moto.resume();
    assert_eq!(contents(&store.load("d").await.unwrap()), expect(1..=4));
    compact(&store, "d").await.unwrap();
    assert_eq!(contents(&store.load("d").await.unwrap()), expect(1..=4));

    // Gone (connections refused): loads and compactions fail, appends go on. (Another test's
    // server could take the freed port, but not with this test's bucket.)
    moto.kill();
    let failed = store.load("d").await;
    assert!(matches!(failed, Err(StorageError::ObjectStore { .. })), "{failed:?}");
    let failed = store.compact("d", merged(&loaded), Folded::default()).await;
    assert!(matches!(failed, Err(StorageError::ObjectStore { .. })), "{failed:?}");
    store.append("d", token(5)).await.unwrap();
}

#[tokio::test]
async fn a_missing_bucket_fails_open_and_a_bucket_deleted_later_fails_loads_instead_of_looking_empty() {
    let moto = moto().await;
    let missing = SnapshotObjects::open(options(&moto, "s3://no-such-bucket/x", Duration::from_secs(5))).await;
    let err = missing.err().expect("a missing bucket fails open");
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");

    moto.create_bucket("short-lived");
    let objects = SnapshotObjects::open(options(&moto, "s3://short-lived", Duration::from_secs(5))).await.unwrap();
    let store = ObjectSnapshots::new(MemoryStorage::new(), objects);
    store.append("d", token(1)).await.unwrap();
    assert_eq!(contents(&store.load("d").await.unwrap()), expect([1]));
    let (status, body) = moto.request("DELETE", "/short-lived", &[], b"");
    assert_eq!(status, 204, "{body}");
    let failed = store.load("d").await;
    assert!(
        matches!(&failed, Err(e @ StorageError::ObjectStore { .. }) if e.to_string().contains("NoSuchBucket")),
        "{failed:?}"
    );
}
