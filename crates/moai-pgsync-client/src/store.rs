//! Where synced rows live: the [`Store`] trait and an in-memory [`MemoryStore`].
//!
//! The trait is the seam for apps (SQLite, IndexedDB via a bridge, an app's own state). Its
//! contract carries the exactness guarantees, so a durable implementation must honour it:
//!
//! * [`Store::apply`] applies one whole transaction **and** records its resume point in the same
//!   atomic unit. Then a crash either keeps both or neither, and resuming from the stored
//!   point never skips or double-applies a transaction.
//! * Snapshot rows and changes are idempotent upserts/patches/deletes keyed by `table + key`,
//!   so a replayed tail (sent again because its ack was lost) converges to the same state.
//! * [`Store::reset`] forgets the rows of the given tables **and** the resume point, so an
//!   interrupted re-snapshot is restarted rather than resumed over partial data.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::error::StoreError;
use super::messages::{Op, Row, Transaction};
use super::position::{Lsn, ResumePoint};

pub trait Store: Send + 'static {
    /// The generation and position to resume from; `None` = the store needs a snapshot.
    fn resume_point(&self) -> Option<ResumePoint>;

    /// Drop every row of `tables` and the resume point (a new snapshot follows).
    fn reset(&mut self, tables: &[String]) -> Result<(), StoreError>;

    /// Upsert full snapshot rows of `table`; each item is `(key, row)`.
    fn upsert_snapshot(&mut self, table: &str, rows: Vec<(Row, Row)>) -> Result<(), StoreError>;

    /// Apply one complete transaction atomically together with `resume` (`None` while a
    /// snapshot's catch-up is still running: the data is not a consistent point yet).
    /// The transaction is passed by value so a store can move rows in without copying them.
    fn apply(&mut self, txn: Transaction, resume: Option<ResumePoint>) -> Result<(), StoreError>;

    /// Record a consistent point (`up_to_date`).
    fn set_resume_point(&mut self, point: ResumePoint) -> Result<(), StoreError>;
}

/// The canonical text of a key object, used as the map key: object members sorted by name at
/// every level. Not `Value::to_string`: when anything in an app's dependency graph enables
/// serde_json's `preserve_order` feature, maps keep arrival order, and a composite key sent as
/// `{"b":1,"a":2}` in a snapshot and `{"a":2,"b":1}` in a change would be two different rows.
pub fn key_text(key: &Row) -> String {
    let mut out = Vec::with_capacity(32);
    canonical_object(key, &mut out);
    // Only serde_json's output and ASCII punctuation went in.
    String::from_utf8(out).unwrap_or_default()
}

fn canonical_object(m: &Row, out: &mut Vec<u8>) {
    out.push(b'{');
    let write_member = |i: usize, k: &String, v: &Value, out: &mut Vec<u8>| {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        canonical(v, out);
    };
    if m.len() == 1 {
        // The common key: one column, nothing to sort.
        if let Some((k, v)) = m.iter().next() {
            write_member(0, k, v, out);
        }
    } else {
        let mut entries: Vec<(&String, &Value)> = m.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (k, v)) in entries.into_iter().enumerate() {
            write_member(i, k, v, out);
        }
    }
    out.push(b'}');
}

fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => canonical_object(m, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(x, out);
            }
            out.push(b']');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// Rows in hash maps: table → key text → row. Optionally keeps a journal of applied
/// transaction LSNs (tests use it to prove nothing was applied twice).
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    tables: HashMap<String, HashMap<String, Row>>,
    resume: Option<ResumePoint>,
    journal: Option<Vec<Lsn>>,
    resets: u64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that remembers the commit LSN of every transaction it applied, in order.
    pub fn with_journal() -> Self {
        MemoryStore { journal: Some(Vec::new()), ..Self::default() }
    }

    /// Rows of one table: key text → row.
    pub fn table(&self, table: &str) -> BTreeMap<String, Row> {
        self.tables.get(table).map(|t| t.iter().map(|(k, r)| (k.clone(), r.clone())).collect()).unwrap_or_default()
    }

    pub fn get(&self, table: &str, key: &Row) -> Option<&Row> {
        self.tables.get(table)?.get(&key_text(key))
    }

    pub fn journal(&self) -> &[Lsn] {
        self.journal.as_deref().unwrap_or(&[])
    }

    /// How many times [`Store::reset`] ran (each re-snapshot resets once).
    pub fn resets(&self) -> u64 {
        self.resets
    }

    fn rows_of(&mut self, table: String) -> &mut HashMap<String, Row> {
        self.tables.entry(table).or_default()
    }

    fn apply_op(&mut self, op: Op) {
        match op {
            Op::Insert { table, key, row } => {
                self.rows_of(table).insert(key_text(&key), row);
            }
            Op::Update { table, key, old_key, row } => {
                let rows = self.rows_of(table);
                let mut base = rows.remove(&key_text(old_key.as_ref().unwrap_or(&key))).unwrap_or_default();
                for (k, v) in row {
                    base.insert(k, v);
                }
                rows.insert(key_text(&key), base);
            }
            Op::Delete { table, key } => {
                if let Some(rows) = self.tables.get_mut(&table) {
                    rows.remove(&key_text(&key));
                }
            }
            Op::Truncate { table } => {
                self.tables.remove(&table);
            }
        }
    }
}

impl Store for MemoryStore {
    fn resume_point(&self) -> Option<ResumePoint> {
        self.resume
    }

    fn reset(&mut self, tables: &[String]) -> Result<(), StoreError> {
        for t in tables {
            self.tables.remove(t);
        }
        self.resume = None;
        self.resets += 1;
        Ok(())
    }

    fn upsert_snapshot(&mut self, table: &str, rows: Vec<(Row, Row)>) -> Result<(), StoreError> {
        let t = self.tables.entry(table.to_owned()).or_default();
        for (key, row) in rows {
            t.insert(key_text(&key), row);
        }
        Ok(())
    }

    fn apply(&mut self, txn: Transaction, resume: Option<ResumePoint>) -> Result<(), StoreError> {
        // In memory every step is infallible, so the transaction is trivially atomic.
        if let Some(j) = &mut self.journal {
            j.push(txn.lsn);
        }
        for op in txn.ops {
            self.apply_op(op);
        }
        if resume.is_some() {
            self.resume = resume;
        }
        Ok(())
    }

    fn set_resume_point(&mut self, point: ResumePoint) -> Result<(), StoreError> {
        self.resume = Some(point);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::position::Position;
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Row {
        v.as_object().unwrap().clone()
    }

    fn txn(lsn: u64, ops: Vec<Op>) -> Transaction {
        Transaction { lsn: Lsn(lsn), xid: "1".into(), commit_time: String::new(), ops }
    }

    #[test]
    fn ops_are_idempotent_upserts_patches_and_deletes() {
        let mut s = MemoryStore::with_journal();
        let t = "public.t".to_string();
        s.upsert_snapshot(&t, vec![(row(json!({"id":1})), row(json!({"id":1,"a":"x","big":"B"})))]).unwrap();
        let patch = Op::Update {
            table: t.clone(),
            key: row(json!({"id":1})),
            old_key: None,
            row: row(json!({"id":1,"a":"y"})),
        };
        let p = ResumePoint { generation: 1, position: Position::end_of(Lsn(10)) };
        s.apply(txn(10, vec![patch.clone()]), Some(p)).unwrap();
        s.apply(txn(10, vec![patch]), Some(p)).unwrap(); // replay converges
        assert_eq!(
            s.get(&t, &row(json!({"id":1}))),
            Some(&row(json!({"id":1,"a":"y","big":"B"}))),
            "patch keeps unsent columns"
        );
        // Key change moves the row.
        let moved = Op::Update {
            table: t.clone(),
            key: row(json!({"id":2})),
            old_key: Some(row(json!({"id":1}))),
            row: row(json!({"id":2})),
        };
        s.apply(txn(11, vec![moved]), None).unwrap();
        assert_eq!(s.table(&t).len(), 1);
        assert_eq!(s.get(&t, &row(json!({"id":2}))).unwrap()["big"], "B");
        assert_eq!(s.resume_point(), Some(p), "None leaves the resume point alone");
        s.apply(txn(12, vec![Op::Delete { table: t.clone(), key: row(json!({"id":2})) }]), None).unwrap();
        s.apply(txn(13, vec![Op::Delete { table: t.clone(), key: row(json!({"id":2})) }]), None).unwrap();
        assert!(s.table(&t).is_empty());
        s.apply(
            txn(14, vec![Op::Insert { table: t.clone(), key: row(json!({"id":5})), row: row(json!({"id":5})) }]),
            None,
        )
        .unwrap();
        s.apply(txn(15, vec![Op::Truncate { table: t.clone() }]), None).unwrap();
        assert!(s.table(&t).is_empty());
        assert_eq!(s.journal().len(), 7, "the store journals what it is given; dedup is the session's job");
        s.reset(std::slice::from_ref(&t)).unwrap();
        assert_eq!(s.resume_point(), None);
        assert_eq!(s.resets(), 1);
    }

    #[test]
    fn key_text_is_canonical() {
        // Built in both insertion orders, so the test bites with and without preserve_order.
        let mut ab = Row::new();
        ab.insert("a".into(), json!(2));
        ab.insert("b".into(), json!({"y": [1, {"q": 1, "p": "x"}], "x": null}));
        let mut ba = Row::new();
        ba.insert("b".into(), json!({"x": null, "y": [1, {"p": "x", "q": 1}]}));
        ba.insert("a".into(), json!(2));
        assert_eq!(key_text(&ab), key_text(&ba));
        assert_eq!(key_text(&ab), r#"{"a":2,"b":{"x":null,"y":[1,{"p":"x","q":1}]}}"#);
    }
}
