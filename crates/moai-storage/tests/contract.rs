//! The storage contracts (`DocJournal`, `CoValueStore`) as their trait docs state them, run
//! against every backend: memory, SQLite and PostgreSQL (a throwaway cluster per test, see
//! crates/moai-pgsync/tests/support/pg.rs). The `DocJournal` contracts also run against each of
//! them wrapped in `ObjectSnapshots`, with the snapshots in a real S3-compatible server (moto, one
//! per test: tests/support/moto.rs). A backend-specific test belongs in sqlite.rs, postgres.rs or
//! object_snapshots.rs; anything an engine relies on belongs here.

#[path = "support/moto.rs"]
mod moto;
#[path = "../../moai-pgsync/tests/support/pg.rs"]
mod pg;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moai_storage::{
    AppendError, BytesSinceSignature, CoValueAppend, CoValueStore, DocJournal, Folded, Inventory, MemoryStorage,
    NoopObserver, ObjectSnapshots, ObjectStoreOptions, PostgresOptions, PostgresStorage, SessionAppendRecord,
    SnapshotObjects, SqliteOptions, SqliteStorage, StorageError, StorageObserver, StoredKnownState,
};

trait Store: DocJournal + CoValueStore + Inventory {}
impl<T: DocJournal + CoValueStore + Inventory> Store for T {}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Sqlite,
    Postgres,
    /// The backend's journal, snapshots in object storage (`ObjectSnapshots`).
    MemoryS3,
    SqliteS3,
    PostgresS3,
}

const KINDS: [Kind; 3] = [Kind::Memory, Kind::Sqlite, Kind::Postgres];

/// What the `DocJournal` contracts run against.
const DOC_KINDS: [Kind; 6] =
    [Kind::Memory, Kind::Sqlite, Kind::Postgres, Kind::MemoryS3, Kind::SqliteS3, Kind::PostgresS3];

/// One backend under test, fresh, with what it takes to reopen it.
enum Backend {
    Memory(Arc<MemoryStorage>),
    Sqlite { store: SqliteStorage, path: PathBuf, _dir: tempfile::TempDir },
    Postgres { store: PostgresStorage, cluster: Arc<pg::PgCluster> },
    MemoryS3 { store: ObjectSnapshots<MemoryStorage>, _s3: moto::Moto },
    SqliteS3 { store: ObjectSnapshots<SqliteStorage>, path: PathBuf, _dir: tempfile::TempDir, _s3: moto::Moto },
    PostgresS3 { store: ObjectSnapshots<PostgresStorage>, cluster: Arc<pg::PgCluster>, _s3: moto::Moto },
}

/// A moto server with a bucket, and the snapshot objects under a prefix of it.
async fn s3() -> (moto::Moto, SnapshotObjects) {
    let moto = tokio::task::spawn_blocking(|| {
        let moto = moto::Moto::start();
        moto.create_bucket("contract");
        moto
    })
    .await
    .unwrap();
    let options = ObjectStoreOptions {
        endpoint: Some(moto.endpoint()),
        region: Some(moto::REGION.into()),
        access_key_id: Some(moto::ACCESS_KEY_ID.into()),
        secret_access_key: Some(moto::SECRET_ACCESS_KEY.into()),
        ..ObjectStoreOptions::from_url("s3://contract/snapshots/yjs").unwrap()
    };
    let objects = SnapshotObjects::open(options).await.expect("open object storage");
    (moto, objects)
}

impl Backend {
    async fn open(kind: Kind, observer: Arc<dyn StorageObserver>) -> Backend {
        match kind {
            Kind::MemoryS3 => {
                let (s3, objects) = s3().await;
                Backend::MemoryS3 { store: ObjectSnapshots::new(MemoryStorage::new(), objects), _s3: s3 }
            }
            Kind::SqliteS3 => {
                let Backend::Sqlite { store, path, _dir } = Box::pin(Backend::open(Kind::Sqlite, observer)).await
                else {
                    unreachable!()
                };
                let (s3, objects) = s3().await;
                Backend::SqliteS3 { store: ObjectSnapshots::new(store, objects), path, _dir, _s3: s3 }
            }
            Kind::PostgresS3 => {
                let Backend::Postgres { store, cluster } = Box::pin(Backend::open(Kind::Postgres, observer)).await
                else {
                    unreachable!()
                };
                let (s3, objects) = s3().await;
                Backend::PostgresS3 { store: ObjectSnapshots::new(store, objects), cluster, _s3: s3 }
            }
            Kind::Memory => Backend::Memory(Arc::new(MemoryStorage::new())),
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("moai.db");
                let store = SqliteStorage::open(&path, SqliteOptions::default(), observer).expect("open SQLite");
                Backend::Sqlite { store, path, _dir: dir }
            }
            Kind::Postgres => {
                let cluster = Arc::new(tokio::task::spawn_blocking(pg::PgCluster::start).await.unwrap());
                let store = PostgresStorage::open(&cluster.url(), PostgresOptions::default(), observer)
                    .await
                    .expect("open PostgreSQL");
                Backend::Postgres { store, cluster }
            }
        }
    }

    /// The whole store ([`KINDS`] only: `ObjectSnapshots` adds nothing to CoValues and listing).
    fn store(&self) -> &dyn Store {
        match self {
            Backend::Memory(m) => m.as_ref(),
            Backend::Sqlite { store, .. } => store,
            Backend::Postgres { store, .. } => store,
            _ => unreachable!("the CoValue and Inventory contracts run against the plain backends"),
        }
    }

    /// The Yjs journal ([`DOC_KINDS`]).
    fn journal(&self) -> &dyn DocJournal {
        match self {
            Backend::Memory(m) => m.as_ref(),
            Backend::Sqlite { store, .. } => store,
            Backend::Postgres { store, .. } => store,
            Backend::MemoryS3 { store, .. } => store,
            Backend::SqliteS3 { store, .. } => store,
            Backend::PostgresS3 { store, .. } => store,
        }
    }

    fn durable(&self) -> bool {
        !matches!(self, Backend::Memory(_) | Backend::MemoryS3 { .. })
    }

    /// Closes and opens again (memory: nothing to do, "durable" means visible to the next load).
    async fn reopen(&mut self) {
        match self {
            Backend::Memory(_) => {}
            Backend::Sqlite { store, path, .. } => {
                store.close().await.unwrap();
                *store = SqliteStorage::open(path, SqliteOptions::default(), Arc::new(NoopObserver)).unwrap();
            }
            Backend::Postgres { store, cluster } => {
                store.close().await.unwrap();
                *store = PostgresStorage::open(&cluster.url(), PostgresOptions::default(), Arc::new(NoopObserver))
                    .await
                    .unwrap();
            }
            // The journal's database is reopened; the bucket is the same (a restarted instance).
            Backend::MemoryS3 { .. } => {}
            Backend::SqliteS3 { store, path, .. } => {
                store.journal().close().await.unwrap();
                let journal = SqliteStorage::open(path, SqliteOptions::default(), Arc::new(NoopObserver)).unwrap();
                *store = ObjectSnapshots::new(journal, store.objects().clone());
            }
            Backend::PostgresS3 { store, cluster, .. } => {
                store.journal().close().await.unwrap();
                let journal = PostgresStorage::open(&cluster.url(), PostgresOptions::default(), Arc::new(NoopObserver))
                    .await
                    .unwrap();
                *store = ObjectSnapshots::new(journal, store.objects().clone());
            }
        }
    }

    async fn close(&self) {
        match self {
            Backend::Memory(_) | Backend::MemoryS3 { .. } => {}
            Backend::Sqlite { store, .. } => store.close().await.unwrap(),
            Backend::Postgres { store, .. } => store.close().await.unwrap(),
            Backend::SqliteS3 { store, .. } => store.journal().close().await.unwrap(),
            Backend::PostgresS3 { store, .. } => store.journal().close().await.unwrap(),
        }
    }
}

async fn open(kind: Kind) -> Backend {
    Backend::open(kind, Arc::new(NoopObserver)).await
}

// ---------------------------------------------------------------------------------------------
// DocJournal

#[tokio::test]
async fn appended_updates_survive_reopen_in_order() {
    for kind in DOC_KINDS {
        let mut backend = open(kind).await;
        let store = backend.journal();
        let a = store.append("doc-a", b"one".to_vec()).await.unwrap();
        let b = store.append("doc-a", b"two".to_vec()).await.unwrap();
        store.append("doc-b", b"other".to_vec()).await.unwrap();
        let many = store.append_many("doc-a", vec![b"three".to_vec(), b"four".to_vec()]).await.unwrap().unwrap();
        assert_eq!(store.append_many("doc-a", vec![]).await.unwrap(), None, "{kind:?}");
        assert!(b > a && many > b, "{kind:?}: sequence numbers grow");
        backend.reopen().await;

        let doc = backend.journal().load("doc-a").await.unwrap();
        assert_eq!(doc.snapshot, None, "{kind:?}");
        assert_eq!(doc.snapshot_version, None, "{kind:?}");
        let data: Vec<&[u8]> = doc.updates.iter().map(|(_, u)| u.as_slice()).collect();
        assert_eq!(data, [&b"one"[..], b"two", b"three", b"four"], "{kind:?}");
        assert_eq!(&doc.updates[..2], &[(a, b"one".to_vec()), (b, b"two".to_vec())], "{kind:?}");
        assert_eq!(doc.last_seq(), Some(many), "{kind:?}");
        assert!(backend.journal().load("nobody").await.unwrap().updates.is_empty(), "{kind:?}");
        backend.close().await;
    }
}

#[tokio::test]
async fn compaction_keeps_updates_appended_after_it() {
    for kind in DOC_KINDS {
        let backend = open(kind).await;
        let store = backend.journal();
        let s1 = store.append("d", b"1".to_vec()).await.unwrap();
        let _s2 = store.append("d", b"2".to_vec()).await.unwrap();
        let loaded = store.load("d").await.unwrap();
        let s3 = store.append("d", b"3".to_vec()).await.unwrap();
        store.compact("d", b"snap-1-2".to_vec(), loaded.folded()).await.unwrap();
        let after = store.load("d").await.unwrap();
        assert_eq!(after.snapshot.as_deref(), Some(&b"snap-1-2"[..]), "{kind:?}");
        assert!(after.snapshot_version.is_some(), "{kind:?}");
        assert_eq!(after.updates, vec![(s3, b"3".to_vec())], "{kind:?}: update 3 must survive compaction");
        assert!(s1 < s3);
        backend.close().await;
    }
}

/// Exactly `folded.seqs` are deleted, whatever other entries' sequence numbers: on a database
/// shared by several writers an entry with a lower number can commit after a load.
#[tokio::test]
async fn compaction_deletes_exactly_the_folded_entries() {
    for kind in DOC_KINDS {
        let backend = open(kind).await;
        let store = backend.journal();
        let s1 = store.append("d", b"1".to_vec()).await.unwrap();
        let s2 = store.append("d", b"2".to_vec()).await.unwrap();
        let s3 = store.append("d", b"3".to_vec()).await.unwrap();
        let other = store.append("e", b"other doc".to_vec()).await.unwrap();
        // A compaction that folded 1 and 3 but not 2 (and names another document's entry).
        let folded = Folded { snapshot_version: None, seqs: vec![s1, s3, other] };
        store.compact("d", b"snap-1-3".to_vec(), folded).await.unwrap();
        let after = store.load("d").await.unwrap();
        assert_eq!(after.updates, vec![(s2, b"2".to_vec())], "{kind:?}");
        assert_eq!(store.load("e").await.unwrap().updates.len(), 1, "{kind:?}: only this document's entries");
        backend.close().await;
    }
}

/// Two compactions of one document that started from the same snapshot: the one that finishes
/// second must not replace the first one's snapshot (it may hold less), and loses instead.
#[tokio::test]
async fn a_compaction_that_lost_the_race_changes_nothing() {
    for kind in DOC_KINDS {
        let backend = open(kind).await;
        let store = backend.journal();
        store.append("d", b"1".to_vec()).await.unwrap();
        let slow = store.load("d").await.unwrap();
        store.append("d", b"2".to_vec()).await.unwrap();
        let fast = store.load("d").await.unwrap();
        store.compact("d", b"snap-1-2".to_vec(), fast.folded()).await.unwrap();
        let lost = store.compact("d", b"snap-1".to_vec(), slow.folded()).await;
        assert!(matches!(lost, Err(StorageError::CompactionConflict { .. })), "{kind:?}: {lost:?}");
        let after = store.load("d").await.unwrap();
        assert_eq!(after.snapshot.as_deref(), Some(&b"snap-1-2"[..]), "{kind:?}: the newer snapshot stays");
        assert!(after.updates.is_empty(), "{kind:?}");

        // The same from a snapshot that existed: a second compaction from one load loses too.
        let s3 = store.append("d", b"3".to_vec()).await.unwrap();
        let current = store.load("d").await.unwrap();
        store.compact("d", b"snap-1-2-3".to_vec(), current.folded()).await.unwrap();
        let again = store.compact("d", b"snap-stale".to_vec(), current.folded()).await;
        assert!(matches!(again, Err(StorageError::CompactionConflict { .. })), "{kind:?}: {again:?}");
        let last = store.load("d").await.unwrap();
        assert_eq!(last.snapshot.as_deref(), Some(&b"snap-1-2-3"[..]), "{kind:?}");
        assert_ne!(last.snapshot_version, current.snapshot_version, "{kind:?}: every replace is a new version");
        assert!(s3 > 0);
        // A version the backend never handed out matches nothing.
        let made_up = Folded { snapshot_version: Some("no-such-version".into()), seqs: vec![] };
        let made_up = store.compact("d", b"x".to_vec(), made_up).await;
        assert!(matches!(made_up, Err(StorageError::CompactionConflict { .. })), "{kind:?}: {made_up:?}");
        backend.close().await;
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn large_snapshots_are_read_back_exactly() {
    for kind in DOC_KINDS {
        let mut backend = open(kind).await;
        let store = backend.journal();
        store.append("big", b"u".to_vec()).await.unwrap();
        let snapshot = pseudo_random(3 * (1 << 20) + 12345, 7);
        let folded = store.load("big").await.unwrap().folded();
        store.compact("big", snapshot.clone(), folded).await.unwrap();
        assert_eq!(store.load("big").await.unwrap().snapshot.as_deref(), Some(&snapshot[..]), "{kind:?}");

        // A smaller one replaces it entirely.
        store.append("big", b"v".to_vec()).await.unwrap();
        let smaller = pseudo_random(1000, 9);
        let folded = store.load("big").await.unwrap().folded();
        store.compact("big", smaller.clone(), folded).await.unwrap();
        backend.reopen().await;
        let loaded = backend.journal().load("big").await.unwrap();
        assert_eq!(loaded.snapshot.as_deref(), Some(&smaller[..]), "{kind:?}");
        assert!(loaded.updates.is_empty(), "{kind:?}");
        backend.close().await;
    }
}

struct CountingObserver {
    batches: AtomicUsize,
    writes: AtomicUsize,
}

impl StorageObserver for CountingObserver {
    fn batch_committed(&self, writes: usize, _latency: Duration) {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.writes.fetch_add(writes, Ordering::SeqCst);
    }
}

/// Concurrent writers share group commits; every acknowledged write is reported committed and
/// is there, each with its own sequence number.
#[tokio::test]
async fn every_acknowledged_write_is_reported_committed() {
    for kind in [Kind::Sqlite, Kind::Postgres] {
        let obs = Arc::new(CountingObserver { batches: AtomicUsize::new(0), writes: AtomicUsize::new(0) });
        let backend = Arc::new(Backend::open(kind, obs.clone()).await);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move { b.store().append("doc", vec![i as u8]).await }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 200, "{kind:?}: unique sequence numbers");
        assert_eq!(obs.writes.load(Ordering::SeqCst), 200, "{kind:?}");
        assert!(obs.batches.load(Ordering::SeqCst) <= 200, "{kind:?}");
        assert_eq!(backend.store().load("doc").await.unwrap().updates.len(), 200, "{kind:?}");
        backend.close().await;
    }
}

#[tokio::test]
async fn writes_after_close_fail_instead_of_vanishing() {
    for kind in [Kind::Sqlite, Kind::Postgres] {
        let backend = open(kind).await;
        assert!(backend.durable());
        backend.store().append("d", b"x".to_vec()).await.unwrap();
        backend.close().await;
        let after = backend.store().append("d", b"y".to_vec()).await;
        assert!(matches!(after, Err(StorageError::Closed)), "{kind:?}: {after:?}");
        let results = backend.store().append_covalues(vec![append(ID, Some(HEADER), vec![])]).await;
        assert!(matches!(results[..], [Err(AppendError::Storage(StorageError::Closed))]), "{kind:?}: {results:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// CoValueStore

const ID: &str = "co_zMap";
// Key order and number text that a re-serialisation could change: stored as given.
const HEADER: &str = r#"{"type":"comap","ruleset":{"type":"unsafeAllowAll"},"meta":null,"uniqueness":1e21}"#;

fn tx(n: u64) -> String {
    format!(r#"{{"privacy":"trusting","madeAt":{n},"changes":"[{{\"z\":1,\"a\":0.10000000000000001}}]"}}"#)
}

fn session(name: &str, after: u64, n: u64, checkpoints: Vec<u64>) -> SessionAppendRecord {
    SessionAppendRecord {
        session: name.into(),
        after,
        transactions: (after..after + n).map(tx).collect(),
        last_signature: format!("signature_z{name}{}", after + n),
        checkpoints: checkpoints.into_iter().map(|c| (c, format!("signature_z{name}{c}"))).collect(),
        bytes_since_signature: BytesSinceSignature::Add(10 * n),
    }
}

fn append(id: &str, header: Option<&str>, sessions: Vec<SessionAppendRecord>) -> CoValueAppend {
    CoValueAppend { id: id.into(), header: header.map(Into::into), sessions, deleted: false, erase_sessions: vec![] }
}

#[tokio::test]
async fn reload_equals_what_was_written() {
    for kind in KINDS {
        let mut backend = open(kind).await;
        let store = backend.store();
        store.append_covalue(append(ID, Some(HEADER), vec![session("s1_session_zA", 0, 2, vec![2])])).await.unwrap();
        store
            .append_covalue(append(
                ID,
                None,
                vec![session("s1_session_zA", 2, 3, vec![4]), session("s2_session_zB", 0, 1, vec![])],
            ))
            .await
            .unwrap();
        let loaded = store.load_covalue(ID).await.unwrap().expect("stored");
        assert_eq!(loaded.header, HEADER, "{kind:?}");
        assert!(!loaded.deleted);
        assert_eq!(loaded.sessions.len(), 2, "{kind:?}");
        let a = &loaded.sessions[0];
        assert_eq!(a.session, "s1_session_zA", "{kind:?}");
        assert_eq!(a.transactions, (0..5).map(tx).collect::<Vec<_>>(), "{kind:?}");
        assert_eq!(a.last_signature, "signature_zs1_session_zA5", "{kind:?}");
        assert_eq!(
            a.checkpoints,
            vec![(2, "signature_zs1_session_zA2".to_string()), (4, "signature_zs1_session_zA4".to_string())],
            "{kind:?}"
        );
        assert_eq!(loaded.sessions[1].transactions, vec![tx(0)], "{kind:?}");

        let known = store.known_states(vec![ID.into(), "co_zNothing".into(), ID.into()]).await.unwrap();
        let expected = StoredKnownState {
            header: true,
            sessions: vec![("s1_session_zA".into(), 5), ("s2_session_zB".into(), 1)],
            deleted: false,
        };
        assert_eq!(known, vec![Some(expected.clone()), None, Some(expected)], "{kind:?}");
        assert_eq!(store.load_covalue("co_zNothing").await.unwrap(), None, "{kind:?}");

        // A header-only CoValue exists with no sessions; deleting keeps rows, sets the flag.
        store.append_covalue(append("co_zEmpty", Some("{}"), vec![])).await.unwrap();
        let empty = store.load_covalue("co_zEmpty").await.unwrap().unwrap();
        assert!(empty.sessions.is_empty(), "{kind:?}");
        let known = store.known_states(vec!["co_zEmpty".into()]).await.unwrap();
        assert_eq!(known[0].as_ref().map(|k| k.sessions.len()), Some(0), "{kind:?}");
        let mut del = append(ID, None, vec![session("s3_session_zD$", 0, 1, vec![])]);
        del.deleted = true;
        store.append_covalue(del).await.unwrap();
        let deleted = store.load_covalue(ID).await.unwrap().unwrap();
        assert!(deleted.deleted, "{kind:?}");
        assert_eq!(deleted.sessions.len(), 3, "{kind:?}: nothing erased unless asked");

        // Erasing the deleted CoValue's content leaves the header and the delete session.
        let mut erase = append(ID, None, vec![]);
        erase.erase_sessions = vec!["s1_session_zA".into(), "s2_session_zB".into(), "never_session_zX".into()];
        store.append_covalue(erase).await.unwrap();
        let erased = store.load_covalue(ID).await.unwrap().unwrap();
        assert_eq!((erased.header.as_str(), erased.deleted), (HEADER, true), "{kind:?}");
        assert_eq!(
            erased.sessions.iter().map(|s| s.session.as_str()).collect::<Vec<_>>(),
            vec!["s3_session_zD$"],
            "{kind:?}"
        );
        let known = store.known_states(vec![ID.into()]).await.unwrap();
        assert_eq!(known[0].as_ref().unwrap().sessions, vec![("s3_session_zD$".to_string(), 1)], "{kind:?}");
        // An erased session starts again from nothing (its old count is gone too).
        store.append_covalue(append(ID, None, vec![session("s1_session_zA", 0, 1, vec![])])).await.unwrap();

        // And all of it survives reopening.
        let written = store.load_covalue(ID).await.unwrap();
        backend.reopen().await;
        assert_eq!(backend.store().load_covalue(ID).await.unwrap(), written, "{kind:?}");
        backend.close().await;
    }
}

#[tokio::test]
async fn an_append_that_does_not_continue_the_log_is_refused_whole() {
    for kind in KINDS {
        let backend = open(kind).await;
        let store = backend.store();
        store.append_covalue(append(ID, Some(HEADER), vec![session("s1_session_zA", 0, 2, vec![])])).await.unwrap();
        let before = store.load_covalue(ID).await.unwrap();

        // A good new session plus a gap in the old one: nothing of it may be stored.
        let gap =
            append(ID, None, vec![session("s2_session_zB", 0, 1, vec![]), session("s1_session_zA", 3, 1, vec![])]);
        match store.append_covalue(gap).await {
            Err(AppendError::CountMismatch { id, session, after, stored }) => {
                assert_eq!((id.as_str(), session.as_str(), after, stored), (ID, "s1_session_zA", 3, 2), "{kind:?}");
            }
            other => panic!("{kind:?}: expected a count mismatch, got {other:?}"),
        }
        // Re-sending what is stored (overwrite) is refused the same way.
        let overlap = append(ID, None, vec![session("s1_session_zA", 1, 2, vec![])]);
        let result = store.append_covalue(overlap).await;
        assert!(matches!(result, Err(AppendError::CountMismatch { stored: 2, .. })), "{kind:?}: {result:?}");
        assert_eq!(store.load_covalue(ID).await.unwrap(), before, "{kind:?}: refused appends left no trace");

        let headless = append("co_zNew", None, vec![session("s1_session_zA", 0, 1, vec![])]);
        let result = store.append_covalue(headless).await;
        assert!(matches!(result, Err(AppendError::MissingHeader { .. })), "{kind:?}: {result:?}");
        assert_eq!(store.load_covalue("co_zNew").await.unwrap(), None, "{kind:?}");
        // A refused append that would have created the CoValue does not create it.
        let new_with_gap = append("co_zNew", Some("{}"), vec![session("s1_session_zA", 1, 1, vec![])]);
        let result = store.append_covalue(new_with_gap).await;
        assert!(matches!(result, Err(AppendError::CountMismatch { stored: 0, .. })), "{kind:?}: {result:?}");
        assert_eq!(store.load_covalue("co_zNew").await.unwrap(), None, "{kind:?}");
        let bad_checkpoint = append(ID, None, vec![session("s1_session_zA", 2, 1, vec![7])]);
        let result = store.append_covalue(bad_checkpoint).await;
        assert!(matches!(result, Err(AppendError::CheckpointOutOfRange { count: 7, .. })), "{kind:?}: {result:?}");
        let empty = append(ID, None, vec![session("s1_session_zA", 2, 0, vec![])]);
        let result = store.append_covalue(empty).await;
        assert!(matches!(result, Err(AppendError::EmptySession { .. })), "{kind:?}: {result:?}");
        assert_eq!(store.load_covalue(ID).await.unwrap(), before, "{kind:?}");
        backend.close().await;
    }
}

#[tokio::test]
async fn a_batch_commits_each_append_on_its_own_and_in_order() {
    for kind in KINDS {
        let backend = open(kind).await;
        let store = backend.store();
        let results = store
            .append_covalues(vec![
                append(ID, Some(HEADER), vec![session("s1_session_zA", 0, 1, vec![])]),
                // Sees the first append of the batch.
                append(ID, None, vec![session("s1_session_zA", 1, 1, vec![])]),
                // Refused: a gap.
                append(ID, None, vec![session("s1_session_zA", 5, 1, vec![])]),
                append("co_zOther", Some("{}"), vec![session("s9_session_zO", 0, 1, vec![])]),
                // The same session twice in one append: the second continues the first.
                append(
                    "co_zTwice",
                    Some("{}"),
                    vec![session("s1_session_zT", 0, 1, vec![]), session("s1_session_zT", 1, 2, vec![3])],
                ),
            ])
            .await;
        let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(ok, vec![true, true, false, true, true], "{kind:?}: {results:?}");
        let known = store.known_states(vec![ID.into(), "co_zOther".into(), "co_zTwice".into()]).await.unwrap();
        assert_eq!(known[0].as_ref().unwrap().sessions, vec![("s1_session_zA".to_string(), 2)], "{kind:?}");
        assert!(known[1].is_some(), "{kind:?}");
        assert_eq!(known[2].as_ref().unwrap().sessions, vec![("s1_session_zT".to_string(), 3)], "{kind:?}");
        let twice = store.load_covalue("co_zTwice").await.unwrap().unwrap();
        assert_eq!(twice.sessions[0].transactions, (0..3).map(tx).collect::<Vec<_>>(), "{kind:?}");
        assert_eq!(twice.sessions[0].checkpoints, vec![(3, "signature_zs1_session_zT3".to_string())], "{kind:?}");
        backend.close().await;
    }
}

/// Many concurrent appends racing to continue one session: exactly one append per count wins,
/// the others are refused, and the log has no gap or duplicate.
#[tokio::test]
async fn concurrent_appends_to_one_session_never_leave_a_gap() {
    for kind in KINDS {
        let backend = Arc::new(open(kind).await);
        backend.store().append_covalue(append(ID, Some(HEADER), vec![])).await.unwrap();
        let mut tasks = Vec::new();
        for writer in 0..4u64 {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move {
                let mut won = 0;
                for _ in 0..25 {
                    let stored = b.store().known_states(vec![ID.into()]).await.unwrap()[0]
                        .as_ref()
                        .and_then(|k| k.sessions.first().map(|(_, n)| *n))
                        .unwrap_or(0);
                    let mut s = session("s1_session_zA", stored, 1, vec![]);
                    s.transactions = vec![format!("{{\"writer\":{writer},\"at\":{stored}}}")];
                    match b.store().append_covalue(append(ID, None, vec![s])).await {
                        Ok(()) => won += 1,
                        Err(AppendError::CountMismatch { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                won
            }));
        }
        let mut won = 0;
        for t in tasks {
            won += t.await.unwrap();
        }
        let loaded = backend.store().load_covalue(ID).await.unwrap().unwrap();
        let txs = &loaded.sessions[0].transactions;
        assert_eq!(txs.len() as u64, won, "{kind:?}");
        for (i, t) in txs.iter().enumerate() {
            assert!(t.ends_with(&format!("\"at\":{i}}}")), "{kind:?}: transaction {i} is {t}");
        }
        backend.close().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Inventory

/// Every page of a listing, `limit` ids at a time, until an empty page.
async fn list_all(store: &dyn Store, covalues: bool, limit: usize) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    loop {
        let after = all.last().map(String::as_str);
        let page = match covalues {
            false => store.list_docs(after, limit).await.unwrap(),
            true => store.list_covalues(after, limit).await.unwrap(),
        };
        assert!(page.len() <= limit, "a page holds at most its limit");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

#[tokio::test]
async fn listing_names_every_stored_document_and_covalue_once_in_pages() {
    for kind in KINDS {
        let mut backend = open(kind).await;
        let store = backend.store();
        assert!(store.list_docs(None, 10).await.unwrap().is_empty(), "{kind:?}: an empty store lists nothing");
        assert!(store.list_covalues(None, 10).await.unwrap().is_empty(), "{kind:?}");

        // Journal only; snapshot and journal; snapshot only (its journal folded away); an empty
        // append stores nothing, so that document does not exist.
        for doc in ["d-journal", "b-both", "c-snapshot"] {
            store.append_many(doc, vec![b"1".to_vec(), b"2".to_vec()]).await.unwrap();
        }
        for doc in ["b-both", "c-snapshot"] {
            let loaded = store.load(doc).await.unwrap();
            store.compact(doc, b"snap".to_vec(), loaded.folded()).await.unwrap();
        }
        store.append("b-both", b"3".to_vec()).await.unwrap();
        assert!(store.load("c-snapshot").await.unwrap().updates.is_empty(), "{kind:?}");
        store.append_many("e-nothing", vec![]).await.unwrap();
        for id in ["co_zB", "co_zA", "co_zC"] {
            store.append_covalue(append(id, Some(HEADER), vec![session("s1_session_zA", 0, 1, vec![])])).await.unwrap();
        }
        backend.reopen().await;
        let store = backend.store();

        for limit in [1, 2, 100] {
            assert_eq!(list_all(store, false, limit).await, ["b-both", "c-snapshot", "d-journal"], "{kind:?} {limit}");
            assert_eq!(list_all(store, true, limit).await, ["co_zA", "co_zB", "co_zC"], "{kind:?} {limit}");
        }
        assert_eq!(store.list_docs(Some("b-both"), 1).await.unwrap(), ["c-snapshot"], "{kind:?}: after is exclusive");
        assert_eq!(store.list_docs(Some("a"), 1).await.unwrap(), ["b-both"], "{kind:?}: after need not be stored");
        assert!(store.list_covalues(Some("co_zC"), 5).await.unwrap().is_empty(), "{kind:?}");
        backend.close().await;
    }
}
