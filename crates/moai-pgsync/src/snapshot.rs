//! A new client's snapshot (docs/pgsync-protocol.md §5): its shapes' rows read in one
//! REPEATABLE READ transaction on a connection of its own, streamed as `snapshot_*` frames, and
//! the [`Stitch`] that joins it to the history. Snapshot connections are capped
//! (`max_snapshot_connections`), because each one pins the database's xmin while it is open.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::{pin_mut, TryStreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{IsolationLevel, SimpleQueryMessage};

use crate::catalog::{table_columns, table_key};
use crate::db::{ident, qualified_ident};
use crate::engine::Inner;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::protocol::{ColumnSchema, Row, ServerMessage, ShapeSchema};
use crate::shape::{Shape, Truth};
use crate::subscription::Stitch;
use crate::value_mapping;

/// A `snapshot_batch` is sent once it holds this many bytes of values, even below the row
/// limit, so that the frames queued between a session and its socket are bounded in bytes and
/// not only in rows.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// The cap on snapshot connections, shared by all sessions, and its gauges.
pub(crate) struct SnapshotSlots {
    /// The connection parameters of snapshot connections (`application_name` set apart).
    pg: tokio_postgres::Config,
    permits: Arc<Semaphore>,
    open: AtomicUsize,
    peak: AtomicUsize,
}

/// Snapshot connections now and at most so far; see `PgSync::snapshot_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotConnections {
    pub open: usize,
    pub peak: usize,
}

impl SnapshotSlots {
    pub fn new(pg: &tokio_postgres::Config, max: usize) -> Self {
        let mut pg = pg.clone();
        pg.application_name("moai-pgsync-snapshot");
        Self { pg, permits: Arc::new(Semaphore::new(max)), open: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
    }

    pub fn gauges(&self) -> SnapshotConnections {
        SnapshotConnections { open: self.open.load(Ordering::SeqCst), peak: self.peak.load(Ordering::SeqCst) }
    }
}

/// One snapshot slot, held from before the connection is opened until its socket is closed:
/// it lives in the connection's task, not in the session, so a slot is free only once the
/// connection (and with it the REPEATABLE READ snapshot and its xmin) is really gone.
struct SlotGuard {
    slots: Arc<SnapshotSlots>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A snapshot connection. Dropped before `finish` (the session ended mid-snapshot: client
/// gone, write deadline, task aborted), it aborts the connection task, which closes the
/// socket at once: Postgres ends the transaction and the slot is released, instead of the
/// connection reading the rest of a large result nobody wants.
struct SnapshotConn {
    client: tokio_postgres::Client,
    task: JoinHandle<()>,
    finished: bool,
}

impl SnapshotConn {
    /// Wait for a free slot, then connect.
    async fn open(slots: &Arc<SnapshotSlots>) -> Result<SnapshotConn, Error> {
        let permit = slots.permits.clone().acquire_owned().await.map_err(|_| Error::ShuttingDown)?;
        let open = slots.open.fetch_add(1, Ordering::SeqCst) + 1;
        slots.peak.fetch_max(open, Ordering::SeqCst);
        let guard = SlotGuard { slots: slots.clone(), _permit: permit };
        let (client, connection) = slots.pg.connect(tokio_postgres::NoTls).await?;
        let task = tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "pgsync snapshot connection ended");
            }
        });
        Ok(SnapshotConn { client, task, finished: false })
    }
}

impl Drop for SnapshotConn {
    fn drop(&mut self) {
        if !self.finished {
            self.task.abort();
        }
    }
}

/// How a snapshot ended.
pub(crate) enum Streamed {
    Done(Stitch),
    /// The session's outbound channel closed: nobody reads the frames any more.
    OutboundClosed,
}

/// Stream the shapes' rows from one REPEATABLE READ snapshot, at most `batch_rows` rows (and
/// about [`MAX_BATCH_BYTES`]) per `snapshot_batch`; returns its stitch.
pub(crate) async fn stream(
    inner: &Inner,
    shapes: &[(String, Shape)],
    batch_rows: u32,
    out: &mpsc::Sender<String>,
) -> Result<Streamed, Error> {
    let limit = batch_rows.max(1) as usize;
    // At most `max_snapshot_connections` at once: wait for a slot. `conn` is declared before
    // `tx`, so if this future is dropped midway the transaction goes first, then the connection
    // (socket closed, see `SnapshotConn`), and with it the slot.
    let mut conn = SnapshotConn::open(&inner.snapshots).await?;
    let tx =
        conn.client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    // The first statement takes the transaction's snapshot; the WAL insert position read in it is
    // therefore above the commit record of every transaction the snapshot sees, also of those
    // the replicator has not stored yet (see `Stitch::handoff_watermark`).
    let row = tx
        .query_one(
            &format!(
                "SELECT pg_current_snapshot()::text, (SELECT watermark FROM {}.replication_state WHERE id = 1), \
                 pg_current_wal_insert_lsn()",
                ident(&inner.cfg.schema)
            ),
            &[],
        )
        .await?;
    let snapshot: String = row.get(0);
    let h = Lsn(u64::from(row.get::<_, PgLsn>(1)));
    let wal_position = Lsn(u64::from(row.get::<_, PgLsn>(2)));
    macro_rules! send {
        ($msg:expr) => {
            if out.send($msg.to_json()).await.is_err() {
                return Ok(Streamed::OutboundClosed);
            }
        };
    }
    for (shape_id, shape) in shapes {
        let snapshot_id = format!("s-{}", inner.snapshot_ids.fetch_add(1, Ordering::Relaxed));
        let cols = table_columns(&tx, &shape.table).await?;
        let key = table_key(&tx, &shape.table).await?;
        let schema = ShapeSchema {
            key,
            columns: cols
                .iter()
                .filter(|c| shape.columns.as_ref().is_none_or(|l| l.contains(&c.name)))
                .map(|c| ColumnSchema { name: c.name.clone(), type_name: c.type_name.clone() })
                .collect(),
        };
        send!(ServerMessage::SnapshotBegin { snapshot_id: snapshot_id.clone(), shape_id: shape_id.clone(), schema });
        // The simple-query protocol returns every value as its type's output-function text, the
        // same text pgoutput sends: one `value_mapping` for snapshot, stream and history. (Not
        // `::text` casts: `bool::text` is `true`, not `t`; `char(n)::text` trims.)
        let select = cols.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT {select} FROM {}", qualified_ident(&shape.table));
        let stream = tx.client().simple_query_raw(&sql).await?;
        pin_mut!(stream);
        let mut batch: Vec<Row> = Vec::with_capacity(limit.min(4096));
        let mut batch_bytes = 0usize;
        while let Some(msg) = stream.try_next().await? {
            let SimpleQueryMessage::Row(r) = msg else { continue };
            let mut row = Row::new();
            let mut row_bytes = 0usize;
            for (j, c) in cols.iter().enumerate() {
                let v: Option<&str> = r.try_get(j)?;
                row_bytes += c.name.len() + v.map_or(4, str::len);
                row.insert(c.name.clone(), v.map_or(Value::Null, |t| value_mapping::map_text(&c.mapping, t)));
            }
            if shape.evaluate(&row) != Truth::True {
                continue;
            }
            batch.push(shape.project(&row));
            batch_bytes += row_bytes;
            if batch.len() >= limit || batch_bytes >= MAX_BATCH_BYTES {
                let rows = std::mem::take(&mut batch);
                batch_bytes = 0;
                send!(ServerMessage::SnapshotBatch { snapshot_id: snapshot_id.clone(), rows });
            }
        }
        if !batch.is_empty() {
            send!(ServerMessage::SnapshotBatch { snapshot_id: snapshot_id.clone(), rows: batch });
        }
        send!(ServerMessage::SnapshotEnd { snapshot_id });
    }
    tx.commit().await?;
    // Done: let the connection end gracefully (Terminate); its task then frees the slot.
    conn.finished = true;
    Ok(Streamed::Done(Stitch { snapshot, snapshot_watermark: h, wal_position }))
}
