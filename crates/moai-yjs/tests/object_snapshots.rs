//! Yjs documents with their snapshots in object storage (`moai_storage::ObjectSnapshots`, a real
//! S3-compatible server: crates/moai-storage/tests/support/moto.rs), written by two engine
//! instances that share the journal and the bucket, as two moai instances on one database do.
//! Their compactions race; whichever wins, the snapshot and the journal together hold every
//! update, and a fresh instance (a restart) finds them all.

#[path = "../../moai-storage/tests/support/moto.rs"]
mod moto;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moai_storage::{
    DocJournal, Folded, MemoryStorage, ObjectSnapshots, ObjectStoreOptions, SnapshotObjects, StorageError, StoredDoc,
};
use moai_yjs::service::{YjsConfig, YjsService};
use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::{Doc, GetString, Text, Transact, Update};
use tokio::sync::{Notify, Semaphore};

/// Appends `s` to the text `name` of `doc`; returns the update.
fn insert(doc: &Doc, name: &str, s: &str) -> Vec<u8> {
    let text = doc.get_or_insert_text(name);
    let mut txn = doc.transact_mut();
    let len = text.len(&txn);
    text.insert(&mut txn, len, s);
    txn.encode_update_v1()
}

fn text(doc: &Doc, name: &str) -> String {
    let t = doc.get_or_insert_text(name);
    let s = t.get_string(&doc.transact());
    s
}

/// The texts "a" and "b" of a document state.
fn texts(state: &[u8]) -> (String, String) {
    let doc = Doc::new();
    doc.transact_mut().apply_update(Update::decode_v1(state).unwrap()).unwrap();
    (text(&doc, "a"), text(&doc, "b"))
}

/// An engine instance's view of storage: records each compaction's outcome, and can hold
/// compactions at the door until released.
struct Instance {
    inner: ObjectSnapshots<Arc<MemoryStorage>>,
    held: bool,
    entered: Notify,
    release: Semaphore,
    outcomes: Mutex<Vec<Result<(), String>>>,
}

impl Instance {
    fn new(journal: &Arc<MemoryStorage>, objects: &SnapshotObjects, held: bool) -> Arc<Instance> {
        Arc::new(Instance {
            inner: ObjectSnapshots::new(journal.clone(), objects.clone()),
            held,
            entered: Notify::new(),
            release: Semaphore::new(0),
            outcomes: Mutex::default(),
        })
    }

    fn outcomes(&self) -> Vec<Result<(), String>> {
        self.outcomes.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl DocJournal for Instance {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
        self.inner.append_many(doc, updates).await
    }
    async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError> {
        self.inner.load(doc).await
    }
    async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError> {
        if self.held {
            self.entered.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        let result = self.inner.compact(doc, snapshot, folded).await;
        let outcome = match &result {
            Ok(()) => Ok(()),
            Err(StorageError::CompactionConflict { .. }) => Err("conflict".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        self.outcomes.lock().unwrap().push(outcome);
        result
    }
}

async fn bucket() -> (moto::Moto, SnapshotObjects) {
    let moto = tokio::task::spawn_blocking(|| {
        let moto = moto::Moto::start();
        moto.create_bucket("yjs-race");
        moto
    })
    .await
    .unwrap();
    let options = ObjectStoreOptions {
        endpoint: Some(moto.endpoint()),
        region: Some(moto::REGION.into()),
        access_key_id: Some(moto::ACCESS_KEY_ID.into()),
        secret_access_key: Some(moto::SECRET_ACCESS_KEY.into()),
        ..ObjectStoreOptions::from_url("s3://yjs-race/docs").unwrap()
    };
    let objects = SnapshotObjects::open(options).await.unwrap();
    (moto, objects)
}

fn config() -> YjsConfig {
    YjsConfig { compact_journal_bytes: 200, ..YjsConfig::default() }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Instance A's compaction is held after it rebuilt its snapshot; instance B edits and compacts
/// meanwhile; A's compaction, let go, must lose (it would replace B's snapshot with one that
/// lacks B's edits). Then every edit is still there, for A, for B and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_delayed_past_another_instances_loses_and_every_edit_survives() {
    let (_moto, objects) = bucket().await;
    let journal = Arc::new(MemoryStorage::new());
    let a_storage = Instance::new(&journal, &objects, true);
    let b_storage = Instance::new(&journal, &objects, false);
    let a = YjsService::new(a_storage.clone(), config());
    let b = YjsService::new(b_storage.clone(), config());
    let (writer_a, writer_b) = (Doc::new(), Doc::new());

    // A writes past the threshold; its compaction rebuilds and is held at the door.
    for i in 0..20 {
        a.apply_update("d", insert(&writer_a, "a", &format!("a{i:02}-{} ", "x".repeat(20)))).await.unwrap();
    }
    a_storage.entered.notified().await;

    // B loads the document (A's edits, from the journal), adds its own and compacts.
    for i in 0..20 {
        b.apply_update("d", insert(&writer_b, "b", &format!("b{i:02}-{} ", "y".repeat(20)))).await.unwrap();
    }
    eventually("B never compacted", || b_storage.outcomes().contains(&Ok(()))).await;

    // A's compaction goes on from its older load: the conditional PUT refuses it.
    a_storage.release.add_permits(1000);
    eventually("A's compaction never finished", || !a_storage.outcomes().is_empty()).await;
    assert_eq!(a_storage.outcomes()[0], Err("conflict".to_owned()), "A's stale snapshot must not win");

    // Both keep editing (each sees only its own edits live: no cross-instance broadcast yet).
    a.apply_update("d", insert(&writer_a, "a", "a-last ")).await.unwrap();
    b.apply_update("d", insert(&writer_b, "b", "b-last ")).await.unwrap();

    // A restarted instance finds every edit of both.
    let restarted = YjsService::new(Arc::new(ObjectSnapshots::new(journal.clone(), objects.clone())), config());
    let state = restarted.read_state("d").await.unwrap();
    assert_eq!(texts(&state), (text(&writer_a, "a"), text(&writer_b, "b")));
}

/// Two instances edit and compact one document at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_compacting_one_document_at_once_lose_no_edit() {
    let (_moto, objects) = bucket().await;
    let journal = Arc::new(MemoryStorage::new());
    let a_storage = Instance::new(&journal, &objects, false);
    let b_storage = Instance::new(&journal, &objects, false);
    let a = YjsService::new(a_storage.clone(), config());
    let b = YjsService::new(b_storage.clone(), config());
    let (writer_a, writer_b) = (Doc::new(), Doc::new());
    let edits = |svc: YjsService, writer: Doc, name: &'static str| async move {
        for i in 0..80 {
            svc.apply_update("d", insert(&writer, name, &format!("{name}{i:02}-{} ", "z".repeat(16)))).await.unwrap();
            tokio::task::yield_now().await;
        }
        text(&writer, name)
    };
    let (ta, tb) =
        tokio::join!(tokio::spawn(edits(a.clone(), writer_a, "a")), tokio::spawn(edits(b.clone(), writer_b, "b")));
    let (ta, tb) = (ta.unwrap(), tb.unwrap());
    // Compactions run in the background: the first to finish may come after the last edit.
    let all = || [a_storage.outcomes(), b_storage.outcomes()].concat();
    eventually("no compaction went through", || all().contains(&Ok(()))).await;
    let outcomes = all();
    assert!(
        outcomes.iter().all(|o| o.is_ok() || o.as_ref().err().map(String::as_str) == Some("conflict")),
        "{outcomes:?}"
    );

    let restarted = YjsService::new(Arc::new(ObjectSnapshots::new(journal.clone(), objects.clone())), config());
    assert_eq!(texts(&restarted.read_state("d").await.unwrap()), (ta, tb));
}
