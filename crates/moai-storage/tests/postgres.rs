//! What only the PostgreSQL backend has: migrations shared by several instances, several
//! writers on one database, a server that goes away and comes back, the byte counter column,
//! and passwords kept out of errors. Each test starts its own throwaway cluster
//! (crates/moai-pgsync/tests/support/pg.rs). The contracts every backend keeps are in
//! contract.rs.

#[path = "../../moai-pgsync/tests/support/pg.rs"]
mod pg;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moai_storage::{
    BytesSinceSignature, CoValueAppend, CoValueStore, DocJournal, NoopObserver, PostgresOptions, PostgresStorage,
    SessionAppendRecord, StorageError, StorageObserver, POSTGRES_SCHEMA_VERSION,
};

async fn cluster() -> pg::PgCluster {
    tokio::task::spawn_blocking(pg::PgCluster::start).await.unwrap()
}

async fn open(url: &str) -> PostgresStorage {
    PostgresStorage::open(url, PostgresOptions::default(), Arc::new(NoopObserver)).await.expect("open")
}

/// A plain connection for looking at (and tampering with) the database behind the backend.
async fn psql(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn migrations_are_applied_once_by_instances_starting_together_and_a_newer_schema_is_refused() {
    let pg = cluster().await;
    let url = pg.url();
    // Four instances start at the same moment against an empty database.
    let opened = futures_util::future::join_all((0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { open(&url).await })
    }))
    .await;
    let stores: Vec<PostgresStorage> = opened.into_iter().map(|r| r.unwrap()).collect();
    stores[0].append("d", b"1".to_vec()).await.unwrap();
    for s in &stores {
        assert_eq!(s.load("d").await.unwrap().updates.len(), 1);
        s.close().await.unwrap();
    }
    // And again: nothing left to do, data intact.
    let again = open(&url).await;
    assert_eq!(again.load("d").await.unwrap().updates.len(), 1);
    again.close().await.unwrap();

    let db = psql(&url).await;
    let versions: Vec<i64> = db
        .query("SELECT version FROM moai_storage.schema_migrations ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=POSTGRES_SCHEMA_VERSION).collect::<Vec<_>>());

    // A schema written by a newer moai is refused, and left as it was.
    db.execute("INSERT INTO moai_storage.schema_migrations(version) VALUES ($1)", &[&(POSTGRES_SCHEMA_VERSION + 5)])
        .await
        .unwrap();
    match PostgresStorage::open(&url, PostgresOptions::default(), Arc::new(NoopObserver)).await {
        Err(StorageError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (POSTGRES_SCHEMA_VERSION + 5, POSTGRES_SCHEMA_VERSION));
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("opened a newer schema"),
    }
    let rows = db.query_one("SELECT count(*) FROM moai_storage.doc_updates", &[]).await.unwrap();
    assert_eq!(rows.get::<_, i64>(0), 1);

    // Another schema in the same database is another, independent store.
    let other = PostgresStorage::open(
        &url,
        PostgresOptions { schema: "tenant_b".into(), ..PostgresOptions::default() },
        Arc::new(NoopObserver),
    )
    .await
    .unwrap();
    assert!(other.load("d").await.unwrap().updates.is_empty());
    assert_eq!(other.schema(), "tenant_b");
    let bad = PostgresOptions { schema: "Robert'); DROP".into(), ..PostgresOptions::default() };
    assert!(matches!(
        PostgresStorage::open(&url, bad, Arc::new(NoopObserver)).await,
        Err(StorageError::PostgresConfig(_))
    ));
}

/// Sequence values are taken at insert and committed in any order across connections: an entry
/// with a lower number can become visible after a load that saw a higher one. A compaction of
/// that load must keep it.
#[tokio::test]
async fn an_entry_that_commits_late_with_a_lower_sequence_number_survives_compaction() {
    let pg = cluster().await;
    let store = open(&pg.url()).await;
    store.append("d", b"first".to_vec()).await.unwrap();
    // Another instance's append: it has its sequence number but has not committed yet.
    let mut other = psql(&pg.url()).await;
    let late = other.transaction().await.unwrap();
    let late_seq: i64 = late
        .query_one("INSERT INTO moai_storage.doc_updates(doc, data) VALUES ('d', 'late') RETURNING seq", &[])
        .await
        .unwrap()
        .get(0);
    let after = store.append("d", b"after".to_vec()).await.unwrap();
    assert!(after > late_seq as u64);
    let loaded = store.load("d").await.unwrap();
    assert_eq!(loaded.updates.len(), 2, "the uncommitted entry is not visible yet");
    late.commit().await.unwrap();
    store.compact("d", b"first+after".to_vec(), loaded.folded()).await.unwrap();
    let now = store.load("d").await.unwrap();
    assert_eq!(now.snapshot.as_deref(), Some(&b"first+after"[..]));
    assert_eq!(now.updates, vec![(late_seq as u64, b"late".to_vec())], "the late entry was not folded: it stays");
}

/// What the dashboard shows as storage size: moai's tables, growing with what is written.
#[tokio::test]
async fn size_counts_moai_tables_and_grows_with_writes() {
    let pg = cluster().await;
    let store = open(&pg.url()).await;
    let empty = store.size_bytes().await.unwrap();
    assert!(empty > 0, "tables and indexes take pages even when empty");
    // Incompressible bytes (PostgreSQL compresses large values).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..200 {
        let update: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        store.append(&format!("doc-{i}"), update).await.unwrap();
    }
    let full = store.size_bytes().await.unwrap();
    assert!(full >= empty + 200 * 4096, "{empty} -> {full}");
    store.close().await.unwrap();
}

/// A test "document": its snapshot is the sorted set of update payloads it holds, one per line.
fn merge(snapshot: Option<&[u8]>, updates: &[(u64, Vec<u8>)]) -> BTreeSet<Vec<u8>> {
    let mut all: BTreeSet<Vec<u8>> = BTreeSet::new();
    if let Some(s) = snapshot {
        all.extend(s.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec));
    }
    all.extend(updates.iter().map(|(_, u)| u.clone()));
    all
}

/// Two instances (two handles, two pools) append to and compact one document at once. Whatever
/// interleaving, every acknowledged append is in the final state exactly once; compactions that
/// started from stale loads lose with CompactionConflict and change nothing.
#[tokio::test]
async fn two_instances_appending_and_compacting_one_document_lose_nothing() {
    let pg = cluster().await;
    let a = open(&pg.url()).await;
    let b = open(&pg.url()).await;

    // The stale-load case, step by step: A loads, B appends and compacts, A's compaction loses.
    a.append("d", b"a0".to_vec()).await.unwrap();
    let stale = a.load("d").await.unwrap();
    b.append("d", b"b0".to_vec()).await.unwrap();
    let fresh = b.load("d").await.unwrap();
    b.compact("d", merge(None, &fresh.updates).into_iter().collect::<Vec<_>>().join(&b'\n'), fresh.folded())
        .await
        .unwrap();
    let b1 = b.append("d", b"b1".to_vec()).await.unwrap();
    let lost = a.compact("d", b"a0".to_vec(), stale.folded()).await;
    assert!(matches!(lost, Err(StorageError::CompactionConflict { .. })), "{lost:?}");
    let now = a.load("d").await.unwrap();
    assert_eq!(now.updates, vec![(b1, b"b1".to_vec())], "B's later entry survives A's lost compaction");
    let all = merge(now.snapshot.as_deref(), &now.updates);
    assert_eq!(all, [b"a0".to_vec(), b"b0".to_vec(), b"b1".to_vec()].into_iter().collect());

    // Then under load: two appenders and two compactors, one of each per instance.
    let acked = Arc::new(Mutex::new(all));
    let stop = Arc::new(AtomicBool::new(false));
    let conflicts = Arc::new(AtomicUsize::new(0));
    let compactions = Arc::new(AtomicUsize::new(0));
    let (mut appenders, mut compactors) = (Vec::new(), Vec::new());
    for (name, store) in [("a", a.clone()), ("b", b.clone())] {
        let (acked, store_) = (acked.clone(), store.clone());
        appenders.push(tokio::spawn(async move {
            for i in 0..300 {
                let payload = format!("{name}-{i}").into_bytes();
                store_.append("d", payload.clone()).await.unwrap();
                acked.lock().unwrap().insert(payload);
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
        let (stop, conflicts, compactions) = (stop.clone(), conflicts.clone(), compactions.clone());
        compactors.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let loaded = store.load("d").await.unwrap();
                let snapshot =
                    merge(loaded.snapshot.as_deref(), &loaded.updates).into_iter().collect::<Vec<_>>().join(&b'\n');
                match store.compact("d", snapshot, loaded.folded()).await {
                    Ok(()) => compactions.fetch_add(1, Ordering::SeqCst),
                    Err(StorageError::CompactionConflict { .. }) => conflicts.fetch_add(1, Ordering::SeqCst),
                    Err(e) => panic!("{e}"),
                };
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    for t in appenders {
        t.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for t in compactors {
        t.await.unwrap();
    }
    let end = b.load("d").await.unwrap();
    let stored = merge(end.snapshot.as_deref(), &end.updates);
    let acked = acked.lock().unwrap().clone();
    assert_eq!(stored.len(), acked.len(), "missing: {:?}", acked.difference(&stored).take(5).collect::<Vec<_>>());
    assert_eq!(stored, acked);
    // Nothing is both in the snapshot and in the journal: a compaction's delete and replace are
    // one transaction.
    let in_snapshot = merge(end.snapshot.as_deref(), &[]);
    assert!(end.updates.iter().all(|(_, u)| !in_snapshot.contains(u)));
    assert!(compactions.load(Ordering::SeqCst) > 0);
    eprintln!(
        "compactions: {} succeeded, {} lost a race",
        compactions.load(Ordering::SeqCst),
        conflicts.load(Ordering::SeqCst)
    );
}

/// Concurrent CoValue appends from two instances to one session: the row lock serialises them,
/// so each count is taken by exactly one append.
#[tokio::test]
async fn two_instances_appending_to_one_covalue_never_leave_a_gap() {
    let pg = cluster().await;
    let stores = [open(&pg.url()).await, open(&pg.url()).await];
    let tasks: Vec<_> = stores
        .iter()
        .enumerate()
        .flat_map(|(instance, store)| {
            (0..3).map(move |writer| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut won = 0u64;
                    for _ in 0..30 {
                        let known = store.known_states(vec!["co_zX".into()]).await.unwrap();
                        let stored = known[0].as_ref().and_then(|k| k.sessions.first().map(|s| s.1)).unwrap_or(0);
                        let append = CoValueAppend {
                            id: "co_zX".into(),
                            header: Some("{}".into()),
                            sessions: vec![SessionAppendRecord {
                                session: "s".into(),
                                after: stored,
                                transactions: vec![format!("{{\"by\":\"{instance}.{writer}\",\"at\":{stored}}}")],
                                last_signature: "sig".into(),
                                checkpoints: vec![],
                                bytes_since_signature: BytesSinceSignature::Add(1),
                            }],
                            deleted: false,
                            erase_sessions: vec![],
                        };
                        if store.append_covalue(append).await.is_ok() {
                            won += 1;
                        }
                    }
                    won
                })
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap();
    }
    let loaded = stores[0].load_covalue("co_zX").await.unwrap().unwrap();
    assert_eq!(loaded.sessions.len(), 1);
    let txs = &loaded.sessions[0].transactions;
    assert_eq!(txs.len() as u64, won);
    for (i, t) in txs.iter().enumerate() {
        assert!(t.ends_with(&format!("\"at\":{i}}}")), "transaction {i} is {t}");
    }
    // The byte counter column adds up every append (1 byte each), as SQLite's does.
    let db = psql(&pg.url()).await;
    let bytes: i64 =
        db.query_one("SELECT bytes_since_last_signature FROM moai_storage.cojson_sessions", &[]).await.unwrap().get(0);
    assert_eq!(bytes as u64, won);
}

#[derive(Default)]
struct Recorder {
    failures: Mutex<Vec<String>>,
    oks: AtomicUsize,
    failing: AtomicBool,
}

impl StorageObserver for Recorder {
    fn batch_committed(&self, _writes: usize, _latency: Duration) {}
    fn storage_failed(&self, reason: &str) {
        self.failing.store(true, Ordering::SeqCst);
        self.failures.lock().unwrap().push(reason.to_owned());
    }
    fn storage_ok(&self) {
        self.failing.store(false, Ordering::SeqCst);
        self.oks.fetch_add(1, Ordering::SeqCst);
    }
}

/// The database stops under load: writes fail with an error within a bounded time (not hang),
/// the observer says why, and once the database is back writes succeed again on fresh
/// connections. Nothing acknowledged is lost.
#[tokio::test]
async fn the_database_stopping_under_load_fails_writes_reports_and_recovers() {
    let pg = Arc::new(cluster().await);
    let observer = Arc::new(Recorder::default());
    let options = PostgresOptions { operation_timeout: Duration::from_secs(10), ..PostgresOptions::default() };
    let store = PostgresStorage::open(&pg.url(), options, observer.clone()).await.unwrap();
    let acked = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, acked, failed, stop) = (store.clone(), acked.clone(), failed.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let payload = format!("w{w}-{i}").into_bytes();
                i += 1;
                let started = Instant::now();
                match store.append("d", payload.clone()).await {
                    Ok(_) => acked.lock().unwrap().push(payload),
                    Err(e) => {
                        assert!(!matches!(e, StorageError::Closed), "{e}");
                        failed.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                slowest = slowest.max(started.elapsed());
            }
            slowest
        }));
    }
    let wait_for = |what: &'static str, cond: Box<dyn Fn() -> bool + Send>| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let acked_now = || acked.lock().unwrap().len();
    let before = acked_now();
    let a2 = acked.clone();
    wait_for("writes before the stop", Box::new(move || a2.lock().unwrap().len() > before + 100)).await;

    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.stop_immediate()).await.unwrap();
    let f2 = failed.clone();
    wait_for("failed writes", Box::new(move || f2.load(Ordering::SeqCst) > 0)).await;
    let o2 = observer.clone();
    wait_for("storage_failed", Box::new(move || o2.failing.load(Ordering::SeqCst))).await;
    let reason = observer.failures.lock().unwrap().last().cloned().unwrap();
    assert!(!reason.is_empty());
    let during = acked_now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(acked_now(), during, "no write can be acknowledged while the database is down");
    assert!(store.probe().await.is_err());

    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.start_again()).await.unwrap();
    let a2 = acked.clone();
    wait_for("writes after the restart", Box::new(move || a2.lock().unwrap().len() > during + 100)).await;
    let o2 = observer.clone();
    wait_for("storage_ok", Box::new(move || !o2.failing.load(Ordering::SeqCst))).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let slowest = w.await.unwrap();
        assert!(slowest < Duration::from_secs(20), "a write took {slowest:?}");
    }
    store.probe().await.unwrap();

    // Everything acknowledged is there (read by a new instance).
    store.close().await.unwrap();
    let reader = open(&pg.url()).await;
    let stored: BTreeSet<Vec<u8>> = reader.load("d").await.unwrap().updates.into_iter().map(|(_, u)| u).collect();
    let acked = acked.lock().unwrap().clone();
    let missing: Vec<_> = acked.iter().filter(|p| !stored.contains(*p)).take(5).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    eprintln!(
        "acked {}, failed {}, failures reported {}",
        acked.len(),
        failed.load(Ordering::SeqCst),
        observer.failures.lock().unwrap().len()
    );
}

#[tokio::test]
async fn close_drains_queued_writes_then_refuses() {
    let pg = cluster().await;
    let store = open(&pg.url()).await;
    let writes: Vec<_> = (0..500u32)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.append("d", i.to_be_bytes().to_vec()).await })
        })
        .collect();
    tokio::task::yield_now().await;
    store.close().await.unwrap();
    let mut ok = 0;
    for w in writes {
        match w.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StorageError::Closed) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(matches!(store.load("d").await, Err(StorageError::Closed)));
    assert!(matches!(store.probe().await, Err(StorageError::Closed)));
    let reader = open(&pg.url()).await;
    assert_eq!(reader.load("d").await.unwrap().updates.len(), ok, "every acknowledged write, no other");
}

#[tokio::test]
async fn a_wrong_password_fails_open_with_the_reason_and_never_shows_the_password() {
    let pg = tokio::task::spawn_blocking(|| {
        pg::PgCluster::start_with_hba(
            &["password_encryption = 'scram-sha-256'"],
            &["host all moai 127.0.0.1/32 scram-sha-256"],
        )
    })
    .await
    .unwrap();
    psql(&pg.url()).await.batch_execute("CREATE ROLE moai LOGIN PASSWORD 'right-horse'").await.unwrap();
    let url = format!("postgres://moai:wrong-battery@127.0.0.1:{}/postgres", pg.port);
    let err = PostgresStorage::open(&url, PostgresOptions::default(), Arc::new(NoopObserver)).await.err().unwrap();
    let text = err.to_string();
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("wrong-battery") && text.contains("moai@127.0.0.1"), "{text}");
    assert_eq!(moai_storage::redact_url(&url), format!("postgres://moai:***@127.0.0.1:{}/postgres", pg.port));

    // Nothing listens: a clear connection error within the connect timeout.
    let nowhere = format!("postgres://moai:secret@127.0.0.1:{}/postgres", free_port());
    let started = Instant::now();
    let err = PostgresStorage::open(&nowhere, PostgresOptions::default(), Arc::new(NoopObserver)).await.err().unwrap();
    assert!(matches!(err, StorageError::PostgresConnect { .. }), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A write the database refuses for what it wrote (here a NUL byte, which `text` cannot hold)
/// rolls back to its savepoint and fails alone: the writes sharing its batch commit, and it is
/// not reported as a storage failure.
#[tokio::test]
async fn a_refused_write_fails_alone_and_is_not_a_storage_failure() {
    let pg = cluster().await;
    let observer = Arc::new(Recorder::default());
    let store = PostgresStorage::open(&pg.url(), PostgresOptions::default(), observer.clone()).await.unwrap();
    let (a, bad, c) = tokio::join!(
        store.append("d", b"a".to_vec()),
        store.append("bad\0doc", b"b".to_vec()),
        store.append("d", b"c".to_vec())
    );
    assert!(a.is_ok() && c.is_ok(), "{a:?} {c:?}");
    match bad {
        Err(e @ StorageError::Postgres(_)) => assert!(e.to_string().contains("SQLSTATE 22021"), "{e}"),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
    assert_eq!(store.load("d").await.unwrap().updates.len(), 2);
    assert!(observer.failures.lock().unwrap().is_empty(), "{:?}", observer.failures.lock().unwrap());
    assert!(observer.oks.load(Ordering::SeqCst) > 0);
}
