//! [`CoValueStore`] on PostgreSQL: one `append_covalues` call is one writer job, each append in
//! its own nested SAVEPOINT, so a refused or failing append rolls back alone.
//!
//! Another instance may append to the same CoValue at the same time on another connection. So
//! an append first locks the CoValue's row (`SELECT … FOR UPDATE`, or creates it with
//! `INSERT … ON CONFLICT DO NOTHING`, which waits for a concurrent creator) and only then reads
//! the stored counts it checks: two appends to one CoValue are serialised, and the second sees
//! what the first committed. The check itself is `check_append`, shared with the other
//! backends, so all refuse exactly the same appends.

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_postgres::{ClientWrapper, Object};
use tokio::sync::oneshot;
use tokio_postgres::IsolationLevel;

use super::failure::is_storage_failure;
use super::jobs::{Job, Op, Reply};
use super::sql::Sql;
use super::PostgresStorage;
use crate::covalue_store::check_append;
use crate::{
    AppendError, BytesSinceSignature, CoValueAppend, CoValueRecord, CoValueStore, SessionRecord, StorageError,
    StoredKnownState,
};

#[async_trait]
impl CoValueStore for PostgresStorage {
    async fn load_covalue(&self, id: &str) -> Result<Option<CoValueRecord>, StorageError> {
        let (_open, mut conn) = self.connection().await?;
        let sql = &self.inner.shared.sql;
        let result = tokio::time::timeout(self.timeout(), load(&mut conn, sql, id)).await;
        self.finish(conn, result)
    }

    async fn append_covalues(&self, appends: Vec<CoValueAppend>) -> Vec<Result<(), AppendError>> {
        if appends.is_empty() {
            return Vec::new();
        }
        let count = appends.len();
        let (reply, answer) = oneshot::channel();
        let job = Job { op: Op::AppendCoValues(appends), reply: Reply::CoValues { to: reply, count } };
        let closed = || (0..count).map(|_| Err(StorageError::Closed.into())).collect();
        if self.inner.writer.submit(job).await.is_err() {
            return closed();
        }
        answer.await.unwrap_or_else(|_| closed())
    }

    async fn known_states(&self, ids: Vec<String>) -> Result<Vec<Option<StoredKnownState>>, StorageError> {
        let (_open, mut conn) = self.connection().await?;
        let sql = &self.inner.shared.sql;
        let result = tokio::time::timeout(self.timeout(), known_states(&mut conn, sql, &ids)).await;
        self.finish(conn, result)
    }
}

/// Counts are `u64` on our side and `bigint` in PostgreSQL. Protocol counts are bounded by 2^53,
/// so this never fails on real input; a value that does not fit is refused, never wrapped.
fn to_sql(what: &'static str, n: u64) -> Result<i64, Failure> {
    i64::try_from(n).map_err(|_| Failure::Invalid(StorageError::OutOfRange { what, value: n }))
}

fn from_sql(n: i64) -> u64 {
    // Only non-negative values are ever written.
    u64::try_from(n).unwrap_or(0)
}

/// Why one append did not apply.
enum Failure {
    /// Refused by the contract (nothing written).
    Refused(AppendError),
    /// A value this backend cannot store.
    Invalid(StorageError),
    Sql(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Sql(e)
    }
}

/// Runs every append in its own savepoint inside the writer's transaction. Fails as a whole only
/// when the storage does (the connection, the disk): then the writer fails the batch.
pub(super) async fn apply_appends(
    client: &ClientWrapper,
    sql: &Sql,
    appends: &[CoValueAppend],
) -> Result<Vec<Result<(), AppendError>>, tokio_postgres::Error> {
    let mut results = Vec::with_capacity(appends.len());
    for append in appends {
        client.batch_execute("SAVEPOINT covalue_append").await?;
        let failure = match apply_append(client, sql, append).await {
            Ok(()) => {
                client.batch_execute("RELEASE SAVEPOINT covalue_append").await?;
                results.push(Ok(()));
                continue;
            }
            Err(Failure::Sql(e)) if is_storage_failure(&e) => return Err(e),
            Err(Failure::Sql(e)) => AppendError::Storage(StorageError::Postgres(e)),
            Err(Failure::Invalid(e)) => AppendError::Storage(e),
            Err(Failure::Refused(e)) => e,
        };
        client.batch_execute("ROLLBACK TO SAVEPOINT covalue_append; RELEASE SAVEPOINT covalue_append").await?;
        results.push(Err(failure));
    }
    Ok(results)
}

/// Locks (or creates) the CoValue's row, checks the append against the stored counts, applies it.
async fn apply_append(client: &ClientWrapper, sql: &Sql, append: &CoValueAppend) -> Result<(), Failure> {
    let lock = client.prepare_cached(&sql.lock_covalue).await?;
    let (row, exists) = match client.query_opt(&lock, &[&append.id]).await? {
        Some(r) => (Some(r.get::<_, i64>(0)), true),
        None => match &append.header {
            // check_append refuses it below (MissingHeader).
            None => (None, false),
            Some(header) => {
                let insert = client.prepare_cached(&sql.insert_covalue).await?;
                match client.query_opt(&insert, &[&append.id, header]).await? {
                    Some(r) => (Some(r.get::<_, i64>(0)), false),
                    // Another connection created it meanwhile and committed: lock that row and
                    // check against what it stored.
                    None => (Some(client.query_one(&lock, &[&append.id]).await?.get::<_, i64>(0)), true),
                }
            }
        },
    };
    let mut stored: HashMap<String, u64> = HashMap::new();
    if let (Some(row), true) = (row, exists) {
        let names: Vec<&str> = append.sessions.iter().map(|s| s.session.as_str()).collect();
        let counts = client.prepare_cached(&sql.session_counts).await?;
        for r in client.query(&counts, &[&row, &names]).await? {
            stored.insert(r.get(0), from_sql(r.get(1)));
        }
    }
    check_append(append, exists, |session| Ok(stored.get(session).copied().unwrap_or(0))).map_err(Failure::Refused)?;
    let Some(covalue) = row else {
        // Not reachable: check_append refuses a CoValue that is neither stored nor created.
        return Err(Failure::Refused(AppendError::MissingHeader { id: append.id.clone() }));
    };

    if append.deleted {
        client.execute(&client.prepare_cached(&sql.mark_deleted).await?, &[&covalue]).await?;
    }
    let upsert_session = client.prepare_cached(&sql.upsert_session).await?;
    let insert_transactions = client.prepare_cached(&sql.insert_transactions).await?;
    let upsert_signature = client.prepare_cached(&sql.upsert_signature).await?;
    for s in &append.sessions {
        let new_count = to_sql("transaction count", s.after.saturating_add(s.transactions.len() as u64))?;
        let after = to_sql("transaction count", s.after)?;
        let (reset, bytes) = match s.bytes_since_signature {
            BytesSinceSignature::Add(b) => (false, b),
            BytesSinceSignature::Reset(b) => (true, b),
        };
        let bytes = to_sql("bytes since signature", bytes)?;
        let ses: i64 = client
            .query_one(&upsert_session, &[&covalue, &s.session, &new_count, &s.last_signature, &bytes, &reset])
            .await?
            .get(0);
        client.execute(&insert_transactions, &[&ses, &after, &s.transactions]).await?;
        for (count, signature) in &s.checkpoints {
            let count = to_sql("checkpoint count", *count)?;
            client.execute(&upsert_signature, &[&ses, &count, signature]).await?;
        }
    }
    if !append.erase_sessions.is_empty() {
        let find = client.prepare_cached(&sql.find_sessions).await?;
        let ids: Vec<i64> =
            client.query(&find, &[&covalue, &append.erase_sessions]).await?.iter().map(|r| r.get(0)).collect();
        if !ids.is_empty() {
            client.execute(&client.prepare_cached(&sql.erase_transactions).await?, &[&ids]).await?;
            client.execute(&client.prepare_cached(&sql.erase_signatures).await?, &[&ids]).await?;
            client.execute(&client.prepare_cached(&sql.erase_sessions).await?, &[&ids]).await?;
        }
    }
    Ok(())
}

async fn load(conn: &mut Object, sql: &Sql, id: &str) -> Result<Option<CoValueRecord>, tokio_postgres::Error> {
    // One snapshot for all four queries: a concurrent append is seen whole or not at all.
    let tx = conn.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    let Some(head) = tx.query_opt(&tx.prepare_cached(&sql.load_covalue).await?, &[&id]).await? else {
        tx.commit().await?;
        return Ok(None);
    };
    let (row, header, deleted): (i64, String, bool) = (head.get(0), head.get(1), head.get(2));
    let heads = tx.query(&tx.prepare_cached(&sql.load_sessions).await?, &[&row]).await?;
    let txs = tx.query(&tx.prepare_cached(&sql.load_transactions).await?, &[&row]).await?;
    let sigs = tx.query(&tx.prepare_cached(&sql.load_signatures).await?, &[&row]).await?;
    tx.commit().await?;

    let mut index: HashMap<i64, usize> = HashMap::new();
    let mut sessions = Vec::with_capacity(heads.len());
    for h in &heads {
        index.insert(h.get(0), sessions.len());
        sessions.push(SessionRecord {
            session: h.get(1),
            transactions: Vec::new(),
            last_signature: h.get(2),
            checkpoints: Vec::new(),
        });
    }
    for t in &txs {
        if let Some(&i) = index.get(&t.get::<_, i64>(0)) {
            sessions[i].transactions.push(t.get(1));
        }
    }
    for g in &sigs {
        if let Some(&i) = index.get(&g.get::<_, i64>(0)) {
            sessions[i].checkpoints.push((from_sql(g.get(1)), g.get(2)));
        }
    }
    Ok(Some(CoValueRecord { header, sessions, deleted }))
}

async fn known_states(
    conn: &mut Object,
    sql: &Sql,
    ids: &[String],
) -> Result<Vec<Option<StoredKnownState>>, tokio_postgres::Error> {
    // One statement: one consistent snapshot.
    let rows = conn.query(&conn.prepare_cached(&sql.known_states).await?, &[&ids]).await?;
    let mut found: HashMap<String, StoredKnownState> = HashMap::new();
    for r in &rows {
        let state = found.entry(r.get(0)).or_insert_with(|| StoredKnownState {
            header: true,
            sessions: Vec::new(),
            deleted: r.get(1),
        });
        if let Some(session) = r.get::<_, Option<String>>(2) {
            state.sessions.push((session, from_sql(r.get::<_, Option<i64>>(3).unwrap_or(0))));
        }
    }
    Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
}
