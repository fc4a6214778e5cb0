//! The follower: while another instance holds the replication slot, this instance's watermark
//! comes from the database instead of its own replicator (docs/pgsync-protocol.md §14).
//!
//! The replicating instance commits history and the watermark in one transaction, and
//! `pg_notify(<schema>, …)` in the same transaction (delivered only on commit). The follower
//! `LISTEN`s on a connection of its own and, on every notification and at least every
//! `follow_poll_interval` (a lost notification, a reconnect), reads the shared state and
//! publishes it on the engine's feed as [`Phase::Following`]. Sessions cannot tell the two
//! sources apart: they get `Event::Feed` either way and never read above the watermark.
//!
//! What it reads, all of it monotone within a generation:
//! * `replication_state`: generation, durable watermark, horizon.
//! * the slot's `confirmed_flush_lsn`: the replicator acknowledges a position only once every
//!   commit before it is in history (committed), so `confirmed_flush - 1` is a watermark too. It
//!   carries the replicator's idle watermark (keepalives, moai's logical messages) to followers
//!   within about a status interval even when the replicator has nothing to store, and even when
//!   moai may not write logical messages. It is used only if the state names this slot both
//!   before and after the slot is read: a new generation clears the name before it creates its
//!   slot, so a new slot's position is never taken for the old generation's history.
//! * whether the slot is active: when it is not, the replicator is woken to take it over now.

use std::sync::Arc;

use futures_util::future::poll_fn;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::config::PgSyncConfig;
use crate::db::ident;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::replicator::{FeedState, Phase};

pub(crate) struct Follower {
    cfg: Arc<PgSyncConfig>,
    pg: tokio_postgres::Config,
    state: Arc<watch::Sender<FeedState>>,
    /// The readiness target (see the replicator): caught up once the watermark reaches it.
    target: Lsn,
    /// Raised when the slot is free.
    slot_free: Arc<Notify>,
}

/// A running follower; [`FollowerHandle::stop`] ends it and waits, so that it publishes nothing
/// afterwards. Dropped without `stop`, it aborts the task.
pub(crate) struct FollowerHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl FollowerHandle {
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FollowerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The task that reads a connection's messages, aborted with the connection's follower.
struct ConnectionTask(JoinHandle<Result<(), tokio_postgres::Error>>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one poll read, before it is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shared {
    pub generation: u64,
    pub watermark: Lsn,
    pub horizon: Lsn,
}

impl Follower {
    pub(crate) fn spawn(
        cfg: Arc<PgSyncConfig>,
        mut pg: tokio_postgres::Config,
        state: Arc<watch::Sender<FeedState>>,
        target: Lsn,
        slot_free: Arc<Notify>,
    ) -> FollowerHandle {
        pg.application_name("moai-pgsync-follower");
        let (stop, stop_rx) = watch::channel(false);
        let follower = Follower { cfg, pg, state, target, slot_free };
        FollowerHandle { stop, task: Some(tokio::spawn(follower.run(stop_rx))) }
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = self.cfg.backoff_min;
        loop {
            if *stop.borrow() {
                return;
            }
            match self.follow(&mut stop, &mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64,
                        "pgsync: following the shared history failed; reconnecting");
                    self.state.send_modify(|s| s.phase = Phase::Reconnecting { error: e.to_string() });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(self.cfg.backoff_max);
                }
            }
        }
    }

    /// One connection: LISTEN, then read the shared state on every notification and every
    /// `follow_poll_interval`. `Ok` when stopped.
    async fn follow(&self, stop: &mut watch::Receiver<bool>, backoff: &mut std::time::Duration) -> Result<(), Error> {
        let (client, mut connection) = self.pg.connect(NoTls).await?;
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        let mut conn = ConnectionTask(tokio::spawn(async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    // Several notifications before the next read coalesce into one permit.
                    Some(Ok(AsyncMessage::Notification(_))) => woken.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        }));
        // LISTEN before the first read: a commit after that read is always notified.
        client.batch_execute(&format!("LISTEN {}", ident(&self.cfg.schema))).await?;
        let mut tick = tokio::time::interval(self.cfg.follow_poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            self.poll(&client).await?;
            if first {
                first = false;
                *backoff = self.cfg.backoff_min;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tick.tick() => {}
                end = &mut conn.0 => {
                    return Err(match end {
                        Ok(Err(e)) => Error::Sql(e),
                        _ => Error::FollowerConnectionClosed,
                    });
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Read the shared state (see the module docs) and publish it.
    async fn poll(&self, client: &Client) -> Result<(), Error> {
        let s = ident(&self.cfg.schema);
        let before = client
            .query_opt(
                &format!(
                    "SELECT rs.generation, rs.watermark, rs.horizon, rs.slot_name, sl.confirmed_flush_lsn \
                     FROM {s}.replication_state rs \
                     LEFT JOIN pg_replication_slots sl ON sl.slot_name = rs.slot_name AND sl.database = current_database() \
                     WHERE rs.id = 1"
                ),
                &[],
            )
            .await?;
        let after = client
            .query_one(
                &format!(
                    "SELECT rs.generation, rs.slot_name, (SELECT active FROM pg_replication_slots WHERE slot_name = $1) \
                     FROM (SELECT 1) AS one LEFT JOIN {s}.replication_state rs ON rs.id = 1"
                ),
                &[&self.cfg.slot_name],
            )
            .await?;
        // No replicator holds the slot (or there is none): let ours try now.
        if after.get::<_, Option<bool>>(2) != Some(true) {
            self.slot_free.notify_one();
        }
        let shared = before.and_then(|r| {
            let (generation, slot): (i64, String) = (r.get(0), r.get(3));
            let unchanged = after.get::<_, Option<i64>>(0) == Some(generation)
                && after.get::<_, Option<String>>(1).as_deref() == Some(slot.as_str());
            let confirmed = r.get::<_, Option<PgLsn>>(4).map(u64::from);
            read_shared(
                generation,
                Lsn(u64::from(r.get::<_, PgLsn>(1))),
                Lsn(u64::from(r.get::<_, PgLsn>(2))),
                (unchanged && slot == self.cfg.slot_name).then_some(confirmed).flatten(),
            )
        });
        // The first read is one consistent snapshot of the state, so its durable watermark is
        // valid for its generation even while a new one is being set up; the new generation is
        // read at its commit's notification.
        self.state.send_if_modified(|st| follow_update(st, shared, self.target));
        Ok(())
    }
}

/// The shared state one poll read: the durable watermark, raised to `confirmed_flush - 1` when
/// the slot's position may be used.
pub(crate) fn read_shared(
    generation: i64,
    watermark: Lsn,
    horizon: Lsn,
    confirmed_flush: Option<u64>,
) -> Option<Shared> {
    let generation = u64::try_from(generation).ok().filter(|g| *g > 0)?;
    let proven = confirmed_flush.filter(|c| *c > 0).map(|c| Lsn(c - 1));
    Some(Shared { generation, watermark: watermark.max(proven.unwrap_or(Lsn::ZERO)), horizon })
}

/// Publish what a follower read: phase `Following`; watermark and horizon only move forward
/// within a generation, and are replaced with a new one. Returns whether anything changed.
pub(crate) fn follow_update(st: &mut FeedState, shared: Option<Shared>, target: Lsn) -> bool {
    let before = st.clone();
    st.phase = Phase::Following;
    if let Some(sh) = shared {
        if st.generation == sh.generation {
            st.watermark = st.watermark.max(sh.watermark);
            st.horizon = st.horizon.max(sh.horizon);
        } else {
            st.generation = sh.generation;
            st.watermark = sh.watermark;
            st.horizon = sh.horizon;
        }
        st.caught_up |= st.watermark.0.saturating_add(1) >= target.0;
    }
    *st != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(generation: u64, watermark: u64, phase: Phase) -> FeedState {
        FeedState { phase, generation, watermark: Lsn(watermark), horizon: Lsn(0x10), caught_up: false }
    }

    #[test]
    fn the_confirmed_flush_raises_the_watermark_never_lowers_it() {
        let sh = read_shared(7, Lsn(0x100), Lsn(0x10), Some(0x181)).unwrap();
        assert_eq!(sh.watermark, Lsn(0x180));
        let sh = read_shared(7, Lsn(0x100), Lsn(0x10), Some(0x80)).unwrap();
        assert_eq!(sh.watermark, Lsn(0x100));
        let sh = read_shared(7, Lsn(0x100), Lsn(0x10), Some(0)).unwrap();
        assert_eq!(sh.watermark, Lsn(0x100));
        assert_eq!(read_shared(0, Lsn(0x100), Lsn(0x10), None), None, "no generation yet");
        assert_eq!(read_shared(-1, Lsn(0x100), Lsn(0x10), None), None);
    }

    #[test]
    fn a_followed_watermark_only_moves_forward_within_a_generation() {
        // This instance replicated before (an in-memory idle watermark above the durable one).
        let mut st = state(7, 0x300, Phase::Reconnecting { error: "x".into() });
        let sh = Shared { generation: 7, watermark: Lsn(0x200), horizon: Lsn(0x20) };
        assert!(follow_update(&mut st, Some(sh), Lsn(0x100)));
        assert_eq!(
            (st.phase.clone(), st.watermark, st.horizon, st.caught_up),
            (Phase::Following, Lsn(0x300), Lsn(0x20), true)
        );
        // Nothing new: nothing published.
        assert!(!follow_update(&mut st, Some(sh), Lsn(0x100)));
        // A new generation replaces everything.
        let sh = Shared { generation: 8, watermark: Lsn(0x50), horizon: Lsn(0x50) };
        assert!(follow_update(&mut st, Some(sh), Lsn(0x100)));
        assert_eq!((st.generation, st.watermark, st.horizon), (8, Lsn(0x50), Lsn(0x50)));
    }

    #[test]
    fn readiness_waits_for_the_target() {
        let mut st = state(0, 0, Phase::Starting);
        assert!(follow_update(&mut st, None, Lsn(0x200)), "the phase changed");
        assert!(!st.caught_up);
        follow_update(&mut st, Some(Shared { generation: 7, watermark: Lsn(0x1FE), horizon: Lsn(0) }), Lsn(0x200));
        assert!(!st.caught_up);
        follow_update(&mut st, Some(Shared { generation: 7, watermark: Lsn(0x1FF), horizon: Lsn(0) }), Lsn(0x200));
        assert!(st.caught_up, "every commit before the target is in history");
    }
}
