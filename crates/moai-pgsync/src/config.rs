//! Configuration of the async engine (replicator + sessions).

use std::time::Duration;

use crate::error::Error;

#[derive(Debug, Clone)]
pub struct PgSyncConfig {
    /// libpq-style URL or key=value string: `postgres://user:pass@host:port/db`. The user needs
    /// the REPLICATION attribute (or superuser) and CREATE on the database (for the metadata
    /// schema and the publication).
    pub url: String,
    /// Published tables, each `schema.table`. Shapes may only name these.
    pub tables: Vec<String>,
    /// Logical replication slot (created if missing).
    pub slot_name: String,
    /// Publication (created if missing, its table list kept equal to `tables`).
    pub publication: String,
    /// Schema for change_history, replication_state, relations and clients.
    pub schema: String,
    /// Flush queued transactions to change_history at this many rows (also when the stream
    /// has nothing more to read right now).
    pub flush_rows: usize,
    /// Write a transaction bigger than this in chunks (without moving the watermark).
    pub chunk_rows: usize,
    /// Delete change_history older than this (never what a live client still needs); `None`
    /// keeps everything.
    pub retention: Option<Duration>,
    /// How often retention and registry expiry run.
    pub maintenance_interval: Duration,
    /// Client registrations not seen for this long expire.
    pub client_ttl: Duration,
    pub default_batch_rows: u32,
    pub max_batch_rows: u32,
    pub default_window: u32,
    /// Shapes one session may hold, `hello` and `subscribe` together (default 100). A client
    /// over it gets a fatal `error{code: too_many_shapes}`: every shape costs a catalog lookup,
    /// a snapshot query and filtering work on every change.
    pub max_shapes_per_session: usize,
    /// Longest `hello.client_id` accepted, in bytes (default 256); it is stored in the registry.
    pub max_client_id_bytes: usize,
    /// Snapshot connections (one REPEATABLE READ transaction each) open at once, over all
    /// sessions (default 4). A session that needs a snapshot while all are taken waits for one;
    /// its client sees the snapshot later.
    pub max_snapshot_connections: usize,
    /// Registry rows (`clients`) kept per token subject (default 1000); registering one more
    /// drops that subject's least recently seen row. Open servers share one empty subject.
    pub max_clients_per_subject: u32,
    /// Standby status interval of the replication connection.
    pub status_interval: Duration,
    /// Reconnect backoff bounds.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// While another instance holds the slot, this one follows the shared watermark: woken by
    /// the replicating instance's notifications, and re-reading it at least this often anyway
    /// (a lost notification or a reconnect never stalls its sessions for longer). The same poll
    /// notices a released slot, so a standby tries to take it over within about this interval.
    pub follow_poll_interval: Duration,
}

impl PgSyncConfig {
    pub fn new(url: impl Into<String>, tables: Vec<String>) -> Self {
        PgSyncConfig {
            url: url.into(),
            tables,
            slot_name: "moai_sync".into(),
            publication: "moai_sync".into(),
            schema: "moai_sync".into(),
            flush_rows: 10_000,
            chunk_rows: 10_000,
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            maintenance_interval: Duration::from_secs(60),
            client_ttl: Duration::from_secs(24 * 3600),
            default_batch_rows: 1000,
            max_batch_rows: 10_000,
            default_window: 4,
            max_shapes_per_session: 100,
            max_client_id_bytes: 256,
            max_snapshot_connections: 4,
            max_clients_per_subject: 1000,
            status_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            follow_poll_interval: Duration::from_secs(1),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.tables.is_empty() {
            return Err(Error::Config("no tables to publish".into()));
        }
        for t in &self.tables {
            crate::shape::Shape::parse(t, None, None)
                .map_err(|_| Error::Config(format!("table {t:?} must be schema.table (plain identifiers)")))?;
        }
        for (what, name) in [("slot", &self.slot_name), ("publication", &self.publication), ("schema", &self.schema)] {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(Error::Config(format!("{what} name {name:?} must match [a-z_][a-z0-9_]*")));
            }
        }
        if self.follow_poll_interval.is_zero() {
            return Err(Error::Config("follow_poll_interval must be > 0".into()));
        }
        if self.flush_rows == 0 || self.chunk_rows == 0 {
            return Err(Error::Config("flush_rows and chunk_rows must be > 0".into()));
        }
        if self.max_shapes_per_session == 0
            || self.max_client_id_bytes == 0
            || self.max_snapshot_connections == 0
            || self.max_clients_per_subject == 0
        {
            return Err(Error::Config(
                "max_shapes_per_session, max_client_id_bytes, max_snapshot_connections and max_clients_per_subject must be > 0"
                    .into(),
            ));
        }
        Ok(())
    }
}
