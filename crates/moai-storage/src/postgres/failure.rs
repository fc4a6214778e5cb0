//! Which PostgreSQL errors mean the storage is failing (reported to the observer, shown on
//! /health) rather than that one write was refused for what it wrote.

/// True for a lost or refused connection, and for the SQLSTATE classes of a server that cannot
/// write: 08 connection exception, 53 insufficient resources (disk full, out of memory), 57
/// operator intervention (shutdown, crash recovery), 58 system error (I/O), XX internal error,
/// and 25006 (a read-only transaction: a standby, or `default_transaction_read_only`).
pub(super) fn is_storage_failure(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.as_db_error() {
        // No answer from the server: I/O, a closed socket, a timeout. (Parameter conversion
        // errors are also client-side, but this backend only binds types it controls.)
        None => true,
        Some(db) => {
            let code = db.code().code();
            code == "25006" || ["08", "53", "57", "58", "XX"].iter().any(|class| code.starts_with(class))
        }
    }
}
