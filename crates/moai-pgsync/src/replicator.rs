//! The replicator: one task that owns the logical slot, decodes the pgoutput stream and writes
//! `change_history` + the watermark (docs/pgsync-protocol.md: §5 "Whole transactions" for
//! what is stored and when the slot is acknowledged, §2 and §7 for generations, §10 items 4 and
//! 6 for relation changes and the idle watermark, §9 for readiness).
//!
//! * Publication and slot are created when missing. Each connection attempt checks the slot
//!   and the cluster identity; a missing or lost slot, another `system_identifier`, or missing
//!   replication state starts a **new generation**: history is truncated, the watermark set to
//!   the new slot's consistent point, and sessions of older generations get `must_refetch`.
//! * Complete transactions are queued and flushed in one Postgres transaction together with
//!   the watermark (binary COPY). A transaction bigger than `chunk_rows` is written in chunks
//!   without moving the watermark, so no reader sees half of it. The slot is acknowledged only
//!   after the flush committed.
//! * When idle (no open transaction, nothing queued), a keepalive or a non-transactional
//!   logical message at LSN `p` proves every commit before `p` was delivered: the in-memory
//!   watermark moves to `p - 1` and the slot is acked at `p` (not persisted: persisting would
//!   write WAL, which makes the walsender send another keepalive, forever).
//! * On any error the assembler is reset, rows above the durable watermark (chunks of an
//!   unfinished transaction) are deleted, and streaming resumes from the slot's
//!   `confirmed_flush`; transactions at or below the watermark are skipped. No gap, no dup.
//! * Readiness: caught up once the watermark reaches the WAL position read at start (a
//!   non-transactional `pg_logical_emit_message` written right after that read makes the stream
//!   reach it promptly even when nothing else is written).
//! * **The slot is the lock** (docs/pgsync-protocol.md §14). An instance that finds the slot
//!   active for another backend changes nothing (no DDL, no publication, no history), becomes a
//!   standby and follows the shared history with a [`Follower`] (phase [`Phase::Following`]):
//!   its sessions are served from `change_history` up to the watermark the replicating
//!   instance commits. It keeps trying to take the slot (at once when its follower sees the slot
//!   released), and once `START_REPLICATION` succeeds it stops the follower, raises the fencing
//!   `epoch` in `replication_state`, deletes what an unfinished writer left above the durable
//!   watermark, and replicates. Every write of history checks the epoch in its own transaction,
//!   so an instance that lost the slot while it still had buffered events cannot write after
//!   another one took over.
//! * Followers learn of new history at once: every transaction that moves the durable watermark
//!   also runs `pg_notify(<schema>, watermark)`, delivered on commit. A moai logical message (a
//!   follower's readiness probe or snapshot handoff, see `session_task.rs`) makes the replicator
//!   store its in-memory watermark too, so followers see an idle watermark promptly (storing it
//!   only on request: storing every idle point would write WAL, which moves the idle point, …).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch, Notify};
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use crate::change_history::{copy_in, TxnRows};
use crate::config::PgSyncConfig;
use crate::db::{self, ident, qualified_ident};
use crate::error::Error;
use crate::follower::{Follower, FollowerHandle};
use crate::lsn::Lsn;
use crate::pgoutput::{
    Begin, Commit, Decoder, DecodingMessage, LogicalMessage, Relation, RelationColumn, ReplicaIdentity,
};
use crate::transaction_assembler::{Assembled, Transaction, TransactionAssembler};
use crate::value_mapping;

/// Prefix of the logical messages the replicator emits to itself.
pub const MESSAGE_PREFIX: &str = "moai_sync";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Connecting for the first time.
    Starting,
    /// This instance holds the slot and streams it into change_history; `caught_up` in
    /// [`FeedState`] tells whether startup WAL was consumed.
    Streaming,
    /// Another instance holds the slot: this one follows the history it commits (its watermark,
    /// generation and horizon as stored in `replication_state`) and takes the slot over when it
    /// is released.
    Following,
    /// Connection lost; retrying with backoff. Sessions keep their sockets.
    Reconnecting {
        error: String,
    },
    Stopped,
}

impl Phase {
    /// The instance's part in the change feed, as `/health` reports it: `replicating`,
    /// `following`, `reconnecting`, `starting` or `stopped`.
    pub fn role(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Streaming => "replicating",
            Phase::Following => "following",
            Phase::Reconnecting { .. } => "reconnecting",
            Phase::Stopped => "stopped",
        }
    }
}

/// What sessions need to know about the feed, published on a `watch` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedState {
    pub phase: Phase,
    /// History generation; 0 until known.
    pub generation: u64,
    /// Every transaction with `commit_lsn <= watermark` is in change_history.
    pub watermark: Lsn,
    /// History below this LSN has been deleted.
    pub horizon: Lsn,
    /// The stream has reached the WAL position that existed when the replicator started.
    pub caught_up: bool,
}

pub(crate) struct Replicator {
    cfg: Arc<PgSyncConfig>,
    pg: tokio_postgres::Config,
    state: Arc<watch::Sender<FeedState>>,
    assembler: TransactionAssembler,
    relations_loaded: bool,
    /// WAL position to reach for readiness (set on the first connection attempt).
    target: Option<Lsn>,
    /// The fencing epoch this instance raised when it took the slot (see the module docs).
    epoch: i64,
    /// Follows the shared history while another instance holds the slot.
    follower: Option<FollowerHandle>,
    /// Raised by the follower when the slot is free: try to take it now.
    slot_free: Arc<Notify>,
}

/// What a successful [`Replicator::setup`] publishes once the follower (if any) has stopped.
struct Started {
    generation: u64,
    watermark: Lsn,
    horizon: Lsn,
}

struct Stream {
    sql: Client,
    repl: ReplicationClient,
    decoder: Decoder,
    /// Durable or proven watermark.
    watermark: Lsn,
    pending: Vec<Transaction>,
    pending_rows: usize,
    /// Relations announced since the last flush, persisted with it.
    dirty_relations: BTreeMap<u32, Relation>,
    /// Skip the transaction being received (already in history).
    skipping: bool,
}

impl Replicator {
    pub(crate) fn new(
        cfg: Arc<PgSyncConfig>,
        pg: tokio_postgres::Config,
        state: Arc<watch::Sender<FeedState>>,
    ) -> Self {
        Replicator {
            cfg,
            pg,
            state,
            assembler: TransactionAssembler::new(),
            relations_loaded: false,
            target: None,
            epoch: 0,
            follower: None,
            slot_free: Arc::new(Notify::new()),
        }
    }

    /// Run until `stop` becomes true. The first connection attempt's setup result is reported
    /// on `first` (an error there is a configuration/startup failure and ends the task); finding
    /// the slot held by another instance is a success: this instance follows as a standby.
    pub(crate) async fn run(mut self, first: oneshot::Sender<Result<(), Error>>, mut stop: watch::Receiver<bool>) {
        let mut first = Some(first);
        let mut backoff = self.cfg.backoff_min;
        loop {
            if *stop.borrow() {
                break;
            }
            let attempt = self.connect_and_stream(&mut first, &mut stop, &mut backoff).await;
            self.assembler.reset();
            match attempt {
                Ok(()) => break, // stop requested
                Err(e) if e.is_slot_in_use() => {
                    // A standby: serve sessions from the shared history, take the slot when free.
                    if let Some(f) = first.take() {
                        let _ = f.send(Ok(()));
                    }
                    if self.follower.is_none() {
                        tracing::warn!(error = %e, slot = %self.cfg.slot_name,
                            "replication slot is in use by another connection (another moai, or one that died \
                             and Postgres has not noticed yet); following the history it writes and taking the \
                             slot over once it is free");
                        self.follower = Some(Follower::spawn(
                            self.cfg.clone(),
                            self.pg.clone(),
                            self.state.clone(),
                            self.target.unwrap_or(Lsn(u64::MAX)),
                            self.slot_free.clone(),
                        ));
                    } else {
                        tracing::debug!(error = %e, "pgsync: the replication slot is still in use");
                    }
                }
                Err(e) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(e));
                        self.state.send_modify(|s| s.phase = Phase::Stopped);
                        return;
                    }
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "pgsync replication interrupted; reconnecting");
                    // While following, the follower reports its own connection's state.
                    if self.follower.is_none() {
                        self.state.send_modify(|s| s.phase = Phase::Reconnecting { error: e.to_string() });
                    }
                }
            }
            let following = self.follower.is_some();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.slot_free.notified(), if following => {}
                _ = stop.changed() => {}
            }
            backoff = (backoff * 2).min(self.cfg.backoff_max);
        }
        if let Some(f) = self.follower.take() {
            f.stop().await;
        }
        self.state.send_modify(|s| s.phase = Phase::Stopped);
    }

    async fn connect_and_stream(
        &mut self,
        first: &mut Option<oneshot::Sender<Result<(), Error>>>,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut std::time::Duration,
    ) -> Result<(), Error> {
        let (mut stream, started) = self.setup().await?;
        // This instance holds the slot now: the follower ends before anything is published, so
        // the feed has one writer at a time.
        let took_over = match self.follower.take() {
            Some(f) => {
                f.stop().await;
                true
            }
            None => false,
        };
        if let Some(f) = first.take() {
            let _ = f.send(Ok(()));
        }
        *backoff = self.cfg.backoff_min;
        let caught_up = self.target.is_some_and(|t| started.watermark.0.saturating_add(1) >= t.0);
        self.state.send_modify(|st| {
            // The durable watermark may trail the proven one published before the reconnect (or
            // the one this instance followed before it took the slot over).
            st.watermark = if st.generation == started.generation {
                st.watermark.max(started.watermark)
            } else {
                started.watermark
            };
            st.horizon =
                if st.generation == started.generation { st.horizon.max(started.horizon) } else { started.horizon };
            st.generation = started.generation;
            st.caught_up |= caught_up;
            st.phase = Phase::Streaming;
        });
        if took_over {
            tracing::info!(slot = %self.cfg.slot_name, epoch = self.epoch, "pgsync: took the replication slot over; replicating");
        }
        let res = self.stream(&mut stream, stop).await;
        stream.repl.stop();
        res
    }

    /// Connect, verify or create publication, slot and generation, take the slot and start
    /// streaming. Nothing is changed before the slot is known to be free (a standby returns
    /// [`Error::SlotInUse`]), and nothing in history before this instance holds it.
    async fn setup(&mut self) -> Result<(Stream, Started), Error> {
        let cfg = self.cfg.clone();
        let s = ident(&cfg.schema);
        let mut sql = db::connect(&self.pg).await?;
        let first = self.target.is_none();
        if first {
            // On every instance, standby or not: a bad configuration fails the start.
            sql.batch_execute(&db::schema_ddl(&cfg.schema)).await?;
            self.check_tables(&sql).await?;
            self.target = Some(readiness_target(&sql).await?);
        }
        // The slot is the lock. The walsender's own check (START_REPLICATION) is what counts;
        // this one keeps a standby from taking locks and rewriting the publication every retry.
        if let Some(pid) = sql
            .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active", &[&cfg.slot_name])
            .await?
            .and_then(|r| r.get::<_, Option<i32>>(0))
        {
            return Err(Error::SlotInUse { slot: cfg.slot_name.clone(), pid });
        }
        if !first {
            sql.batch_execute(&db::schema_ddl(&cfg.schema)).await?;
            self.check_tables(&sql).await?;
        }
        self.ensure_publication(&sql).await?;

        let mut repl = ReplicationClient::connect_gated(db::replication_config(
            &self.pg,
            &cfg.slot_name,
            &cfg.publication,
            cfg.status_interval,
        )?)
        .await?;
        let ident_sys = repl.identify_system().await?;

        let state_row = sql
            .query_opt(
                &format!("SELECT generation, system_identifier, slot_name, watermark, horizon, mapping_version FROM {s}.replication_state WHERE id = 1"),
                &[],
            )
            .await?;
        let slot = sql
            .query_opt(
                "SELECT wal_status, restart_lsn, confirmed_flush_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1 AND database = current_database() AND plugin = 'pgoutput'",
                &[&cfg.slot_name],
            )
            .await?;
        let slot_ok = slot.as_ref().is_some_and(|r| {
            let status: Option<String> = r.get(0);
            let restart: Option<PgLsn> = r.get(1);
            restart.is_some() && status.as_deref() != Some("lost")
        });
        let reason = match &state_row {
            None => Some("no replication state"),
            Some(_) if !slot_ok => {
                Some(if slot.is_some() { "replication slot lost" } else { "replication slot missing" })
            }
            Some(r) if r.get::<_, String>(1) != ident_sys.system_id => {
                Some("different database cluster (system identifier)")
            }
            Some(r) if r.get::<_, String>(2) != cfg.slot_name => Some("slot name changed"),
            // History rows hold mapped values: written under another mapping they would not
            // match what snapshots and the stream send now.
            Some(r) if r.get::<_, i32>(5) != value_mapping::MAPPING_VERSION => Some("value mapping changed"),
            Some(_) => None,
        };

        let (generation, watermark, horizon) = if let Some(reason) = reason {
            let old_gen: i64 = state_row.as_ref().map_or(0, |r| r.get(0));
            if slot.is_some() {
                tracing::warn!(slot = %cfg.slot_name, "dropping unusable replication slot");
                repl.simple_query(&format!("DROP_REPLICATION_SLOT {}", ident(&cfg.slot_name))).await?;
            }
            // Followers read the slot's confirmed_flush as a watermark only while the state names
            // the slot, before and after that read (`follower.rs`): from here until the new
            // generation commits, it names none, so no follower takes the new slot's position for
            // the old generation's history.
            sql.execute(&format!("UPDATE {s}.replication_state SET slot_name = '' WHERE id = 1"), &[]).await?;
            let rows = repl
                .simple_query(&format!(
                    "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'nothing')",
                    ident(&cfg.slot_name)
                ))
                .await?;
            let cp = rows.first().and_then(|r| r.get(1).cloned().flatten()).ok_or_else(|| Error::NoConsistentPoint)?;
            let cp: Lsn = String::from_utf8_lossy(&cp).parse().map_err(Error::BadConsistentPoint)?;
            // Unique across restores of older backups: never reuse a number a client may hold.
            let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
            let generation = (old_gen as u64 + 1).max(now_us);
            let tx = sql.transaction().await?;
            tx.batch_execute(&format!("TRUNCATE {s}.change_history; DELETE FROM {s}.relations;")).await?;
            let timeline = ident_sys.timeline as i32;
            // A commit record may start exactly at the consistent point: it is not in history yet.
            let cp = Lsn(cp.0.saturating_sub(1));
            let cp_pg = PgLsn::from(cp.0);
            tx.execute(
                &format!(
                    "INSERT INTO {s}.replication_state (id, generation, system_identifier, timeline, slot_name, watermark, horizon, updated_at, mapping_version) \
                     VALUES (1, $1, $2, $3, $4, $5, $5, now(), $6) \
                     ON CONFLICT (id) DO UPDATE SET generation = $1, system_identifier = $2, timeline = $3, slot_name = $4, \
                     watermark = $5, horizon = $5, updated_at = now(), mapping_version = $6"
                ),
                &[&(generation as i64), &ident_sys.system_id, &timeline, &cfg.slot_name, &cp_pg, &value_mapping::MAPPING_VERSION],
            )
            .await?;
            notify_followers(&tx, &cfg.schema, cp).await?;
            tx.commit().await?;
            tracing::warn!(reason, generation, consistent_point = %cp, "pgsync: new history generation");
            self.assembler = self.fresh_assembler(&sql).await?;
            self.relations_loaded = true;
            (generation, cp, cp)
        } else {
            let r = state_row.expect("checked above");
            let gen: i64 = r.get(0);
            let w = Lsn(u64::from(r.get::<_, PgLsn>(3)));
            let h = Lsn(u64::from(r.get::<_, PgLsn>(4)));
            if !self.relations_loaded {
                self.assembler = self.fresh_assembler(&sql).await?;
                self.load_relations(&sql).await?;
                self.relations_loaded = true;
            }
            // Every commit before confirmed_flush is durable here (we ack nothing else).
            let confirmed: Option<PgLsn> = slot.as_ref().and_then(|r| r.get(2));
            let mut w2 = w;
            if let Some(c) = confirmed.map(u64::from) {
                if c > 0 && Lsn(c - 1) > w2 {
                    w2 = Lsn(c - 1);
                }
            }
            (gen as u64, w2, h)
        };

        repl.start().await?;
        // From here on this instance holds the slot (or the walsender refused: slot in use).
        repl.wait_started().await?;
        let durable = self.take_over(&mut sql, generation).await?;
        let watermark = watermark.max(durable);
        repl.update_applied_lsn(pgwire_replication::Lsn(watermark.0.saturating_add(1)));
        let stream = Stream {
            sql,
            repl,
            decoder: Decoder::new(1)?,
            watermark,
            pending: Vec::new(),
            pending_rows: 0,
            dirty_relations: BTreeMap::new(),
            skipping: false,
        };
        Ok((stream, Started { generation, watermark, horizon }))
    }

    /// The first transaction of a new holder of the slot: raise the fencing epoch (every later
    /// write of history checks it, so a previous holder still writing is refused from now on),
    /// then delete chunks of a transaction whose writer stopped before its commit, i.e. rows
    /// above the durable watermark as it is now. Returns that watermark.
    async fn take_over(&mut self, sql: &mut Client, generation: u64) -> Result<Lsn, Error> {
        let s = ident(&self.cfg.schema);
        let tx = sql.transaction().await?;
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE {s}.replication_state SET epoch = epoch + 1, updated_at = now() WHERE id = 1 \
                     RETURNING epoch, generation, watermark"
                ),
                &[],
            )
            .await?
            .ok_or(Error::TakeoverRace("the replication state is gone"))?;
        let (epoch, gen, w): (i64, i64, PgLsn) = (row.get(0), row.get(1), row.get(2));
        if gen as u64 != generation {
            return Err(Error::TakeoverRace("another generation started"));
        }
        let deleted = tx.execute(&format!("DELETE FROM {s}.change_history WHERE commit_lsn > $1"), &[&w]).await?;
        tx.commit().await?;
        if deleted > 0 {
            tracing::info!(rows = deleted, "pgsync: deleted the stored part of a transaction that was not finished");
        }
        self.epoch = epoch;
        Ok(Lsn(u64::from(w)))
    }

    /// Raise the durable watermark to `watermark` (if given and higher) in `tx`, provided this
    /// instance still holds the fencing epoch, and wake the followers on commit.
    async fn store_watermark(&self, tx: &tokio_postgres::Transaction<'_>, watermark: Option<Lsn>) -> Result<(), Error> {
        let s = ident(&self.cfg.schema);
        let w = watermark.map(|w| PgLsn::from(w.0));
        let n = tx
            .execute(
                &format!(
                    "UPDATE {s}.replication_state SET watermark = GREATEST(watermark, $1::pg_lsn), updated_at = now() \
                     WHERE id = 1 AND epoch = $2"
                ),
                &[&w, &self.epoch],
            )
            .await?;
        if n != 1 {
            return Err(Error::Superseded(self.epoch));
        }
        if let Some(w) = watermark {
            notify_followers(tx, &self.cfg.schema, w).await?;
        }
        Ok(())
    }

    /// Store the in-memory (idle) watermark, for followers waiting on it (a moai logical
    /// message asked for it).
    async fn persist_watermark(&self, st: &mut Stream) -> Result<(), Error> {
        let tx = st.sql.transaction().await?;
        self.store_watermark(&tx, Some(st.watermark)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A new assembler keyed by each table's primary key (REPLICA IDENTITY FULL flags every
    /// column as key on the wire).
    async fn fresh_assembler(&self, sql: &Client) -> Result<TransactionAssembler, Error> {
        let mut a = TransactionAssembler::new();
        for table in &self.cfg.tables {
            let rows = sql
                .query(
                    "SELECT a.attname::text FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = $1::text::regclass AND i.indisprimary \
                     ORDER BY array_position(i.indkey::int2[], a.attnum)",
                    &[&qualified_ident(table)],
                )
                .await?;
            let cols: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            if !cols.is_empty() {
                a.set_key_columns(table.clone(), cols);
            }
        }
        Ok(a)
    }

    /// Every published table exists and has a replica identity (read-only).
    async fn check_tables(&self, sql: &Client) -> Result<(), Error> {
        for table in &self.cfg.tables {
            let row = sql
                .query_opt(
                    "SELECT c.relreplident::text, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)) \
                     FROM pg_class c WHERE c.oid = to_regclass($1)",
                    &[&qualified_ident(table)],
                )
                .await?
                .ok_or_else(|| Error::Config(format!("table {table} does not exist")))?;
            let ident_kind: String = row.get(0);
            let has_key: bool = row.get(1);
            if ident_kind == "n" || (ident_kind == "d" && !has_key) {
                return Err(Error::Config(format!(
                    "table {table} has no replica identity: add a primary key or REPLICA IDENTITY USING INDEX/FULL"
                )));
            }
        }
        Ok(())
    }

    /// Set REPLICA IDENTITY FULL and the publication's table list (by the slot's holder only).
    async fn ensure_publication(&self, sql: &Client) -> Result<(), Error> {
        let cfg = &self.cfg;
        // Shapes with a row predicate decide on the row before a change (see `filter`): a delete
        // or a move out of a shape is sent only to clients whose shape held the old row. pgoutput
        // carries the whole old row for UPDATE and DELETE only under REPLICA IDENTITY FULL (as
        // ElectricSQL requires), so set it. Without it, such deletes are not sent at all (fail
        // closed) rather than leak keys of other users' rows.
        for table in &cfg.tables {
            let kind: String = sql
                .query_one(
                    "SELECT relreplident::text FROM pg_class WHERE oid = to_regclass($1)",
                    &[&qualified_ident(table)],
                )
                .await?
                .get(0);
            if kind == "f" {
                continue;
            }
            match sql.batch_execute(&format!("ALTER TABLE {} REPLICA IDENTITY FULL", qualified_ident(table))).await {
                Ok(()) => tracing::info!(
                    table = %table,
                    previous = %kind,
                    "pgsync: set REPLICA IDENTITY FULL so row-predicate shapes can see the old row of updates and deletes"
                ),
                Err(e) => tracing::warn!(
                    table = %table,
                    error = %e,
                    "pgsync: could not set REPLICA IDENTITY FULL (the table owner can run ALTER TABLE ... REPLICA IDENTITY FULL): \
                     clients whose shapes have a row predicate will not receive deletes and moves out of their shape"
                ),
            }
        }
        let want: std::collections::BTreeSet<String> = cfg.tables.iter().cloned().collect();
        let exists =
            sql.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&cfg.publication]).await?.is_some();
        let list = cfg.tables.iter().map(|t| qualified_ident(t)).collect::<Vec<_>>().join(", ");
        if !exists {
            sql.batch_execute(&format!("CREATE PUBLICATION {} FOR TABLE {list}", ident(&cfg.publication))).await?;
            return Ok(());
        }
        let have: std::collections::BTreeSet<String> = sql
            .query(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
                &[&cfg.publication],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if have != want {
            tracing::warn!(publication = %cfg.publication, ?have, ?want, "updating publication table list");
            sql.batch_execute(&format!("ALTER PUBLICATION {} SET TABLE {list}", ident(&cfg.publication))).await?;
        }
        Ok(())
    }

    async fn load_relations(&mut self, sql: &Client) -> Result<(), Error> {
        let rows = sql.query(&format!("SELECT definition FROM {}.relations", ident(&self.cfg.schema)), &[]).await?;
        for r in rows {
            let v: Value = r.get(0);
            if let Some(rel) = relation_from_json(&v) {
                self.resolve_types(sql, &rel).await?;
                // Outside a transaction: only seeds the cache, so a changed definition after a
                // restart is still recognised as a change.
                self.assembler.push(LogicalMessage::Relation(rel))?;
            }
        }
        Ok(())
    }

    /// Teach the assembler how to map the values of `rel`'s non-builtin column types (domains by
    /// their base type, arrays by their element type), from the catalog as it is now.
    async fn resolve_types(&mut self, sql: &Client, rel: &Relation) -> Result<(), Error> {
        for c in &rel.columns {
            if !self.assembler.knows_type(c.type_oid) {
                let mapping = value_mapping::resolve(sql, c.type_oid).await?;
                self.assembler.set_type_mapping(c.type_oid, mapping);
            }
        }
        Ok(())
    }

    async fn stream(&mut self, st: &mut Stream, stop: &mut watch::Receiver<bool>) -> Result<(), Error> {
        loop {
            // Drain what is ready; flush when the stream has nothing more right now.
            let ev = match st.repl.recv().now_or_never() {
                Some(ev) => ev?,
                None => {
                    if !st.pending.is_empty() {
                        self.flush(st).await?;
                    }
                    tokio::select! {
                        ev = st.repl.recv() => ev?,
                        _ = stop.changed() => {
                            if *stop.borrow() {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
            };
            let Some(ev) = ev else {
                return Err(Error::StreamEnded);
            };
            match ev {
                ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                    let final_lsn = Lsn(final_lsn.as_u64());
                    st.skipping = final_lsn <= st.watermark;
                    self.assembler.push(LogicalMessage::Begin(Begin {
                        final_lsn,
                        commit_time: commit_time_micros,
                        xid,
                    }))?;
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let msg = st.decoder.decode(&data)?;
                    if let LogicalMessage::Relation(r) = &msg {
                        st.dirty_relations.insert(r.id, r.clone());
                        self.resolve_types(&st.sql, r).await?;
                    }
                    self.assembler.push(msg)?;
                    if self.assembler.open_len() >= self.cfg.chunk_rows {
                        self.write_chunk(st).await?;
                    }
                }
                ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => {
                    let commit = Commit {
                        flags: 0,
                        commit_lsn: Lsn(lsn.as_u64()),
                        end_lsn: Lsn(end_lsn.as_u64()),
                        commit_time: commit_time_micros,
                    };
                    if let Some(Assembled::Transaction(t)) = self.assembler.push(LogicalMessage::Commit(commit))? {
                        if st.skipping {
                            st.skipping = false;
                        } else {
                            st.pending_rows += t.changes.len();
                            st.pending.push(t);
                            if st.pending_rows >= self.cfg.flush_rows {
                                self.flush(st).await?;
                            }
                        }
                    }
                }
                ReplicationEvent::Message { transactional, lsn, prefix, content } => {
                    let lsn = Lsn(lsn.as_u64());
                    let msg = DecodingMessage { xid: None, transactional, lsn, prefix, content: content.to_vec() };
                    if transactional {
                        self.assembler.push(LogicalMessage::Message(msg))?;
                    } else if !self.assembler.in_transaction() {
                        self.idle_point(st, lsn).await?;
                        // One of ours: a follower (readiness, a snapshot handoff, a resumed
                        // position) waits for the watermark to reach this message.
                        if msg.prefix == MESSAGE_PREFIX {
                            self.persist_watermark(st).await?;
                        }
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    if !self.assembler.in_transaction() {
                        self.idle_point(st, Lsn(wal_end.as_u64())).await?;
                    }
                }
                ReplicationEvent::StoppedAt { .. } => return Err(Error::StreamStopped),
            }
        }
    }

    /// Every commit before `p` has been delivered: flush, then move the watermark to `p - 1`
    /// in memory and ack the slot at `p`.
    async fn idle_point(&mut self, st: &mut Stream, p: Lsn) -> Result<(), Error> {
        if p.0 == 0 {
            return Ok(());
        }
        if !st.pending.is_empty() {
            self.flush(st).await?;
        }
        let w = Lsn(p.0 - 1);
        if w > st.watermark {
            st.watermark = w;
            st.repl.update_applied_lsn(pgwire_replication::Lsn(p.0));
            self.publish(st.watermark);
        }
        Ok(())
    }

    fn publish(&self, watermark: Lsn) {
        let caught_up = self.target.is_some_and(|t| watermark.0.saturating_add(1) >= t.0);
        self.state.send_if_modified(|s| {
            let before = (s.watermark, s.caught_up);
            s.watermark = s.watermark.max(watermark);
            s.caught_up |= caught_up;
            before != (s.watermark, s.caught_up)
        });
    }

    async fn next_full_xid(tx: &tokio_postgres::Transaction<'_>) -> Result<u64, Error> {
        let next: String = tx.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[]).await?.get(0);
        next.parse::<u64>().map_err(Error::BadXid8)
    }

    /// Write the open transaction's buffered changes without moving the watermark.
    async fn write_chunk(&mut self, st: &mut Stream) -> Result<(), Error> {
        let Some(part) = self.assembler.drain_open() else { return Ok(()) };
        if st.skipping {
            return Ok(());
        }
        if !st.pending.is_empty() {
            self.flush(st).await?;
        }
        let tx = st.sql.transaction().await?;
        let next = Self::next_full_xid(&tx).await?;
        let rows = [TxnRows {
            xid: part.xid,
            commit_lsn: part.commit_lsn,
            commit_time: part.commit_time,
            changes: &part.changes,
        }];
        copy_in(&tx, &self.cfg.schema, &rows, next).await?;
        self.store_watermark(&tx, None).await?;
        tx.commit().await?;
        tracing::debug!(rows = part.changes.len(), "pgsync: wrote chunk of open transaction");
        Ok(())
    }

    /// Write queued transactions and the watermark in one transaction, then ack the slot.
    async fn flush(&mut self, st: &mut Stream) -> Result<(), Error> {
        let Some(last) = st.pending.last() else { return Ok(()) };
        let (watermark, end_lsn) = (last.commit_lsn, last.end_lsn);
        let s = ident(&self.cfg.schema);
        let tx = st.sql.transaction().await?;
        let next = Self::next_full_xid(&tx).await?;
        let rows: Vec<TxnRows<'_>> = st
            .pending
            .iter()
            .filter(|t| !t.changes.is_empty())
            .map(|t| TxnRows { xid: t.xid, commit_lsn: t.commit_lsn, commit_time: t.commit_time, changes: &t.changes })
            .collect();
        if !rows.is_empty() {
            copy_in(&tx, &self.cfg.schema, &rows, next).await?;
        }
        for rel in st.dirty_relations.values() {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.relations (relid, tbl, definition) VALUES ($1, $2, $3) \
                     ON CONFLICT (relid) DO UPDATE SET tbl = $2, definition = $3"
                ),
                &[&rel.id, &format!("{}.{}", rel.namespace, rel.name), &relation_to_json(rel)],
            )
            .await?;
        }
        self.store_watermark(&tx, Some(watermark)).await?;
        tx.commit().await?;
        st.dirty_relations.clear();
        st.pending.clear();
        st.pending_rows = 0;
        st.watermark = st.watermark.max(watermark);
        st.repl.update_applied_lsn(pgwire_replication::Lsn(end_lsn.0));
        self.publish(st.watermark);
        Ok(())
    }
}

/// The readiness target: the WAL that exists now, plus a logical message so the stream reaches
/// it promptly (and, when another instance replicates, so that it stores its watermark).
async fn readiness_target(sql: &Client) -> Result<Lsn, Error> {
    let now: PgLsn = sql.query_one("SELECT pg_current_wal_lsn()", &[]).await?.get(0);
    let mut target = Lsn(u64::from(now));
    match sql.query_one("SELECT pg_logical_emit_message(false, $1, 'caught_up')", &[&MESSAGE_PREFIX]).await {
        Ok(r) => target = target.max(Lsn(u64::from(r.get::<_, PgLsn>(0)))),
        Err(e) => tracing::debug!(error = %e, "pg_logical_emit_message not allowed; waiting for keepalives"),
    }
    Ok(target)
}

/// Wake the followers when `tx` commits (Postgres delivers a NOTIFY only then, and drops it
/// with a rollback). The channel is the metadata schema's name; the payload is informational,
/// followers re-read `replication_state`.
async fn notify_followers(tx: &tokio_postgres::Transaction<'_>, schema: &str, watermark: Lsn) -> Result<(), Error> {
    tx.execute("SELECT pg_notify($1, $2)", &[&schema, &watermark.to_string()]).await?;
    Ok(())
}

fn relation_to_json(r: &Relation) -> Value {
    let ident = match r.replica_identity {
        ReplicaIdentity::Default => "d",
        ReplicaIdentity::Nothing => "n",
        ReplicaIdentity::Full => "f",
        ReplicaIdentity::Index => "i",
    };
    json!({
        "id": r.id,
        "namespace": r.namespace,
        "name": r.name,
        "replica_identity": ident,
        "columns": r.columns.iter().map(|c| json!({
            "key": c.is_key, "name": c.name, "type": c.type_oid, "typmod": c.type_modifier
        })).collect::<Vec<_>>(),
    })
}

fn relation_from_json(v: &Value) -> Option<Relation> {
    let ident = v.get("replica_identity")?.as_str()?.bytes().next()?;
    Some(Relation {
        xid: None,
        id: u32::try_from(v.get("id")?.as_u64()?).ok()?,
        namespace: v.get("namespace")?.as_str()?.to_owned(),
        name: v.get("name")?.as_str()?.to_owned(),
        replica_identity: ReplicaIdentity::from_byte(ident)?,
        columns: v
            .get("columns")?
            .as_array()?
            .iter()
            .map(|c| {
                Some(RelationColumn {
                    is_key: c.get("key")?.as_bool()?,
                    name: c.get("name")?.as_str()?.to_owned(),
                    type_oid: u32::try_from(c.get("type")?.as_u64()?).ok()?,
                    type_modifier: i32::try_from(c.get("typmod")?.as_i64()?).ok()?,
                })
            })
            .collect::<Option<Vec<_>>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_json_round_trip() {
        let r = Relation {
            xid: None,
            id: 16384,
            namespace: "public".into(),
            name: "todos".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![RelationColumn { is_key: true, name: "id".into(), type_oid: 20, type_modifier: -1 }],
        };
        assert_eq!(relation_from_json(&relation_to_json(&r)), Some(r));
    }
}
