//! The engine's error type: what can go wrong talking to PostgreSQL, in the replication
//! stream, or in the history it keeps.

use crate::lsn::LsnParseError;
use crate::pgoutput::DecodeError;
use crate::raw_row::RawRowError;
use crate::transaction_assembler::AssembleError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    /// Shown with the server's message: tokio-postgres' own Display says only "db error",
    /// which would hide e.g. "password authentication failed" from the operator.
    #[error("postgres: {}", sql_detail(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error("replication: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("pgoutput: {0}")]
    Decode(#[from] DecodeError),
    #[error("transaction assembly: {0}")]
    Assemble(#[from] AssembleError),
    #[error("change_history holds an invalid row: {0}")]
    CorruptHistory(&'static str),
    #[error("change_history holds an invalid row: unknown op {0:?}")]
    UnknownOp(char),
    #[error("change_history holds an invalid row: {0}")]
    CorruptRow(#[from] RawRowError),
    #[error("CREATE_REPLICATION_SLOT returned no consistent point")]
    NoConsistentPoint,
    #[error("CREATE_REPLICATION_SLOT returned a bad consistent point: {0}")]
    BadConsistentPoint(#[source] LsnParseError),
    #[error("pg_current_snapshot returned a bad xmax: {0}")]
    BadXid8(#[source] std::num::ParseIntError),
    #[error("the replication stream ended")]
    StreamEnded,
    #[error("the replication stream stopped")]
    StreamStopped,
    #[error("the replicator ended during start-up")]
    ReplicatorEndedDuringStartup,
    #[error("the replicator stopped")]
    ReplicatorStopped,
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("page query task: {0}")]
    PageQueryTask(#[from] tokio::task::JoinError),
    /// Seen before anything is changed: the slot is active for another backend.
    #[error("replication slot {slot:?} is in use by backend {pid} (another moai instance replicates this database)")]
    SlotInUse { slot: String, pid: i32 },
    /// A write of history found another fencing epoch: another instance took the slot over.
    #[error("another instance took the replication slot over (epoch {0} is no longer current); not writing history")]
    Superseded(i64),
    #[error("the connection that follows the shared history closed")]
    FollowerConnectionClosed,
    #[error("replication_state changed during the slot takeover ({0})")]
    TakeoverRace(&'static str),
}

impl Error {
    /// The replication slot is held by another connection: another moai instance replicating
    /// the same database, or one that died and whose walsender Postgres has not reaped yet.
    /// Not a start-up failure: this instance waits as a standby until the slot is free.
    pub fn is_slot_in_use(&self) -> bool {
        match self {
            Error::SlotInUse { .. } => true,
            // SQLSTATE 55006 (object_in_use) on the SQL side…
            Error::Sql(e) => e.as_db_error().is_some_and(|db| db.code().code() == "55006"),
            // …and the server's message on the replication protocol side.
            Error::Replication(e) => {
                let text = e.to_string();
                text.contains("is active for PID") || text.contains("55006")
            }
            _ => false,
        }
    }
}

fn sql_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}
