//! The async driver against storage: single-flight loading, durability before broadcast,
//! slow clients, storage and load failures, compaction and eviction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gated::GatedJournal;
use moai_storage::{DocJournal, MemoryStorage};
use moai_yjs::protocol::sync_update_frame;
use moai_yjs::service::{Outbound, ServiceError, YjsConfig, YjsService, YjsSession};
use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::{Doc, GetString, Text, Transact, Update};
use moai_yjs::{Message, SyncMessage};

fn insert(doc: &Doc, s: &str) -> Vec<u8> {
    let text = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    let len = text.len(&txn);
    text.insert(&mut txn, len, s);
    txn.encode_update_v1()
}

fn apply(doc: &Doc, update: &[u8]) {
    doc.transact_mut().apply_update(Update::decode_v1(update).unwrap()).unwrap();
}

fn text(doc: &Doc) -> String {
    let t = doc.get_or_insert_text("t");
    let txn = doc.transact();
    t.get_string(&txn)
}

/// Next frame for a session, with a generous bound so a bug fails instead of hanging.
async fn next(session: &mut YjsSession) -> Outbound {
    tokio::time::timeout(Duration::from_secs(10), session.outbound())
        .await
        .expect("timed out")
        .expect("session dropped")
}

/// Reads frames until an update (sync step 2 or update) arrives and applies it to `doc`.
async fn apply_next_update(session: &mut YjsSession, doc: &Doc) {
    loop {
        if let Outbound::Frame(f) = next(session).await {
            if let Ok(Message::Sync(SyncMessage::Update(u) | SyncMessage::Step2(u))) = Message::decode(&f) {
                apply(doc, u);
                return;
            }
        }
    }
}

fn service(storage: Arc<dyn DocJournal>, config: YjsConfig) -> YjsService {
    YjsService::new(storage, config)
}

#[tokio::test]
async fn simultaneous_first_joins_share_one_document() {
    for round in 0..20 {
        let svc = service(Arc::new(MemoryStorage::new()), YjsConfig::default());
        let doc_id = format!("doc-{round}");
        let (a, b, c) = tokio::join!(svc.join(&doc_id), svc.join(&doc_id), svc.join(&doc_id));
        let (a, mut b, mut c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(svc.loaded_documents(), 1);
        let writer = Doc::new();
        assert!(a.receive(Bytes::from(sync_update_frame(&insert(&writer, "hi")))).await);
        let (rb, rc) = (Doc::new(), Doc::new());
        apply_next_update(&mut b, &rb).await;
        apply_next_update(&mut c, &rc).await;
        assert_eq!((text(&rb), text(&rc)), ("hi".into(), "hi".into()), "round {round}");
    }
}

mod gated {
    //! A journal whose appends wait for a gate, to observe what happens before durability.
    use super::*;
    use moai_storage::{Folded, StorageError, StoredDoc};
    use tokio::sync::{Notify, Semaphore};

    pub struct GatedJournal {
        pub inner: MemoryStorage,
        pub entered: Notify,
        pub gate: Semaphore,
        pub fail: AtomicBool,
    }

    #[async_trait::async_trait]
    impl DocJournal for GatedJournal {
        async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
            self.entered.notify_one();
            self.gate.acquire().await.unwrap().forget();
            if self.fail.load(Ordering::SeqCst) {
                return Err(StorageError::CommitFailed("disk on fire".into()));
            }
            self.inner.append_many(doc, updates).await
        }
        async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError> {
            self.inner.load(doc).await
        }
        async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError> {
            self.inner.compact(doc, snapshot, folded).await
        }
    }
}

fn gated() -> Arc<GatedJournal> {
    Arc::new(GatedJournal {
        inner: MemoryStorage::new(),
        entered: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
        fail: AtomicBool::new(false),
    })
}

#[tokio::test]
async fn nobody_sees_an_update_before_it_is_durable() {
    let journal = gated();
    let svc = service(journal.clone(), YjsConfig::default());
    let a = svc.join("d").await.unwrap();
    let mut b = svc.join("d").await.unwrap();
    // Drain B's connect frames (SyncStep1).
    assert!(matches!(next(&mut b).await, Outbound::Frame(_)));

    let writer = Doc::new();
    a.receive(Bytes::from(sync_update_frame(&insert(&writer, "x")))).await;
    journal.entered.notified().await; // the task is now inside the append
    assert!(b.try_outbound().is_none(), "B got the update before it was durable");
    assert!(journal.inner.load("d").await.unwrap().updates.is_empty());

    journal.gate.add_permits(1);
    let reader = Doc::new();
    apply_next_update(&mut b, &reader).await;
    assert_eq!(text(&reader), "x");
    assert_eq!(journal.inner.load("d").await.unwrap().updates.len(), 1);
}

/// A Hocuspocus client is told its update is saved (sync status `1`) only once it is durable,
/// like every other frame that follows a Persist.
#[tokio::test]
async fn a_hocuspocus_acknowledgement_waits_until_the_update_is_durable() {
    use moai_yjs::hocuspocus::sync_status_message;
    use moai_yjs::{Access, Dialect};
    let journal = gated();
    let svc = service(journal.clone(), YjsConfig::default());
    let mut h = svc.join_with("d", Access::ReadWrite, Dialect::Hocuspocus).await.unwrap();
    assert!(h.try_outbound().is_none(), "a Hocuspocus session gets no SyncStep1 on connect");
    let inlet = h.inlet();
    let writer = Doc::new();
    assert!(inlet.receive(Bytes::from(sync_update_frame(&insert(&writer, "x")))).await);
    journal.entered.notified().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(h.try_outbound().is_none(), "acknowledged before the update was durable");
    journal.gate.add_permits(1);
    assert_eq!(next(&mut h).await, Outbound::Frame(Bytes::from(sync_status_message(true))));
    // Leaving through the inlet ends the session's outbound queue.
    inlet.leave().await;
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), h.outbound()).await.unwrap(), None);
}

#[tokio::test]
async fn a_storage_failure_closes_the_document_and_loses_nothing_acknowledged() {
    let journal = gated();
    let svc = service(journal.clone(), YjsConfig::default());
    let mut a = svc.join("d").await.unwrap();
    let writer = Doc::new();
    journal.gate.add_permits(1);
    a.receive(Bytes::from(sync_update_frame(&insert(&writer, "kept")))).await;
    journal.entered.notified().await;

    journal.fail.store(true, Ordering::SeqCst);
    journal.gate.add_permits(1);
    a.receive(Bytes::from(sync_update_frame(&insert(&writer, "-lost")))).await;
    loop {
        match next(&mut a).await {
            Outbound::Close { code, reason } => {
                assert_eq!(code, 1011);
                assert!(reason.contains("storage"), "{reason}");
                break;
            }
            Outbound::Frame(_) => {}
        }
    }
    // The next user reloads from storage: the durable update is there, the failed one is not
    // (its author still has it and re-sends it on reconnect).
    journal.fail.store(false, Ordering::SeqCst);
    journal.gate.add_permits(100);
    let state = svc.read_state("d").await.unwrap();
    let check = Doc::new();
    apply(&check, &state);
    assert_eq!(text(&check), "kept");
}

#[tokio::test]
async fn a_document_that_fails_to_load_is_refused_not_served_empty() {
    let storage = Arc::new(MemoryStorage::new());
    storage.append("broken", b"\xff\xff\xff not an update".to_vec()).await.unwrap();
    let svc = service(storage.clone(), YjsConfig::default());
    match svc.join("broken").await {
        Err(ServiceError::LoadFailed(reason)) => assert!(reason.to_string().contains("journal entry 0"), "{reason}"),
        Err(other) => panic!("wrong error {other}"),
        Ok(_) => panic!("served a document that cannot be loaded"),
    }
    assert_eq!(svc.loaded_documents(), 0);
    assert_eq!(storage.load("broken").await.unwrap().updates.len(), 1, "stored data untouched");
}

#[tokio::test]
async fn a_client_that_cannot_keep_up_is_dropped_not_skipped() {
    let config = YjsConfig { outbox_frames: 4, ..YjsConfig::default() };
    let svc = service(Arc::new(MemoryStorage::new()), config);
    let a = svc.join("d").await.unwrap();
    let mut slow = svc.join("d").await.unwrap();
    let writer = Doc::new();
    for i in 0..10 {
        a.receive(Bytes::from(sync_update_frame(&insert(&writer, &i.to_string())))).await;
    }
    // Wait until the writer's last update is durable and broadcast: A can read it back.
    let check = Doc::new();
    apply(&check, &svc.read_state("d").await.unwrap());
    assert_eq!(text(&check), "0123456789");
    let mut frames = 0;
    while let Some(out) = slow.outbound().await {
        assert!(matches!(out, Outbound::Frame(_)));
        frames += 1;
    }
    assert_eq!(frames, 4, "exactly the outbox's worth, then dropped");
    assert!(slow.was_too_slow());
}

#[tokio::test]
async fn idle_documents_are_compacted_and_evicted_then_reload_intact() {
    let storage = Arc::new(MemoryStorage::new());
    let config = YjsConfig { idle_evict: Duration::from_millis(50), ..YjsConfig::default() };
    let svc = service(storage.clone(), config);
    let a = svc.join("d").await.unwrap();
    let writer = Doc::new();
    for word in ["a", "b", "c"] {
        a.receive(Bytes::from(sync_update_frame(&insert(&writer, word)))).await;
    }
    a.leave().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while svc.loaded_documents() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never evicted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stored = storage.load("d").await.unwrap();
    assert!(stored.snapshot.is_some() && stored.updates.is_empty(), "journal folded into a snapshot");
    let check = Doc::new();
    apply(&check, &svc.read_state("d").await.unwrap());
    assert_eq!(text(&check), "abc");
}

#[tokio::test]
async fn a_large_journal_is_compacted_in_the_background() {
    let storage = Arc::new(MemoryStorage::new());
    let config = YjsConfig { compact_journal_bytes: 256, ..YjsConfig::default() };
    let svc = service(storage.clone(), config);
    let a = svc.join("d").await.unwrap();
    let writer = Doc::new();
    for i in 0..50 {
        a.receive(Bytes::from(sync_update_frame(&insert(&writer, &format!("{i:03}"))))).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stored = storage.load("d").await.unwrap();
        if stored.snapshot.is_some() && stored.updates.len() < 50 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no compaction happened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Whatever the split between snapshot and journal, a fresh load has every edit.
    let stored = storage.load("d").await.unwrap();
    let room =
        moai_yjs::load_room("d", stored.snapshot.as_deref(), stored.updates.iter().map(|(_, u)| u.as_slice())).unwrap();
    let check = Doc::new();
    apply(&check, &room.encode_state_as_update().unwrap());
    assert_eq!(text(&check), text(&writer));
}

/// Compactions fail (object storage down, say) while appends work.
struct CompactionsFail {
    inner: MemoryStorage,
    fail: AtomicBool,
    attempts: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl DocJournal for CompactionsFail {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, moai_storage::StorageError> {
        self.inner.append_many(doc, updates).await
    }
    async fn load(&self, doc: &str) -> Result<moai_storage::StoredDoc, moai_storage::StorageError> {
        self.inner.load(doc).await
    }
    async fn compact(
        &self,
        doc: &str,
        snapshot: Vec<u8>,
        folded: moai_storage::Folded,
    ) -> Result<(), moai_storage::StorageError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(moai_storage::StorageError::Timeout(Duration::from_secs(30)));
        }
        self.inner.compact(doc, snapshot, folded).await
    }
}

/// A compaction that fails leaves editing alone and is retried after a pause (not after every
/// write, which would reload the journal each time), and goes through once storage is back.
#[tokio::test]
async fn a_failing_compaction_does_not_stop_editing_and_is_retried_after_a_pause() {
    let storage = Arc::new(CompactionsFail {
        inner: MemoryStorage::new(),
        fail: AtomicBool::new(true),
        attempts: Default::default(),
    });
    let config = YjsConfig { compact_journal_bytes: 64, ..YjsConfig::default() };
    let svc = service(storage.clone(), config);
    let writer = Doc::new();
    for i in 0..40 {
        svc.apply_update("d", insert(&writer, &format!("{i:03}"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let check = Doc::new();
    apply(&check, &svc.read_state("d").await.unwrap());
    assert_eq!(text(&check), text(&writer), "every edit was taken");
    let attempts = storage.attempts.load(Ordering::SeqCst);
    assert!((1..=2).contains(&attempts), "{attempts} compaction attempts in ~0.3 s of writes");
    assert!(storage.inner.load("d").await.unwrap().snapshot.is_none());

    // Storage is back; after the pause the next write compacts.
    storage.fail.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while storage.inner.load("d").await.unwrap().snapshot.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never compacted again");
        svc.apply_update("d", insert(&writer, ".")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let check = Doc::new();
    apply(&check, &svc.read_state("d").await.unwrap());
    assert_eq!(text(&check), text(&writer));
}

#[tokio::test]
async fn http_writes_are_persisted_and_broadcast_and_bad_ones_refused() {
    let storage = Arc::new(MemoryStorage::new());
    let svc = service(storage.clone(), YjsConfig::default());
    let mut a = svc.join("d").await.unwrap();
    let writer = Doc::new();
    svc.apply_update("d", insert(&writer, "from http")).await.unwrap();
    assert_eq!(storage.load("d").await.unwrap().updates.len(), 1, "durable when acknowledged");
    let reader = Doc::new();
    apply_next_update(&mut a, &reader).await;
    assert_eq!(text(&reader), "from http");
    assert!(matches!(svc.apply_update("d", vec![0xde, 0xad]).await, Err(ServiceError::InvalidUpdate(_))));
    assert_eq!(storage.load("d").await.unwrap().updates.len(), 1);
}

#[tokio::test]
async fn the_outbox_is_bounded_in_bytes() {
    // 1024 frames would fit, but not 4 KiB: a client that reads nothing is dropped once the
    // queued frames pass the byte bound, whatever their count.
    let config = YjsConfig { outbox_frames: 1024, outbox_bytes: 4096, ..YjsConfig::default() };
    let svc = service(Arc::new(MemoryStorage::new()), config);
    let a = svc.join("d").await.unwrap();
    let mut slow = svc.join("d").await.unwrap();
    let writer = Doc::new();
    let chunk = "x".repeat(1000);
    for _ in 0..10 {
        a.receive(Bytes::from(sync_update_frame(&insert(&writer, &chunk)))).await;
    }
    let check = Doc::new();
    apply(&check, &svc.read_state("d").await.unwrap());
    assert_eq!(text(&check).len(), 10_000);
    let mut bytes = 0;
    while let Some(out) = slow.outbound().await {
        let Outbound::Frame(f) = out else { panic!("{out:?}") };
        bytes += f.len();
    }
    assert!(slow.was_too_slow());
    assert!(bytes <= 4096 + 64, "at most the byte bound was queued: {bytes}");
    assert!(bytes >= 3000, "frames up to the bound were delivered: {bytes}");
}
