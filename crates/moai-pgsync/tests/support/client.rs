//! A test client for `PgSync::run_session`: materialises rows the way a real client must
//! (snapshot rows upserted, transactions applied only when their `last` part arrived, updates
//! as patches), acks transaction ends, and lets tests wait for conditions with a timeout.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use moai_pgsync::PgSync;
use moai_pgsync::SessionEnd;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub type Row = Map<String, Value>;

pub struct TestClient {
    pub client_id: String,
    tx: Option<mpsc::Sender<String>>,
    rx: mpsc::Receiver<String>,
    task: Option<JoinHandle<SessionEnd>>,
    /// table → key (JSON text) → row.
    pub rows: BTreeMap<String, BTreeMap<String, Row>>,
    snapshot_keys: BTreeMap<String, (String, Vec<String>)>, // snapshot_id → (table, key cols)
    shape_tables: BTreeMap<String, String>,                 // shape id → table
    pending: Vec<(String, Vec<Value>)>,                     // open txn: (lsn, ops)
    /// Applied transactions in order: (lsn, ops).
    pub applied: Vec<(String, Vec<Value>)>,
    pub generation: Option<u64>,
    pub position: Option<Value>,
    pub up_to_date: bool,
    pub messages: Vec<Value>,
    pub auto_ack: bool,
}

impl TestClient {
    pub fn connect(sync: &PgSync, client_id: &str) -> TestClient {
        let (itx, irx) = mpsc::channel(64);
        let (otx, orx) = mpsc::channel(64);
        let s = sync.clone();
        let task = tokio::spawn(async move {
            s.run_session(irx, otx, moai_pgsync::Access::all(), None, std::future::pending()).await
        });
        TestClient {
            client_id: client_id.into(),
            tx: Some(itx),
            rx: orx,
            task: Some(task),
            rows: BTreeMap::new(),
            snapshot_keys: BTreeMap::new(),
            shape_tables: BTreeMap::new(),
            pending: Vec::new(),
            applied: Vec::new(),
            generation: None,
            position: None,
            up_to_date: false,
            messages: Vec::new(),
            auto_ack: true,
        }
    }

    /// Reconnect (new session) keeping local state, position and generation.
    pub fn reconnect(&mut self, sync: &PgSync) {
        let fresh = TestClient::connect(sync, &self.client_id);
        self.tx = fresh.tx;
        self.rx = fresh.rx;
        self.task = fresh.task;
        self.up_to_date = false;
        self.pending.clear();
    }

    pub async fn send(&self, v: Value) {
        self.tx.as_ref().expect("connected").send(v.to_string()).await.expect("session alive");
    }

    pub async fn hello(&mut self, tables: &[&str], batch: u32, window: u32) {
        let shapes: Vec<Value> = tables.iter().map(|t| json!({"id": t, "table": t})).collect();
        for t in tables {
            self.shape_tables.insert((*t).to_owned(), (*t).to_owned());
        }
        let generation = self.generation;
        let position = self.position.clone();
        let client_id = self.client_id.clone();
        self.send(json!({"type":"hello","protocol":1,"client_id":client_id,"generation":generation,
            "position":position,"shapes":shapes,"max_batch_rows":batch,"window":window}))
            .await;
    }

    /// Hello with explicit shape requests (`{"id","table","where"?,"columns"?}`).
    pub async fn hello_shapes(&mut self, shapes: &[Value], batch: u32, window: u32) {
        for s in shapes {
            self.shape_tables.insert(s["id"].as_str().unwrap().to_owned(), s["table"].as_str().unwrap().to_owned());
        }
        let generation = self.generation;
        let position = self.position.clone();
        let client_id = self.client_id.clone();
        self.send(json!({"type":"hello","protocol":1,"client_id":client_id,"generation":generation,
            "position":position,"shapes":shapes,"max_batch_rows":batch,"window":window}))
            .await;
    }

    /// Close the inbound side and wait for the session to end.
    pub async fn disconnect(&mut self) -> SessionEnd {
        self.tx = None;
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("session ends").expect("no panic")
    }

    /// Receive and apply one message.
    pub async fn next(&mut self) -> Option<Value> {
        let text = tokio::time::timeout(Duration::from_secs(60), self.rx.recv())
            .await
            .expect("timed out waiting for a server message")?;
        let v: Value = serde_json::from_str(&text).expect("json");
        self.apply(&v).await;
        self.messages.push(v.clone());
        Some(v)
    }

    /// Process messages until `cond` holds (checked before each receive).
    pub async fn until(&mut self, what: &str, cond: impl Fn(&TestClient) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !cond(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            if self.next().await.is_none() {
                panic!(
                    "session closed while waiting for {what}; last messages: {:?}",
                    self.messages.iter().rev().take(3).collect::<Vec<_>>()
                );
            }
        }
    }

    /// Wait for a message of this type (applying everything on the way).
    pub async fn expect_type(&mut self, ty: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {ty}; last: {:?}",
                self.messages.iter().rev().take(3).collect::<Vec<_>>()
            );
            let v = self.next().await.unwrap_or_else(|| panic!("session closed before {ty}"));
            if v["type"] == ty {
                return v;
            }
        }
    }

    pub fn table(&self, t: &str) -> BTreeMap<String, Row> {
        self.rows.get(t).cloned().unwrap_or_default()
    }

    async fn apply(&mut self, v: &Value) {
        match v["type"].as_str().unwrap_or("") {
            "welcome" => {
                self.generation = v["generation"].as_u64();
                if v["mode"] == "snapshot" {
                    self.rows.clear();
                }
            }
            "must_refetch" => {
                self.rows.clear();
                self.position = None;
            }
            "snapshot_begin" => {
                let table = self.shape_tables.get(v["shape_id"].as_str().unwrap()).cloned().unwrap();
                let key: Vec<String> =
                    v["schema"]["key"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()).collect();
                self.snapshot_keys.insert(v["snapshot_id"].as_str().unwrap().to_owned(), (table, key));
            }
            "snapshot_batch" => {
                let (table, key) = self.snapshot_keys[v["snapshot_id"].as_str().unwrap()].clone();
                for r in v["rows"].as_array().unwrap() {
                    let r = r.as_object().unwrap().clone();
                    let k: Row = key.iter().map(|c| (c.clone(), r[c].clone())).collect();
                    self.rows.entry(table.clone()).or_default().insert(Value::Object(k).to_string(), r);
                }
            }
            "changes" => {
                let mut ended_at_boundary = false;
                for t in v["txns"].as_array().unwrap() {
                    let lsn = t["lsn"].as_str().unwrap().to_owned();
                    match self.pending.last_mut() {
                        Some((l, ops)) if *l == lsn => ops.extend(t["ops"].as_array().unwrap().iter().cloned()),
                        _ => {
                            assert!(self.pending.is_empty(), "new txn while one is open");
                            self.pending.push((lsn, t["ops"].as_array().unwrap().clone()));
                        }
                    }
                    ended_at_boundary = t["last"].as_bool().unwrap();
                    if ended_at_boundary {
                        let (lsn, ops) = self.pending.pop().unwrap();
                        for op in &ops {
                            self.apply_op(op);
                        }
                        self.applied.push((lsn, ops));
                    }
                }
                if ended_at_boundary && self.auto_ack {
                    self.position = Some(v["to"].clone());
                    let ack = json!({"type":"ack","position":v["to"]});
                    self.send(ack).await;
                }
            }
            "up_to_date" => {
                self.up_to_date = true;
                self.position = Some(v["position"].clone());
                if self.auto_ack {
                    self.send(json!({"type":"ack","position":v["position"]})).await;
                }
            }
            _ => {}
        }
    }

    fn apply_op(&mut self, op: &Value) {
        let table = op["table"].as_str().unwrap().to_owned();
        let key = op["key"].to_string();
        let rows = self.rows.entry(table).or_default();
        match op["op"].as_str().unwrap() {
            "insert" => {
                rows.insert(key, op["row"].as_object().unwrap().clone());
            }
            "update" => {
                let mut base = match op.get("old_key").filter(|k| !k.is_null()) {
                    Some(old) => rows.remove(&old.to_string()).unwrap_or_default(),
                    None => rows.remove(&key).unwrap_or_default(),
                };
                for (k, v) in op["row"].as_object().unwrap() {
                    base.insert(k.clone(), v.clone());
                }
                rows.insert(key, base);
            }
            "delete" => {
                rows.remove(&key);
            }
            "truncate" => rows.clear(),
            other => panic!("unknown op {other}"),
        }
    }
}

/// Rows of a table as the client should see them: key (JSON text of {"id":..}) → row.
pub async fn table_rows(pg: &tokio_postgres::Client, table: &str) -> BTreeMap<String, Row> {
    let rows = pg.query(&format!("SELECT to_jsonb(t) FROM {table} t"), &[]).await.expect("select");
    rows.iter()
        .map(|r| {
            let v: Value = r.get(0);
            let m = v.as_object().unwrap().clone();
            (json!({"id": m["id"]}).to_string(), m)
        })
        .collect()
}
