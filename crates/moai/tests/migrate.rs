//! `moai migrate` with the real binary: real clients write through a server on SQLite, the data
//! moves to a throwaway PostgreSQL cluster (crates/moai-pgsync/tests/support/pg.rs), and real
//! clients read it back from a server on PostgreSQL. Re-running is safe, an interrupted run
//! resumes, a target holding other data is refused (or merged into with --merge), and the
//! way back (PostgreSQL to SQLite) works too.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moai_storage::{
    BytesSinceSignature, CoValueAppend, CoValueRecord, CoValueStore, DocJournal, Folded, Inventory, NoopObserver,
    PostgresOptions, PostgresStorage, SessionAppendRecord, SqliteOptions, SqliteStorage, StoredDoc,
};
use moai_yjs::yrs::{Doc, ReadTxn, StateVector, Transact};
use serde_json::json;
use support::node_driver::NodeDriver;
use support::pg::PgCluster;
use support::yjs::{edit, text_of_update};
use support::{Server, BIN};

/// Runs `moai migrate ARGS` (progress as plain lines: stderr is not a terminal).
fn migrate(args: &[&str]) -> Output {
    Command::new(BIN).arg("migrate").args(args).env("RUST_LOG", "warn").output().expect("run moai migrate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns stdout.
fn migrated(args: &[&str]) -> String {
    let out = migrate(args);
    assert!(out.status.success(), "moai migrate {args:?} failed: {}\n{}", text(&out.stderr), text(&out.stdout));
    // Shown when a test fails (or with --nocapture).
    eprintln!("moai migrate {args:?}\n{}{}", text(&out.stderr), text(&out.stdout));
    text(&out.stdout)
}

fn start_on(storage: &str, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let unused = dir.path().join("unused.db");
    let args: Vec<&str> = ["--storage", storage].iter().chain(extra).copied().collect();
    let server = Server::start_in(dir, &unused, &args);
    server.wait_ready();
    server
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A fresh database on `pg`; its URL.
async fn create_database(pg: &PgCluster, name: &str) -> String {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    format!("postgres://postgres@127.0.0.1:{}/{name}", pg.port)
}

enum Store {
    Sqlite(SqliteStorage),
    Postgres(PostgresStorage),
}

impl Store {
    async fn open(url: &str) -> Store {
        match url.strip_prefix("sqlite:") {
            Some(path) => Store::Sqlite(
                SqliteStorage::open(Path::new(path), SqliteOptions::default(), Arc::new(NoopObserver)).unwrap(),
            ),
            None => Store::Postgres(
                PostgresStorage::open(url, PostgresOptions::default(), Arc::new(NoopObserver)).await.unwrap(),
            ),
        }
    }

    fn journal(&self) -> &dyn DocJournal {
        match self {
            Store::Sqlite(s) => s,
            Store::Postgres(s) => s,
        }
    }

    fn covalues(&self) -> &dyn CoValueStore {
        match self {
            Store::Sqlite(s) => s,
            Store::Postgres(s) => s,
        }
    }

    fn inventory(&self) -> &dyn Inventory {
        match self {
            Store::Sqlite(s) => s,
            Store::Postgres(s) => s,
        }
    }

    async fn docs(&self) -> Vec<String> {
        self.inventory().list_docs(None, 10_000).await.unwrap()
    }

    async fn covalue_ids(&self) -> Vec<String> {
        self.inventory().list_covalues(None, 10_000).await.unwrap()
    }

    /// Every document and CoValue as stored.
    async fn dump(&self) -> (Vec<(String, StoredDoc)>, Vec<(String, CoValueRecord)>) {
        let mut docs = Vec::new();
        for id in self.docs().await {
            let mut doc = self.journal().load(&id).await.unwrap();
            // Sequence numbers and snapshot versions are the backend's own.
            doc.snapshot_version = None;
            doc.updates.iter_mut().for_each(|(seq, _)| *seq = 0);
            docs.push((id, doc));
        }
        let mut covalues = Vec::new();
        for id in self.covalue_ids().await {
            covalues.push((id.clone(), self.covalues().load_covalue(&id).await.unwrap().unwrap()));
        }
        docs.sort_by(|a, b| a.0.cmp(&b.0));
        covalues.sort_by(|a, b| a.0.cmp(&b.0));
        (docs, covalues)
    }

    async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await.unwrap(),
            Store::Postgres(s) => s.close().await.unwrap(),
        }
    }
}

/// The text "t" of a stored document.
fn stored_text(doc: &StoredDoc) -> String {
    let room =
        moai_yjs::load_room("d", doc.snapshot.as_deref(), doc.updates.iter().map(|(_, u)| u.as_slice())).unwrap();
    let state = room.doc().transact().encode_state_as_update_v1(&StateVector::default());
    text_of_update(&state)
}

/// The whole state of `doc` as one update.
fn full_state(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_state_as_update_v1(&StateVector::default())
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn what_real_clients_wrote_on_sqlite_is_read_back_by_real_clients_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("local-sync.db");
    let src = format!("sqlite:{}", src_path.display());
    // Documents idle for 300 ms are evicted, which compacts them into a snapshot.
    let server = start_on(&src, &["--yjs-idle-evict", "300ms"]);
    let ws = server.ws_url("/sync/v1");
    let mut y = NodeDriver::yjs();

    // "notes": a snapshot (written by the compaction at eviction) and a journal tail after it.
    y.connect("a", &ws, "notes", json!({}));
    y.call("waitSynced", json!({"name": "a"}));
    y.call("insertText", json!({"name": "a", "text": "hello, brave"}));
    y.call("deleteText", json!({"name": "a", "index": 5, "length": 7}));
    wait_until("the server holds the first edits", Duration::from_secs(10), || {
        support::http(server.addr, "GET", "/api/v1/docs/notes/update", &[], b"").1.contains("hello")
    });
    y.call("destroy", json!({"name": "a"}));
    let rt = runtime();
    rt.block_on(async {
        // WAL lets this read beside the running server (as `moai migrate` does).
        let store = Store::open(&src).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let doc = store.journal().load("notes").await.unwrap();
            if doc.snapshot.is_some() && doc.updates.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "notes was never compacted: {doc:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        store.close().await;
    });
    // These stay connected until the end, so nothing more is evicted or compacted.
    y.connect("b", &ws, "notes", json!({}));
    y.connect("watch", &ws, "notes", json!({}));
    y.call("waitText", json!({"name": "b", "equals": "hello"}));
    y.call("insertText", json!({"name": "b", "text": " world"}));
    // Another client has it: the server broadcasts only what is durable.
    y.call("waitText", json!({"name": "watch", "equals": "hello world"}));
    // "todo": a journal only.
    y.connect("c", &ws, "todo", json!({}));
    y.call("waitSynced", json!({"name": "c"}));
    y.call("insertText", json!({"name": "c", "text": "buy milk"}));
    y.connect("watch2", &ws, "todo", json!({}));
    y.call("waitText", json!({"name": "watch2", "equals": "buy milk"}));

    // CoJSON: an account, a group, a map and a list with edits, and a deleted map.
    let sync = server.ws_url("/sync");
    let mut co = NodeDriver::cojson();
    let account = co.call("createAccount", json!({"name": "ann", "url": sync}));
    let group =
        co.call("createGroup", json!({"name": "ann", "everyone": "writer"}))["groupId"].as_str().unwrap().to_owned();
    let map = co.call("createMap", json!({"name": "ann", "groupId": group, "init": {"title": "groceries"}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    co.call("setKey", json!({"name": "ann", "coId": map, "key": "owner", "value": "ann"}));
    let list = co.call("createList", json!({"name": "ann", "groupId": group, "items": ["milk"]}))["listId"]
        .as_str()
        .unwrap()
        .to_owned();
    for item in ["eggs", "bread"] {
        co.call("append", json!({"name": "ann", "coId": list, "value": item}));
    }
    let gone = co.call("createMap", json!({"name": "ann", "groupId": group, "init": {"secret": "s"}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    co.call("waitSynced", json!({"name": "ann"}));
    assert_eq!(co.call("deleteCoValue", json!({"name": "ann", "coId": gone}))["deleted"], true);
    co.call("waitSynced", json!({"name": "ann"}));
    co.call("close", json!({"name": "ann"}));

    // kill -9: nothing is compacted on the way out, the tail stays a tail.
    let mut server = server;
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).unwrap();
    drop(server);
    let (src_docs, src_covalues) = rt.block_on(async {
        let store = Store::open(&src).await;
        let dump = store.dump().await;
        store.close().await;
        dump
    });
    let notes = &src_docs.iter().find(|(id, _)| id == "notes").unwrap().1;
    assert!(notes.snapshot.is_some() && !notes.updates.is_empty(), "notes has a snapshot and a tail: {notes:?}");
    let todo = &src_docs.iter().find(|(id, _)| id == "todo").unwrap().1;
    assert!(todo.snapshot.is_none() && !todo.updates.is_empty(), "todo has a journal only");
    let deleted = &src_covalues.iter().find(|(id, _)| *id == gone).unwrap().1;
    assert!(deleted.deleted, "the deleted map is stored deleted");
    assert!(src_covalues.len() >= 6, "account, profile, groups, maps, list: {}", src_covalues.len());

    // Migrate into PostgreSQL.
    let pg = PgCluster::start();
    let dst = rt.block_on(create_database(&pg, "moai"));
    let out = migrate(&["--from", &src, "--to", &dst]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}\n{stdout}");
    assert!(stderr.contains("moai migrate: copying"), "progress lines on stderr: {stderr}");
    assert!(
        stdout.contains(&format!("documents: {} copied, 0 completed, 0 already there", src_docs.len())),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("CoValues: {} copied", src_covalues.len())), "{stdout}");
    assert!(stdout.contains("verified: the target equals the source"), "{stdout}");

    // Stored exactly as in the source: the same snapshot, the same journal entries, every
    // CoValue field.
    let (dst_docs, dst_covalues) = rt.block_on(async {
        let store = Store::open(&dst).await;
        let dump = store.dump().await;
        store.close().await;
        dump
    });
    assert_eq!(dst_docs, src_docs);
    assert_eq!(dst_covalues, src_covalues);

    // Running it again is safe: nothing is written twice.
    let again = migrated(&["--from", &src, "--to", &dst]);
    assert!(again.contains(&format!("documents: 0 copied, 0 completed, {} already there", src_docs.len())), "{again}");
    assert!(
        again.contains(&format!("CoValues: 0 copied, 0 completed, {} already there", src_covalues.len())),
        "{again}"
    );
    let (after_docs, after_covalues) = rt.block_on(async {
        let store = Store::open(&dst).await;
        let dump = store.dump().await;
        store.close().await;
        dump
    });
    assert_eq!((after_docs, after_covalues), (src_docs.clone(), src_covalues.clone()));

    // A server on PostgreSQL serves it all to real clients.
    let server = start_on(&dst, &[]);
    let ws = server.ws_url("/sync/v1");
    let mut y = NodeDriver::yjs();
    y.connect("r", &ws, "notes", json!({}));
    y.call("waitText", json!({"name": "r", "equals": "hello world"}));
    y.connect("r2", &ws, "todo", json!({}));
    y.call("waitText", json!({"name": "r2", "equals": "buy milk"}));
    let sync = server.ws_url("/sync");
    let mut co = NodeDriver::cojson();
    // Ann logs in with her secret: her account came along.
    co.call(
        "openAccount",
        json!({"name": "ann2", "url": sync, "accountId": account["accountId"], "agentSecret": account["agentSecret"]}),
    );
    assert_eq!(
        co.call("getMap", json!({"name": "ann2", "coId": map}))["map"],
        json!({"title": "groceries", "owner": "ann"})
    );
    co.call("createAccount", json!({"name": "bob", "url": sync}));
    assert_eq!(co.call("getList", json!({"name": "bob", "coId": list}))["list"], json!(["milk", "eggs", "bread"]));
    let loaded = co.call("load", json!({"name": "bob", "coId": gone}));
    assert_eq!((loaded["available"].as_bool(), loaded["deleted"].as_bool()), (Some(true), Some(true)), "{loaded}");
    assert_eq!(loaded["content"], json!({}), "{loaded}");
    // And it goes on: edits on PostgreSQL flow as before.
    co.call("append", json!({"name": "bob", "coId": list, "value": "tea"}));
    co.call("waitList", json!({"name": "ann2", "coId": list, "contains": "tea"}));
    y.connect("r3", &ws, "notes", json!({}));
    y.call("waitSynced", json!({"name": "r3"}));
    y.call("insertText", json!({"name": "r", "text": "!"}));
    y.call("waitText", json!({"name": "r3", "equals": "hello world!"}));
    co.call("waitSynced", json!({"name": "bob"}));
    drop(server);

    // The way back: PostgreSQL to a new SQLite file.
    let back = format!("sqlite:{}", dir.path().join("back.db").display());
    let out = migrated(&["--from", &dst, "--to", &back]);
    assert!(out.contains("verified: the target equals the source"), "{out}");
    let (back_docs, _) = rt.block_on(async {
        let store = Store::open(&back).await;
        let dump = store.dump().await;
        store.close().await;
        dump
    });
    let notes = &back_docs.iter().find(|(id, _)| id == "notes").unwrap().1;
    assert_eq!(stored_text(notes), "hello world!");
}

/// A source written through the storage API: "notes" (snapshot + journal), "todo" (journal),
/// one CoValue with two sessions and a checkpoint.
async fn seed_source(url: &str) -> (Doc, Doc) {
    let store = Store::open(url).await;
    let notes = Doc::new();
    let todo = Doc::new();
    for word in ["alpha ", "beta "] {
        store.journal().append("notes", edit(&notes, word)).await.unwrap();
    }
    let loaded = store.journal().load("notes").await.unwrap();
    store.journal().compact("notes", full_state(&notes), loaded.folded()).await.unwrap();
    store.journal().append("notes", edit(&notes, "gamma")).await.unwrap();
    store.journal().append("todo", edit(&todo, "milk")).await.unwrap();
    let session = |name: &str, after: u64, n: u64, checkpoints: &[u64]| SessionAppendRecord {
        session: name.into(),
        after,
        transactions: (after..after + n)
            .map(|i| format!(r#"{{"privacy":"trusting","madeAt":{i},"changes":"[{i}]"}}"#))
            .collect(),
        last_signature: format!("signature_z{name}{}", after + n),
        checkpoints: checkpoints.iter().map(|c| (*c, format!("signature_z{name}{c}"))).collect(),
        bytes_since_signature: BytesSinceSignature::Add(3 * n),
    };
    store
        .covalues()
        .append_covalue(CoValueAppend {
            id: "co_zMap".into(),
            header: Some(
                r#"{"type":"comap","ruleset":{"type":"unsafeAllowAll"},"meta":null,"uniqueness":1e21}"#.into(),
            ),
            sessions: vec![session("co_zA_session_zA", 0, 4, &[2]), session("co_zA_session_zB", 0, 1, &[])],
            deleted: false,
            erase_sessions: vec![],
        })
        .await
        .unwrap();
    store.close().await;
    (notes, todo)
}

#[test]
fn a_target_with_other_data_is_refused_and_an_interrupted_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!("sqlite:{}", dir.path().join("source.db").display());
    let rt = runtime();
    let (notes, _todo) = rt.block_on(seed_source(&src));
    let pg = PgCluster::start();
    let (foreign, partial) =
        rt.block_on(async { (create_database(&pg, "other_data").await, create_database(&pg, "partial").await) });

    // Not a database file: refused, and none is created.
    let missing = dir.path().join("missing.db");
    let out = migrate(&["--from", &format!("sqlite:{}", missing.display()), "--to", &foreign]);
    assert!(!out.status.success() && text(&out.stderr).contains("no database file"), "{}", text(&out.stderr));
    assert!(!missing.exists());
    // The same database on both sides: refused.
    let out = migrate(&["--from", &src, "--to", &src]);
    assert!(!out.status.success() && text(&out.stderr).contains("the same database"), "{}", text(&out.stderr));

    // A target holding other data: refused, nothing written.
    let stranger = Doc::new();
    rt.block_on(async {
        let store = Store::open(&foreign).await;
        store.journal().append("stranger", edit(&stranger, "not from the source")).await.unwrap();
        store.close().await;
    });
    let out = migrate(&["--from", &src, "--to", &foreign]);
    let stderr = text(&out.stderr);
    eprintln!("refused:\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already holds data that is not from this source"), "{stderr}");
    assert!(stderr.contains("document \"stranger\": not in the source") && stderr.contains("--merge"), "{stderr}");
    let held = rt.block_on(async {
        let store = Store::open(&foreign).await;
        let held = (store.docs().await, store.covalue_ids().await);
        store.close().await;
        held
    });
    assert_eq!(held, (vec!["stranger".to_owned()], vec![]), "nothing was written");
    // A document the target has in another version is refused too.
    rt.block_on(async {
        let store = Store::open(&foreign).await;
        store.journal().append("todo", edit(&Doc::new(), "other edits")).await.unwrap();
        store.close().await;
    });
    // --merge: written into anyway; both sides' edits of "todo" are in the target.
    let out = migrated(&["--from", &src, "--to", &foreign, "--merge"]);
    assert!(out.contains("verified: the target contains the source"), "{out}");
    assert!(out.contains("documents: 1 copied, 0 completed, 0 already there, 1 merged"), "{out}");
    rt.block_on(async {
        let store = Store::open(&foreign).await;
        assert_eq!(store.docs().await, ["notes", "stranger", "todo"]);
        let todo = stored_text(&store.journal().load("todo").await.unwrap());
        assert!(todo.contains("milk") && todo.contains("other edits"), "{todo}");
        store.close().await;
    });

    // An interrupted run: the target holds the snapshot of "notes" without its tail, and the
    // first two transactions of one session. The next run completes exactly that.
    rt.block_on(async {
        let source = Store::open(&src).await;
        let target = Store::open(&partial).await;
        let doc = source.journal().load("notes").await.unwrap();
        target.journal().compact("notes", doc.snapshot.clone().unwrap(), Folded::default()).await.unwrap();
        let record = source.covalues().load_covalue("co_zMap").await.unwrap().unwrap();
        let first = &record.sessions[0];
        target
            .covalues()
            .append_covalue(CoValueAppend {
                id: "co_zMap".into(),
                header: Some(record.header.clone()),
                sessions: vec![SessionAppendRecord {
                    session: first.session.clone(),
                    after: 0,
                    transactions: first.transactions[..2].to_vec(),
                    last_signature: first.checkpoints[0].1.clone(),
                    checkpoints: first.checkpoints.clone(),
                    bytes_since_signature: BytesSinceSignature::Reset(0),
                }],
                deleted: false,
                erase_sessions: vec![],
            })
            .await
            .unwrap();
        source.close().await;
        target.close().await;
    });
    let out = migrated(&["--from", &src, "--to", &partial]);
    assert!(out.contains("documents: 1 copied, 1 completed, 0 already there"), "{out}");
    assert!(out.contains("CoValues: 0 copied, 1 completed, 0 already there"), "{out}");
    assert!(out.contains("verified: the target equals the source"), "{out}");

    // The source moves on (moai served it again); the next run brings the target up to date.
    rt.block_on(async {
        let store = Store::open(&src).await;
        store.journal().append("notes", edit(&notes, " delta")).await.unwrap();
        store.close().await;
    });
    let out = migrated(&["--from", &src, "--to", &partial]);
    assert!(out.contains("documents: 0 copied, 1 completed, 1 already there"), "{out}");
    let (text_now, record_now, source_record) = rt.block_on(async {
        let source = Store::open(&src).await;
        let target = Store::open(&partial).await;
        let text = stored_text(&target.journal().load("notes").await.unwrap());
        let record = target.covalues().load_covalue("co_zMap").await.unwrap().unwrap();
        let source_record = source.covalues().load_covalue("co_zMap").await.unwrap().unwrap();
        source.close().await;
        target.close().await;
        (text, record, source_record)
    });
    assert_eq!(text_now, "alpha beta gamma delta");
    assert_eq!(record_now, source_record);
}
