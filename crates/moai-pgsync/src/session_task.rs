//! `SessionTask`: the I/O around one client's [`Subscription`]. It feeds the subscription
//! events (the client's frames, the replicator's state, the results of its requests) and
//! performs the actions it returns (send a frame, look up columns, stream a snapshot, read a
//! page, register the client, write acked positions). It makes no protocol decision: what to
//! answer, when to refetch, when to close is the subscription's (see its module docs).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::types::PgLsn;

use crate::access::Access;
use crate::catalog::table_columns;
use crate::change_history;
use crate::engine::{Inner, SessionEnd, SessionFailure};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::protocol::ServerMessage;
use crate::registry::{self, PositionWriter};
use crate::replicator::{FeedState, MESSAGE_PREFIX};
use crate::snapshot::{self, Streamed};
use crate::subscription::{Abort, Action, Event, IoStep, PageItem, PageQuery, Subscription, SubscriptionConfig};

/// One client's session: owns its [`Subscription`] and what the subscription's actions need
/// (the registry writer, a prefetched page) and runs, inside `PgSync::run_session`, as one
/// tokio task that the edge spawns. Nothing else touches this state, so it needs no locks.
pub(crate) struct SessionTask {
    inner: Arc<Inner>,
    out: mpsc::Sender<String>,
    feed: watch::Receiver<FeedState>,
    subscription: Subscription,
    /// The token's subject ("" without one): the first half of the registry key.
    subject: String,
    positions: PositionWriter,
    /// The next page, already being read (see [`SessionTask::prefetch`]).
    prefetched: Option<Prefetch>,
}

/// A page query started ahead of its turn; aborted if the session ends first.
struct Prefetch {
    query: PageQuery,
    task: JoinHandle<Result<Vec<PageItem>, Error>>,
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Control flow out of an action: keep going, or end the session.
type Flow = Result<(), SessionEnd>;

impl SessionTask {
    pub fn new(inner: Arc<Inner>, out: mpsc::Sender<String>, access: Access, subject: String) -> Self {
        let cfg = &inner.cfg;
        let subscription = Subscription::new(
            SubscriptionConfig {
                tables: cfg.tables.clone(),
                default_batch_rows: cfg.default_batch_rows,
                max_batch_rows: cfg.max_batch_rows,
                default_window: cfg.default_window,
                max_shapes: cfg.max_shapes_per_session,
                max_client_id_bytes: cfg.max_client_id_bytes,
            },
            access,
        );
        Self {
            feed: inner.feed.clone(),
            positions: PositionWriter::new(inner.clone(), subject.clone()),
            inner,
            out,
            subscription,
            subject,
            prefetched: None,
        }
    }

    pub async fn run(&mut self, inbound: &mut mpsc::Receiver<String>) -> SessionEnd {
        let mut events = VecDeque::from([Event::Feed(self.feed.borrow_and_update().clone())]);
        loop {
            while let Some(ev) = events.pop_front() {
                let actions = self.subscription.handle(ev);
                if let Some(q) = actions.iter().find_map(|a| match a {
                    Action::QueryPage(q) => Some(q),
                    _ => None,
                }) {
                    self.prefetch(q.clone());
                }
                for action in actions {
                    if let Err(end) = self.exec(action, &mut events).await {
                        return end;
                    }
                }
            }
            let persist_at = self.positions.deadline();
            tokio::select! {
                _ = tokio::time::sleep_until(persist_at.unwrap_or_else(tokio::time::Instant::now)), if persist_at.is_some() => {
                    self.positions.write_soon(true);
                }
                msg = inbound.recv() => match msg {
                    Some(text) => events.push_back(Event::ClientText(text)),
                    None => return SessionEnd::ClientClosed,
                },
                r = self.feed.changed() => {
                    if r.is_err() {
                        return SessionEnd::Failed(SessionFailure::EngineStopped);
                    }
                    events.push_back(Event::Feed(self.feed.borrow_and_update().clone()));
                }
            }
        }
    }

    /// Write the last acked position (session end).
    pub async fn finish(&mut self) {
        self.positions.flush().await;
    }

    async fn send(&self, msg: &ServerMessage) -> Flow {
        self.out.send(msg.to_json()).await.map_err(|_| SessionEnd::Failed(SessionFailure::OutboundClosed))
    }

    async fn exec(&mut self, action: Action, events: &mut VecDeque<Event>) -> Flow {
        match action {
            Action::Send(msg) => self.send(&msg).await,
            Action::Close => Err(SessionEnd::Closed),
            Action::Abort(Abort::EngineStopped) => Err(SessionEnd::Failed(SessionFailure::EngineStopped)),
            Action::LookUpColumns(tables) => {
                events.push_back(match self.columns(&tables).await {
                    Ok(columns) => Event::Columns(columns),
                    Err(e) => Event::Failed { step: IoStep::Catalog, detail: e.to_string() },
                });
                Ok(())
            }
            Action::AwaitWatermark(needed) => {
                // The watermark reaches `needed` once the replicator stored what the snapshot
                // saw and then meets a commit or an idle point at or above it. With nothing
                // else written, that idle point would be the walsender's next keepalive; a
                // non-transactional logical message, written after the snapshot, is one now.
                if self.feed.borrow().watermark < needed {
                    tokio::spawn(nudge_replication(self.inner.clone()));
                }
                Ok(())
            }
            Action::ProbeWal => {
                events.push_back(match probe_wal(&self.inner).await {
                    Ok(end) => Event::WalPosition(end),
                    Err(e) => Event::Failed { step: IoStep::Wal, detail: e.to_string() },
                });
                Ok(())
            }
            Action::PersistPosition(p) => {
                self.positions.acked(p);
                Ok(())
            }
            Action::Register(r) => {
                if let Err(e) = registry::register(&self.inner, &self.subject, &r).await {
                    tracing::warn!(error = %e, "pgsync: client registration failed");
                }
                self.positions.registered(&r);
                Ok(())
            }
            Action::TakeSnapshot { shapes, batch_rows } => {
                match snapshot::stream(&self.inner, &shapes, batch_rows, &self.out).await {
                    Ok(Streamed::Done(stitch)) => events.push_back(Event::SnapshotFinished(stitch)),
                    Ok(Streamed::OutboundClosed) => return Err(SessionEnd::Failed(SessionFailure::OutboundClosed)),
                    Err(e) => events.push_back(Event::Failed { step: IoStep::Snapshot, detail: e.to_string() }),
                }
                Ok(())
            }
            Action::QueryPage(q) => {
                let items = match self.prefetched.take() {
                    Some(mut p) if p.query == q => (&mut p.task).await.map_err(Error::from).and_then(|r| r),
                    _ => load_page(self.inner.clone(), q).await,
                };
                events.push_back(match items {
                    Ok(items) => Event::PageLoaded(items),
                    Err(e) => Event::Failed { step: IoStep::History, detail: e.to_string() },
                });
                Ok(())
            }
        }
    }

    async fn columns(&self, tables: &[String]) -> Result<Vec<(String, Vec<String>)>, Error> {
        let client = self.inner.shared.get().await?;
        let mut out = Vec::with_capacity(tables.len());
        for table in tables {
            let cols = table_columns(&*client, table).await?;
            out.push((table.clone(), cols.into_iter().map(|c| c.name).collect()));
        }
        Ok(out)
    }

    /// Start reading the page the subscription just asked for, before the actions queued ahead
    /// of it (typically encoding and sending the previous page) run: PostgreSQL produces the next
    /// page while this task encodes the current one. Without it the two took turns, and a
    /// catch-up ran at the speed of their sum.
    fn prefetch(&mut self, query: PageQuery) {
        let task = tokio::spawn(load_page(self.inner.clone(), query.clone()));
        self.prefetched = Some(Prefetch { query, task });
    }
}

/// Where the WAL ends now, for [`Action::ProbeWal`]: the LSN of a logical message written for
/// it (which also moves the watermark there, as [`nudge_replication`] does), or, if the role may
/// not write one, the WAL insert position (the watermark then gets there with the next
/// keepalive, or, on a follower, with the slot's confirmed position).
async fn probe_wal(inner: &Inner) -> Result<Lsn, Error> {
    let client = inner.shared.get().await?;
    let row = match client
        .query_one("SELECT pg_logical_emit_message(false, $1, 'position_check')", &[&MESSAGE_PREFIX])
        .await
    {
        Ok(row) => row,
        Err(e) => {
            tracing::debug!(error = %e, "pgsync: logical message for a position check failed; reading the WAL position");
            client.query_one("SELECT pg_current_wal_insert_lsn()", &[]).await?
        }
    };
    Ok(Lsn(u64::from(row.try_get::<_, PgLsn>(0)?)))
}

/// Write a non-transactional logical message: when the replicator reads it between
/// transactions, its watermark moves up to the message's LSN (an idle point), and it stores
/// that watermark for followers (a session on a follower waits for it). Best effort: if the
/// role may not write one, keepalives move the watermark later (followers see it through the
/// slot's confirmed position).
async fn nudge_replication(inner: Arc<Inner>) {
    let res = async {
        let client = inner.shared.get().await?;
        client.query_one("SELECT pg_logical_emit_message(false, $1, 'snapshot_handoff')", &[&MESSAGE_PREFIX]).await?;
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "pgsync: logical message for a snapshot handoff failed; waiting for keepalives");
    }
}

/// Page query with retries across connection loss (Postgres restarts).
async fn load_page(inner: Arc<Inner>, q: PageQuery) -> Result<Vec<PageItem>, Error> {
    let mut delay = Duration::from_millis(50);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let res = async {
            let client = inner.pages.get().await?;
            change_history::load_page(&client, &inner.cfg.schema, &q).await
        }
        .await;
        match res {
            Ok(items) => return Ok(items),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "pgsync: page query failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}
