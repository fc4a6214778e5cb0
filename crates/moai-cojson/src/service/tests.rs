//! The async driver against real storage: two sessions syncing through the service (memory and
//! SQLite), acks only after durability, restart from SQLite, forged content, slow peers,
//! malformed frames, eviction and storage failures.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::ids::SessionId;
use crate::message::{encode_frame, SyncMessage};
use crate::service::{CojsonConfig, CojsonService, CojsonSession, Outbound, CLOSE_STORAGE_FAILURE, CLOSE_TOO_SLOW};
use crate::test_support::*;
use moai_storage::{CoValueStore, MemoryStorage, NoopObserver, SqliteOptions, SqliteStorage};
use serde_json::{json, Value};

fn sid(s: &str) -> SessionId {
    SessionId::parse(s).unwrap()
}

async fn send(session: &CojsonSession, msg: SyncMessage) {
    let received = session.receive(&encode_frame(&[msg])).await.expect("service running");
    assert_eq!(received.messages, 1);
}

/// The next outbound item, with a bound so a bug fails instead of hanging.
async fn next(session: &mut CojsonSession) -> Outbound {
    tokio::time::timeout(Duration::from_secs(10), session.outbound())
        .await
        .expect("timed out waiting for the service")
        .expect("session ended")
}

thread_local! {
    /// Messages of a multi-line frame not yet taken by `next_msg`, per session (each test runs
    /// on its own thread, so peer numbers of different tests never meet here).
    static PENDING: std::cell::RefCell<std::collections::HashMap<u64, std::collections::VecDeque<SyncMessage>>> =
        Default::default();
}

fn pending_msg(session: &CojsonSession) -> Option<SyncMessage> {
    PENDING.with(|p| p.borrow_mut().get_mut(&session.peer().0).and_then(|q| q.pop_front()))
}

/// The next message: a frame may hold several, joined by "\n" (the session coalesces what is
/// queued at once).
async fn next_msg(session: &mut CojsonSession) -> SyncMessage {
    if let Some(msg) = pending_msg(session) {
        return msg;
    }
    match next(session).await {
        Outbound::Text(text) => {
            let mut msgs = text
                .split('\n')
                .map(|line| SyncMessage::from_json(line).expect("the service sends valid messages"))
                .collect::<std::collections::VecDeque<_>>();
            let first = msgs.pop_front().expect("a frame holds a message");
            PENDING.with(|p| p.borrow_mut().entry(session.peer().0).or_default().extend(msgs));
            first
        }
        Outbound::Close { code, reason } => panic!("closed {code} {reason}"),
    }
}

async fn next_msgs(session: &mut CojsonSession, n: usize) -> Vec<SyncMessage> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_msg(session).await);
    }
    out
}

/// Proves that the service has sent `session` nothing so far, without waiting for a while: asks
/// it about a CoValue nobody has (a new id each call) and asserts that the answer, `known` for
/// that id, is the very next message. The service handles a session's messages in order and
/// answers this `load` only after a storage read, so whatever it had sent or queued for the
/// session before (an ack, a forwarded edit) would arrive first.
async fn assert_nothing_sent(session: &mut CojsonSession, what: &str) {
    static MARKERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MARKERS.fetch_add(1, Ordering::SeqCst);
    let marker = crate::crypto::id_for_header(&map_header(&World::new().group, &format!("zMarker{n}")));
    send(session, load(&marker, None)).await;
    let got = next_msg(session).await;
    assert_eq!(kind(&got), ("known", marker.to_string()), "{what}: {got:?} came before the marker's answer");
    assert!(!known_of(&got).header, "the marker CoValue is unknown to the service");
}

fn sqlite(path: &Path) -> SqliteStorage {
    SqliteStorage::open(path, SqliteOptions::default(), Arc::new(NoopObserver)).expect("open sqlite")
}

/// Alice uploads account, group and map on `a`; returns once all three are acked.
async fn upload(a: &mut CojsonSession, w: &mut World) {
    let (acc, grp, map) = (w.account_upload(), w.group_upload(), w.map_upload());
    // One frame with three lines, as a batching client sends its first burst.
    let received = a.receive(&encode_frame(&[acc, grp, map])).await.unwrap();
    assert_eq!(received.messages, 3);
    // Acks of different CoValues may complete in any order (separate storage batches).
    let acks = next_msgs(a, 3).await;
    let mut kinds = acks.iter().map(kind).collect::<Vec<_>>();
    kinds.sort();
    let mut expected =
        vec![("known", w.alice.account.to_string()), ("known", w.group.to_string()), ("known", w.map.to_string())];
    expected.sort();
    assert_eq!(kinds, expected);
    let map_ack = acks.iter().find(|m| known_of(m).id == w.map).unwrap();
    assert_eq!(known_of(map_ack).count(&sid(&w.map_writer.session)), 1);
}

/// Bob loads the map knowing nothing and gets account, group, map, each with its header.
async fn load_map(b: &mut CojsonSession, w: &World) -> Vec<SyncMessage> {
    send(b, load(&w.map, None)).await;
    let got = next_msgs(b, 3).await;
    assert_eq!(
        got.iter().map(kind).collect::<Vec<_>>(),
        vec![
            ("content", w.alice.account.to_string()),
            ("content", w.group.to_string()),
            ("content", w.map.to_string())
        ]
    );
    assert!(got.iter().all(|m| as_content(m).header.is_some()));
    got
}

async fn two_peers_sync(store: Arc<dyn CoValueStore>) {
    let svc = CojsonService::new(store.clone(), CojsonConfig::default());
    let mut a = svc.connect().await.unwrap();
    let mut b = svc.connect().await.unwrap();
    let mut w = World::new();
    upload(&mut a, &mut w).await;

    let got = load_map(&mut b, &w).await;
    let map = as_content(&got[2]);
    assert_eq!(map.header.as_ref(), Some(&w.map_header), "header exactly as uploaded");
    assert_eq!(map.new[0].1.new_transactions[0], set("hello", json!("world"), 1002));

    // A live edit: forwarded to Bob, acked to Alice once durable.
    let edit = w.map_edit("n", 2000);
    send(&a, edit).await;
    let fwd = next_msg(&mut b).await;
    let c = as_content(&fwd);
    assert_eq!((c.new[0].1.after, c.new[0].1.new_transactions.len()), (1, 1));
    let ack = next_msg(&mut a).await;
    assert_eq!(known_of(&ack).count(&sid(&w.map_writer.session)), 2);
    let stored = store.load_covalue(w.map.as_str()).await.unwrap().unwrap();
    assert_eq!(stored.sessions[0].transactions.len(), 2, "acked means stored");
    assert_eq!(svc.stats().peers, 2);
    a.leave().await;
    b.leave().await;
}

#[tokio::test]
async fn two_peers_sync_through_memory_storage() {
    two_peers_sync(Arc::new(MemoryStorage::new())).await;
}

#[tokio::test]
async fn two_peers_sync_through_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    two_peers_sync(Arc::new(sqlite(&dir.path().join("moai.db")))).await;
}

#[tokio::test]
async fn a_restarted_server_serves_everything_from_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moai.db");
    let mut w = World::new();
    let sent_map = {
        let store = sqlite(&path);
        let svc = CojsonService::new(Arc::new(store.clone()), CojsonConfig::default());
        let mut a = svc.connect().await.unwrap();
        upload(&mut a, &mut w).await;
        let edit = w.map_edit("second", 3000);
        send(&a, edit).await;
        next_msg(&mut a).await; // acked: durable
        a.leave().await;
        drop(svc);
        store.close().await.unwrap();
        w.map_writer.count
    };
    assert_eq!(sent_map, 2);

    // A new process: new storage handle, new service, empty memory.
    let svc = CojsonService::new(Arc::new(sqlite(&path)), CojsonConfig::default());
    let mut b = svc.connect().await.unwrap();
    let got = load_map(&mut b, &w).await;
    let map = as_content(&got[2]);
    assert_eq!(map.header.as_ref(), Some(&w.map_header));
    assert_eq!(map.new[0].1.new_transactions.len(), 2);
    assert_eq!(map.new[0].1.new_transactions[1], set("second", json!(3000), 3000));
    // The hash chain rebuilt from storage verifies a continuation of the session (relayed by
    // Bob, who now holds everything).
    let edit = w.map_edit("third", 4000);
    send(&b, edit).await;
    assert_eq!(known_of(&next_msg(&mut b).await).count(&sid(&w.map_writer.session)), 3);
}

mod gated {
    //! A store whose appends wait for a gate, to observe what happens before durability.
    use super::*;
    use moai_storage::{AppendError, CoValueAppend, CoValueRecord, StorageError, StoredKnownState};
    use tokio::sync::{Notify, Semaphore};

    pub struct GatedStore {
        pub inner: MemoryStorage,
        pub entered: Notify,
        pub gate: Semaphore,
        pub fail: AtomicBool,
    }

    #[async_trait::async_trait]
    impl CoValueStore for GatedStore {
        async fn load_covalue(&self, id: &str) -> Result<Option<CoValueRecord>, StorageError> {
            self.inner.load_covalue(id).await
        }
        async fn append_covalues(&self, appends: Vec<CoValueAppend>) -> Vec<Result<(), AppendError>> {
            self.entered.notify_one();
            self.gate.acquire().await.unwrap().forget();
            if self.fail.load(Ordering::SeqCst) {
                return appends.iter().map(|_| Err(StorageError::CommitFailed("disk on fire".into()).into())).collect();
            }
            self.inner.append_covalues(appends).await
        }
        async fn known_states(&self, ids: Vec<String>) -> Result<Vec<Option<StoredKnownState>>, StorageError> {
            self.inner.known_states(ids).await
        }
    }

    pub fn new() -> Arc<GatedStore> {
        Arc::new(GatedStore {
            inner: MemoryStorage::new(),
            entered: Notify::new(),
            gate: Semaphore::new(0),
            fail: AtomicBool::new(false),
        })
    }
}

#[tokio::test]
async fn acks_go_out_only_after_the_write_is_durable() {
    let store = gated::new();
    let svc = CojsonService::new(store.clone(), CojsonConfig::default());
    let mut a = svc.connect().await.unwrap();
    let mut w = World::new();
    let acc = w.account_upload();
    send(&a, acc).await;
    store.entered.notified().await; // the write is inside storage now
    assert_nothing_sent(&mut a, "acked before durable").await;
    assert!(store.inner.load_covalue(w.alice.account.as_str()).await.unwrap().is_none());

    store.gate.add_permits(1);
    let ack = next_msg(&mut a).await;
    assert_eq!(kind(&ack), ("known", w.alice.account.to_string()));
    assert!(store.inner.load_covalue(w.alice.account.as_str()).await.unwrap().is_some());

    // Two edits while the first write is held: one batch in flight per CoValue, the second
    // waits and goes out after it, so storage sees them in order and both are acked.
    store.gate.add_permits(1);
    let grp = w.group_upload();
    send(&a, grp).await;
    next_msg(&mut a).await;
    let map = w.map_upload();
    send(&a, map).await;
    store.entered.notified().await;
    let (e1, e2) = (w.map_edit("x", 5000), w.map_edit("y", 5001));
    send(&a, e1).await;
    send(&a, e2).await;
    assert_nothing_sent(&mut a, "acked while the map's first write is held").await;
    store.gate.add_permits(10);
    let acks = next_msgs(&mut a, 3).await;
    for ack in &acks {
        assert_eq!(kind(ack), ("known", w.map.to_string()));
    }
    assert_eq!(known_of(&acks[2]).count(&sid(&w.map_writer.session)), 3);
    let stored = store.inner.load_covalue(w.map.as_str()).await.unwrap().unwrap();
    assert_eq!(stored.sessions[0].transactions.len(), 3);
}

#[tokio::test]
async fn a_failed_write_closes_its_peers_and_nothing_unstored_is_acked() {
    let store = gated::new();
    let svc = CojsonService::new(store.clone(), CojsonConfig::default());
    let mut a = svc.connect().await.unwrap();
    let mut w = World::new();
    store.fail.store(true, Ordering::SeqCst);
    store.gate.add_permits(10);
    let acc = w.account_upload();
    send(&a, acc).await;
    match next(&mut a).await {
        Outbound::Close { code, reason } => {
            assert_eq!(code, CLOSE_STORAGE_FAILURE);
            assert!(reason.contains("storage"), "{reason}");
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(a.outbound().await.is_none(), "nothing after the close");
    assert_eq!(svc.stats().storage_failures_total, 1);

    // Storage heals; a reconnecting client uploads again and it sticks.
    store.fail.store(false, Ordering::SeqCst);
    let mut a = svc.connect().await.unwrap();
    let mut w2 = World::new();
    let acc = w2.account_upload();
    send(&a, acc).await;
    assert_eq!(kind(&next_msg(&mut a).await), ("known", w.alice.account.to_string()));
}

#[tokio::test]
async fn forged_content_is_rejected_without_affecting_other_peers() {
    let svc = CojsonService::new(Arc::new(MemoryStorage::new()), CojsonConfig::default());
    let mut a = svc.connect().await.unwrap();
    let mut b = svc.connect().await.unwrap();
    let mut w = World::new();
    upload(&mut a, &mut w).await;
    load_map(&mut b, &w).await;

    let mut m = svc.connect().await.unwrap(); // Mallory
    let honest_writer = w.map_writer.clone();
    let SyncMessage::Content(mut forged) = w.map_edit("evil", 6000) else { unreachable!() };
    forged.new[0].1.new_transactions[0]["changes"] =
        Value::String(json!([{"op":"set","key":"evil","value":666}]).to_string());
    send(&m, SyncMessage::Content(forged)).await;
    let reply = next_msg(&mut m).await;
    assert_eq!(known_of(&reply).count(&sid(&w.map_writer.session)), 1, "unchanged state");
    assert_nothing_sent(&mut b, "forged content forwarded to Bob").await;
    assert_eq!(svc.stats().rejected_sessions_total, 1);

    // The honest edit still goes through from Alice, and Bob gets it.
    w.map_writer = honest_writer;
    let edit = w.map_edit("good", 6001);
    send(&a, edit).await;
    assert_eq!(known_of(&next_msg(&mut a).await).count(&sid(&w.map_writer.session)), 2);
    let fwd = next_msg(&mut b).await;
    assert_eq!(as_content(&fwd).new[0].1.new_transactions[0], set("good", json!(6001), 6001));
}

#[tokio::test]
async fn a_peer_that_cannot_keep_up_is_closed_not_skipped() {
    let config = CojsonConfig { outbox_messages: 2, ..CojsonConfig::default() };
    let svc = CojsonService::new(Arc::new(MemoryStorage::new()), config);
    let mut a = svc.connect().await.unwrap();
    let mut slow = svc.connect().await.unwrap();
    let mut w = World::new();
    // One at a time, so Alice (who reads) never has more than one message queued.
    for msg in [w.account_upload(), w.group_upload(), w.map_upload()] {
        send(&a, msg).await;
        assert_eq!(kind(&next_msg(&mut a).await).0, "known");
    }
    // Three messages for an outbox of two, and the slow peer reads nothing meanwhile.
    send(&slow, load(&w.map, None)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while svc.stats().slow_peers_closed_total == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The close comes first: queued frames of a dropped session are worth nothing.
    match next(&mut slow).await {
        Outbound::Close { code, .. } => assert_eq!(code, CLOSE_TOO_SLOW),
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(slow.outbound().await.is_none());
    // Others are unaffected.
    let edit = w.map_edit("still", 7000);
    send(&a, edit).await;
    assert_eq!(kind(&next_msg(&mut a).await), ("known", w.map.to_string()));
}

#[tokio::test]
async fn malformed_frames_are_dropped_and_the_session_stays_open() {
    let svc = CojsonService::new(Arc::new(MemoryStorage::new()), CojsonConfig::default());
    let mut a = svc.connect().await.unwrap();
    let w = World::new();
    let good = encode_frame(&[load(&w.map, None)]);

    // A line that is not JSON drops the whole frame (as cojson-transport-ws does).
    let r = a.receive(&format!("{good}\nnot json")).await.unwrap();
    assert!(r.dropped_frame && r.messages == 0);
    // JSON that is not a valid message is dropped alone; pings and unknown objects are ignored.
    let r =
        a.receive(&format!("{{\"action\":\"nope\"}}\n{{\"type\":\"ping\",\"time\":1}}\n[1]\n{good}")).await.unwrap();
    assert_eq!((r.messages, r.bad_messages, r.dropped_frame), (1, 1, false));
    assert_eq!(a.receive("").await.unwrap().messages, 0);
    // Exactly one answer: the load of the valid line.
    assert_eq!(kind(&next_msg(&mut a).await), ("known", w.map.to_string()));
    assert_nothing_sent(&mut a, "more than one answer").await;
}

#[tokio::test]
async fn idle_covalues_are_evicted_and_reload_from_storage() {
    let dir = tempfile::tempdir().unwrap();
    let config = CojsonConfig { evict_interval: Duration::from_millis(20), ..CojsonConfig::default() };
    let svc = CojsonService::new(Arc::new(sqlite(&dir.path().join("moai.db"))), config);
    let mut a = svc.connect().await.unwrap();
    let mut w = World::new();
    upload(&mut a, &mut w).await;
    a.leave().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = svc.stats();
        if stats.evicted_total >= 3 && stats.resident_covalues == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never evicted: {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut b = svc.connect().await.unwrap();
    load_map(&mut b, &w).await;
}

#[tokio::test]
async fn the_service_keeps_running_when_sessions_are_dropped_without_leaving() {
    let svc = CojsonService::new(Arc::new(MemoryStorage::new()), CojsonConfig::default());
    for _ in 0..50 {
        let a = svc.connect().await.unwrap();
        drop(a);
    }
    let mut b = svc.connect().await.unwrap();
    let w = World::new();
    send(&b, load(&w.map, None)).await;
    assert_eq!(kind(&next_msg(&mut b).await), ("known", w.map.to_string()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while svc.stats().peers != 1 {
        assert!(tokio::time::Instant::now() < deadline, "dropped sessions never left");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A reconnect storm after a restart: 1000 clients reconnect at once and `load` the five CoValues
/// they already hold. Every load is answered `known` from the stored known states: no CoValue is
/// read whole, and the known-state reads are batched into a handful of storage calls. A later
/// edit is still forwarded to the (subscribed, not resident) clients.
#[tokio::test]
async fn a_reconnect_storm_is_answered_from_stored_known_states() {
    const CLIENTS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moai.db");
    let mut w = World::new();
    let extra: Vec<(crate::ids::CoId, serde_json::Value, Writer)> = (2..=3)
        .map(|n| {
            let header = map_header(&w.group, &format!("zMap{n}"));
            let id = crate::crypto::id_for_header(&header);
            (id, header, w.alice.account_session(&format!("Map{n}")))
        })
        .collect();
    // Five CoValues stored, then the server restarts.
    let mut held: Vec<crate::known_state::KnownState> = Vec::new();
    {
        let store = sqlite(&path);
        let svc = CojsonService::new(Arc::new(store.clone()), CojsonConfig::default());
        let mut a = svc.connect().await.unwrap();
        upload(&mut a, &mut w).await;
        let mut frame = Vec::new();
        for (id, header, writer) in extra.iter().cloned() {
            let mut writer = writer;
            let s = writer.append(vec![set("n", json!(1), 1100)]);
            frame.push(content(Some(&header), &id, vec![s]));
        }
        a.receive(&encode_frame(&frame)).await.unwrap();
        next_msgs(&mut a, 2).await;
        for id in [&w.alice.account, &w.group, &w.map, &extra[0].0, &extra[1].0] {
            let k = store.known_states(vec![id.as_str().to_owned()]).await.unwrap().pop().unwrap().unwrap();
            held.push(crate::service::records::known_state_from_record(id.clone(), k).unwrap());
        }
        a.leave().await;
        drop(svc);
        store.close().await.unwrap();
    }

    let svc = CojsonService::new(Arc::new(sqlite(&path)), CojsonConfig::default());
    let frame = encode_frame(&held.iter().map(|k| load(&k.id, Some(k.clone()))).collect::<Vec<_>>());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let svc = svc.clone();
        let frame = frame.clone();
        tasks.spawn(async move {
            let mut s = svc.connect().await.unwrap();
            assert_eq!(s.receive(&frame).await.unwrap().messages, 5);
            let got = next_msgs(&mut s, 5).await;
            (s, got)
        });
    }
    let mut sessions = Vec::with_capacity(CLIENTS);
    while let Some(done) = tasks.join_next().await {
        let (s, got) = done.unwrap();
        for (msg, expected) in got.iter().zip(&held) {
            assert_eq!(known_of(msg), expected, "answered `known` with the stored state, in order");
        }
        sessions.push(s);
    }
    let stats = svc.stats();
    assert_eq!(stats.full_loads_total, 0, "no CoValue read whole: {stats:?}");
    assert!(stats.known_state_loads_total <= 5, "each known state read once, then served from memory: {stats:?}");
    assert!(stats.known_state_reads_total <= 5, "batched into few storage calls (not 5000): {stats:?}");
    assert_eq!(stats.resident_covalues, 0);

    // Alice edits the map: it is loaded whole now, and every reconnected client gets the edit.
    let mut a = svc.connect().await.unwrap();
    let edit = w.map_edit("after-storm", 9000);
    a.receive(&frame).await.unwrap();
    assert!(next_msgs(&mut a, 5).await.iter().all(|m| kind(m).0 == "known"));
    send(&a, edit).await;
    assert_eq!(known_of(&next_msg(&mut a).await).count(&sid(&w.map_writer.session)), 2);
    for s in sessions.iter_mut().step_by(97) {
        let fwd = next_msg(s).await;
        let c = as_content(&fwd);
        assert_eq!(c.id, w.map);
        assert_eq!((c.new[0].1.after, c.new[0].1.new_transactions.len()), (1, 1));
    }
    assert!(svc.stats().full_loads_total >= 1);
}

#[tokio::test]
async fn a_read_only_session_reads_but_its_content_never_reaches_storage_or_peers() {
    let store = Arc::new(MemoryStorage::default());
    let svc = CojsonService::new(store.clone(), CojsonConfig::default());
    let viewer = svc.connect_with(true).await.unwrap();
    let mut refused = World::new();
    let (acc, grp, map) = (refused.account_upload(), refused.group_upload(), refused.map_upload());
    let received = viewer.receive(&encode_frame(&[acc, grp, map])).await.unwrap();
    assert_eq!((received.messages, received.read_only_dropped), (0, 3), "all three are content");
    for id in [refused.alice.account.to_string(), refused.group.to_string(), refused.map.to_string()] {
        assert!(store.load_covalue(&id).await.unwrap().is_none(), "{id} was stored from a read-only session");
    }

    // Content from a writing session is stored, and the viewer can read it.
    let mut w = World::new();
    let mut writer = svc.connect().await.unwrap();
    upload(&mut writer, &mut w).await;
    let mut viewer = viewer;
    let got = load_map(&mut viewer, &w).await;
    assert_eq!(as_content(&got[2]).new[0].1.new_transactions[0], set("hello", json!("world"), 1002));

    // A live edit from the viewer is dropped; the writer's next edit is the one that lands.
    let received = viewer.receive(&encode_frame(&[w.map_edit("v", 2000)])).await.unwrap();
    assert_eq!(received.read_only_dropped, 1);
    let stored = store.load_covalue(w.map.as_str()).await.unwrap().unwrap();
    assert_eq!(stored.sessions[0].transactions.len(), 1, "the viewer's edit was not stored");
    viewer.leave().await;
    writer.leave().await;
}

/// Polls a future once (the test runtime is single-threaded: the relay task does not run
/// meanwhile).
fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

/// One session may have at most its share (`INFLIGHT_BYTES`) of frames queued for the relay
/// task; the next frame waits until the relay has handled some (so its socket is read no
/// faster), while another session still gets its frames in. Before, a session could queue 8192
/// frames of up to the frame limit each, ahead of everyone.
#[tokio::test]
async fn a_session_may_queue_only_its_share_of_the_relay_queue() {
    use crate::service::session::INFLIGHT_BYTES;
    let svc = CojsonService::new(Arc::new(MemoryStorage::new()), CojsonConfig::default());
    let flooder = svc.connect().await.unwrap();
    let other = svc.connect().await.unwrap();
    let line = json!({"action":"known","id":"co_zFlood","header":false,"sessions":{}}).to_string();
    let frame = vec![line.as_str(); (1 << 20) / (line.len() + 1)].join("\n");
    let share = INFLIGHT_BYTES / frame.len();
    assert!(share >= 2);
    for i in 0..share {
        let mut f = std::pin::pin!(flooder.receive(&frame));
        assert!(poll_once(f.as_mut()).is_ready(), "frame {i} is within the share");
    }
    let mut waiting = std::pin::pin!(flooder.receive(&frame));
    assert!(poll_once(waiting.as_mut()).is_pending(), "the share is used up: the next frame waits");
    let mut others = std::pin::pin!(other.receive(&frame));
    assert!(poll_once(others.as_mut()).is_ready(), "another session is not held back");
    // Once the relay task handled the queued frames, the waiting one goes in.
    let received = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("relay handles the queue");
    assert_eq!(received.unwrap().messages, frame.split('\n').count());
}
