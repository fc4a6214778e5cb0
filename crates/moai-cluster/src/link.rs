//! The command connection to Redis shared by publishing, joining and heartbeats (a multiplexed
//! connection: concurrent commands pipeline on one socket). The heartbeat task (re)connects it;
//! any user that sees it fail reports the loss, which makes the bus degraded until it is back.

use std::sync::Mutex;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};

use crate::BusConfig;

pub(crate) struct Link {
    client: Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    connection: AsyncConnectionConfig,
}

impl Link {
    pub(crate) fn new(client: Client, config: &BusConfig) -> Self {
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(Some(config.command_timeout));
        Self { client, conn: Mutex::new(None), connection }
    }

    /// The current connection, if there is one (never connects).
    pub(crate) fn get(&self) -> Option<MultiplexedConnection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Opens a new connection (not installed: see [`Link::install`]).
    pub(crate) async fn open(&self) -> redis::RedisResult<MultiplexedConnection> {
        self.client.get_multiplexed_async_connection_with_config(&self.connection).await
    }

    /// Opens a connection whose commands may block for `extra` longer (blocking reads).
    pub(crate) async fn open_blocking(
        &self,
        config: &BusConfig,
        extra: std::time::Duration,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let c = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(Some(config.command_timeout + extra));
        self.client.get_multiplexed_async_connection_with_config(&c).await
    }

    pub(crate) fn install(&self, conn: MultiplexedConnection) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
    }

    /// Drops the connection; returns whether there was one (the first to notice a loss).
    pub(crate) fn lost(&self) -> bool {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).take().is_some()
    }
}
