//! The client registry (docs/pgsync-protocol.md §8): one row per (token subject, `client_id`)
//! with the position the client acked, which holds retention back. Rows are written when the
//! subscription accepts a hello ([`register`]) and, coalesced, as the client acks
//! ([`PositionWriter`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_postgres::types::PgLsn;

use crate::db::ident;
use crate::engine::Inner;
use crate::error::Error;
use crate::position::Position;
use crate::protocol::ShapeRequest;
use crate::subscription::Registration;

/// Acked positions are written to the registry at most this often per session
/// (docs/pgsync-protocol.md §6). The registry only feeds retention and metrics (the
/// client's hello is authoritative), so a position that is up to this old costs nothing but
/// slightly more conservative retention, while writing every ack put two commits per
/// delivered transaction on the connection that also serves page queries, which showed up as
/// commit→client latency.
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// The registry's `shapes` column holds the hello's shapes as JSON, or, when that is longer
/// than this, only their count: with rows bounded per subject, this bounds the registry.
const MAX_STORED_SHAPES_BYTES: usize = 64 * 1024;

fn stored_shapes(shapes: &[ShapeRequest]) -> Value {
    let v = serde_json::to_value(shapes).unwrap_or(Value::Null);
    if v.to_string().len() <= MAX_STORED_SHAPES_BYTES {
        v
    } else {
        serde_json::json!({ "omitted": "longer than 64 KiB", "count": shapes.len() })
    }
}

/// Register the client under (token subject, client_id) with the position the subscription
/// accepted, then keep at most `max_clients_per_subject` rows for the subject (the least
/// recently seen go first).
pub(crate) async fn register(inner: &Inner, subject: &str, r: &Registration) -> Result<(), Error> {
    let client = inner.shared.get().await?;
    let s = ident(&inner.cfg.schema);
    let lsn = r.position.map(|p| PgLsn::from(p.lsn.0));
    let seq = r.position.map(|p| i64::from(p.seq));
    let shapes = stored_shapes(&r.shapes);
    client
        .execute(
            &format!(
                "INSERT INTO {s}.clients (subject, client_id, generation, pos_lsn, pos_seq, shapes, last_seen) \
                 VALUES ($1, $2, $3, $4, $5, $6, now()) ON CONFLICT (subject, client_id) DO UPDATE \
                 SET generation = $3, pos_lsn = $4, pos_seq = $5, shapes = $6, last_seen = now()"
            ),
            &[&subject, &r.client_id, &(r.generation as i64), &lsn, &seq, &shapes],
        )
        .await?;
    let keep = i64::from(inner.cfg.max_clients_per_subject);
    client
        .execute(
            &format!(
                "DELETE FROM {s}.clients WHERE subject = $1 AND client_id IN ( \
                   SELECT client_id FROM {s}.clients WHERE subject = $1 \
                   ORDER BY last_seen DESC, client_id OFFSET $2)"
            ),
            &[&subject, &keep],
        )
        .await?;
    Ok(())
}

/// One session's acked positions on their way to the registry: at most one write per
/// [`PERSIST_INTERVAL`], the latest position winning, and the last one flushed at session end.
pub(crate) struct PositionWriter {
    inner: Arc<Inner>,
    subject: String,
    /// (client_id, generation) once the client is registered.
    client: Option<(String, u64)>,
    /// Acked position not yet written.
    pending: Option<Position>,
    last_write: Option<Instant>,
}

impl PositionWriter {
    pub fn new(inner: Arc<Inner>, subject: String) -> Self {
        Self { inner, subject, client: None, pending: None, last_write: None }
    }

    /// The registered client whose positions this writes.
    pub fn registered(&mut self, r: &Registration) {
        self.client = Some((r.client_id.clone(), r.generation));
    }

    /// A new acked position: written now if the interval allows, else by [`Self::deadline`].
    pub fn acked(&mut self, p: Position) {
        self.pending = Some(p);
        self.write_soon(false);
    }

    /// Write the pending position in the background if the interval allows (or `force`).
    pub fn write_soon(&mut self, force: bool) {
        let due = force || self.last_write.is_none_or(|t| t.elapsed() >= PERSIST_INTERVAL);
        if !due {
            return;
        }
        if let Some(p) = self.pending.take() {
            if let Some(write) = self.write(p) {
                tokio::spawn(write);
            }
            self.last_write = Some(Instant::now());
        }
    }

    /// When the pending position must be written by (`None`: nothing pending).
    pub fn deadline(&self) -> Option<Instant> {
        self.pending?;
        Some(self.last_write.map_or_else(Instant::now, |t| t + PERSIST_INTERVAL))
    }

    /// Write the pending position now and wait for it (session end).
    pub async fn flush(&mut self) {
        if let Some(p) = self.pending.take() {
            if let Some(write) = self.write(p) {
                write.await;
            }
        }
    }

    /// The registry write for an acked position. Monotonic in SQL, so writes that overlap or
    /// complete out of order never move a position backwards.
    fn write(&self, p: Position) -> Option<impl Future<Output = ()> + Send + 'static> {
        let (client_id, generation) = self.client.clone()?;
        let subject = self.subject.clone();
        let inner = self.inner.clone();
        let generation = generation as i64;
        Some(async move {
            let res = async {
                let client = inner.shared.get().await?;
                client
                    .execute(
                        &format!(
                            "UPDATE {}.clients SET pos_lsn = $2, pos_seq = $3, generation = $4, last_seen = now() \
                             WHERE subject = $5 AND client_id = $1 \
                               AND (pos_lsn IS NULL OR generation <> $4 OR (pos_lsn, pos_seq) < ($2, $3))",
                            ident(&inner.cfg.schema)
                        ),
                        &[&client_id, &PgLsn::from(p.lsn.0), &i64::from(p.seq), &generation, &subject],
                    )
                    .await?;
                Ok::<(), Error>(())
            }
            .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "pgsync: persisting client position failed");
            }
        })
    }
}
