//! Background upkeep of the change feed: registry expiry and retention of `change_history`
//! (docs/pgsync-protocol.md §8), every `maintenance_interval` and on demand.

use tokio::sync::watch;

use crate::change_history;
use crate::db;
use crate::engine::Inner;
use crate::error::Error;
use crate::replicator::Phase;

pub(crate) async fn maintenance_loop(inner: std::sync::Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(inner.cfg.maintenance_interval) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        if let Err(e) = maintenance_once(&inner).await {
            tracing::warn!(error = %e, "pgsync maintenance failed");
        }
    }
}

/// Expire clients unseen for `client_ttl`, then delete history older than `retention` (never
/// past the lowest registered position) and publish the new horizon. Retention runs only on the
/// instance that holds the slot (the history's single writer); followers learn the horizon from
/// `replication_state`.
pub(crate) async fn maintenance_once(inner: &Inner) -> Result<(), Error> {
    let mut client = db::connect(&inner.pg).await?;
    change_history::expire_clients(&client, &inner.cfg.schema, inner.cfg.client_ttl).await?;
    let replicating = inner.feed.borrow().phase == Phase::Streaming;
    if let (Some(max_age), true) = (inner.cfg.retention, replicating) {
        let generation = inner.feed.borrow().generation;
        if let Some(h) =
            change_history::apply_retention(&mut client, &inner.cfg.schema, generation, max_age, inner.cfg.client_ttl)
                .await?
        {
            inner.feed_tx.send_modify(|s| s.horizon = s.horizon.max(h));
        }
    }
    Ok(())
}
