//! What the writer can be asked to do, as concrete operations rather than boxed closures: each
//! runs inside the batch transaction on the writer's connection, and its typed answer waits for
//! the batch's COMMIT.

use deadpool_postgres::ClientWrapper;
use futures_util::future::try_join_all;
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;

use super::sql::Sql;
use crate::error::pg_detail;
use crate::{AppendError, CoValueAppend, StorageError};

/// One write queued for the writer: what to do, and whom to tell.
pub(super) struct Job {
    pub op: Op,
    pub reply: Reply,
}

pub(super) enum Op {
    /// [`crate::DocJournal::append_many`].
    AppendDoc { doc: String, updates: Vec<Vec<u8>> },
    /// [`crate::CoValueStore::append_covalues`].
    AppendCoValues(Vec<CoValueAppend>),
    /// A small real write (see `PostgresStorage::probe`).
    Probe,
}

pub(super) enum Reply {
    Seq(oneshot::Sender<Result<Option<u64>, StorageError>>),
    CoValues { to: oneshot::Sender<Vec<Result<(), AppendError>>>, count: usize },
    Done(oneshot::Sender<Result<(), StorageError>>),
}

/// What an operation produced inside the transaction (valid only if the batch commits).
pub(super) enum Output {
    Seq(Option<u64>),
    CoValues(Vec<Result<(), AppendError>>),
    Done,
}

/// How far a job got in its batch.
pub(super) enum Ran {
    Ok(Output),
    /// Rolled back to its savepoint (alone), or the batch broke during it.
    Failed(tokio_postgres::Error),
    /// The batch broke before the job ran.
    NotRun,
}

impl Op {
    pub(super) async fn run(&self, client: &ClientWrapper, sql: &Sql) -> Result<Output, tokio_postgres::Error> {
        match self {
            Op::AppendDoc { doc, updates } => {
                let insert = client.prepare_cached(&sql.insert_update).await?;
                // Pipelined: sent in order on one connection, so executed (and numbered) in order.
                let params: Vec<[&(dyn ToSql + Sync); 2]> = updates.iter().map(|u| [doc as _, u as _]).collect();
                let rows = try_join_all(params.iter().map(|p| client.query_one(&insert, p))).await?;
                Ok(Output::Seq(rows.last().map(|row| row.get::<_, i64>(0) as u64)))
            }
            Op::AppendCoValues(appends) => {
                super::covalue_store::apply_appends(client, sql, appends).await.map(Output::CoValues)
            }
            Op::Probe => {
                client.execute(&sql.probe, &[]).await?;
                Ok(Output::Done)
            }
        }
    }
}

impl Reply {
    /// Answers the waiter once the batch is settled: `commit` is the batch's outcome.
    pub(super) fn send(self, ran: Ran, commit: Result<(), &str>) {
        let failed = |ran: Ran| -> StorageError {
            match (ran, commit) {
                (Ran::Failed(e), _) => StorageError::Postgres(e),
                (_, Err(msg)) => StorageError::CommitFailed(msg.to_owned()),
                (_, Ok(())) => StorageError::CommitFailed("not run".into()),
            }
        };
        match self {
            Reply::Seq(to) => {
                let _ = to.send(match (ran, commit) {
                    (Ran::Ok(Output::Seq(seq)), Ok(())) => Ok(seq),
                    (ran, _) => Err(failed(ran)),
                });
            }
            Reply::Done(to) => {
                let _ = to.send(match (ran, commit) {
                    (Ran::Ok(Output::Done), Ok(())) => Ok(()),
                    (ran, _) => Err(failed(ran)),
                });
            }
            Reply::CoValues { to, count } => {
                let _ = to.send(match (ran, commit) {
                    (Ran::Ok(Output::CoValues(results)), Ok(())) => results,
                    // The job failed as a whole, or its batch did: nothing of it is stored.
                    // StorageError is not Clone; every append gets the same message.
                    (ran, _) => {
                        let message = match failed(ran) {
                            StorageError::Postgres(e) => pg_detail(&e),
                            StorageError::CommitFailed(msg) => msg,
                            other => other.to_string(),
                        };
                        (0..count).map(|_| Err(StorageError::CommitFailed(message.clone()).into())).collect()
                    }
                });
            }
        }
    }
}
