//! What only the SQLite backend has: its file, its chunked snapshots, its migrations. The
//! contracts every backend keeps are in contract.rs.

use std::sync::Arc;

use moai_storage::{DocJournal, NoopObserver, SqliteOptions, SqliteStorage, StorageError, SCHEMA_VERSION};

fn open(path: &std::path::Path) -> SqliteStorage {
    SqliteStorage::open(path, SqliteOptions::default(), Arc::new(NoopObserver)).expect("open")
}

#[tokio::test]
async fn refuses_a_database_from_a_newer_moai() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moai.db");
    open(&path).close().await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("INSERT INTO schema_migrations(version) VALUES (?1)", [SCHEMA_VERSION + 5]).unwrap();
    drop(conn);
    match SqliteStorage::open(&path, SqliteOptions::default(), Arc::new(NoopObserver)) {
        Err(StorageError::SchemaTooNew { found, supported }) => {
            assert_eq!(found, SCHEMA_VERSION + 5);
            assert_eq!(supported, SCHEMA_VERSION);
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("opened a newer schema"),
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_fails_to_open_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moai.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = SqliteStorage::open(&path, SqliteOptions::default(), Arc::new(NoopObserver)).err().expect("must fail");
    assert!(err.to_string().contains("not a database"), "{err}");
    // And the garbage file is left as it was: we never overwrite what we cannot read.
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 8192]);
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
async fn large_snapshots_are_written_in_chunks_and_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moai.db");
    let store = open(&path);
    store.append("big", b"u".to_vec()).await.unwrap();
    let snapshot = pseudo_random(3 * (1 << 20) + 12345, 7);
    let folded = store.load("big").await.unwrap().folded();
    store.compact("big", snapshot.clone(), folded).await.unwrap();
    assert_eq!(store.load("big").await.unwrap().snapshot.as_deref(), Some(&snapshot[..]));
    let conn = rusqlite::Connection::open(&path).unwrap();
    let chunks: i64 =
        conn.query_row("SELECT COUNT(*) FROM doc_snapshot_chunks WHERE doc='big'", [], |r| r.get(0)).unwrap();
    assert_eq!(chunks, 4, "3 MiB + a bit = 4 chunks of 1 MiB");

    // A second compaction replaces the chunk set and leaves no old chunks behind.
    store.append("big", b"v".to_vec()).await.unwrap();
    let smaller = pseudo_random(1000, 9);
    let folded = store.load("big").await.unwrap().folded();
    store.compact("big", smaller.clone(), folded).await.unwrap();
    assert_eq!(store.load("big").await.unwrap().snapshot.as_deref(), Some(&smaller[..]));
    let chunks: i64 =
        conn.query_row("SELECT COUNT(*) FROM doc_snapshot_chunks WHERE doc='big'", [], |r| r.get(0)).unwrap();
    assert_eq!(chunks, 1);
}

#[tokio::test]
async fn a_compaction_that_crashed_half_way_changes_nothing_and_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moai.db");
    let store = open(&path);
    store.append("d", b"1".to_vec()).await.unwrap();
    let folded = store.load("d").await.unwrap().folded();
    store.compact("d", b"good".to_vec(), folded).await.unwrap();
    let s2 = store.append("d", b"2".to_vec()).await.unwrap();
    // What a crash after two chunks of a new snapshot leaves: chunks of an unreferenced version.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO doc_snapshot_chunks(doc, version, idx, data) VALUES ('d', 77, 0, x'dead'), ('d', 77, 1, x'beef')",
        [],
    )
    .unwrap();
    let loaded = store.load("d").await.unwrap();
    assert_eq!(loaded.snapshot.as_deref(), Some(&b"good"[..]));
    assert_eq!(loaded.updates, vec![(s2, b"2".to_vec())]);
    store.compact("d", b"better".to_vec(), loaded.folded()).await.unwrap();
    let versions: i64 = conn
        .query_row("SELECT COUNT(DISTINCT version) FROM doc_snapshot_chunks WHERE doc='d'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 1, "leftovers removed");
    assert_eq!(store.load("d").await.unwrap().snapshot.as_deref(), Some(&b"better"[..]));
}

#[tokio::test]
async fn inline_snapshots_from_before_chunking_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moai.db");
    let store = open(&path);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("INSERT INTO doc_snapshots(doc, snapshot, through_seq) VALUES ('old', x'0102', 0)", []).unwrap();
    assert_eq!(store.load("old").await.unwrap().snapshot, Some(vec![1, 2]));
}
