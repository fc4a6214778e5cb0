//! What the change feed's integration tests share (each test binary uses part of it).
#![allow(dead_code)]

pub mod client;
pub mod pg;

/// Log lines of the code under test go to the test's output (`RUST_LOG`, default `warn`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// The change feed's settings for `tables` of `cluster`, with the reconnect backoff and status
/// interval shortened so that tests of failures finish quickly.
pub fn sync_config(cluster: &pg::PgCluster, tables: &[&str]) -> moai_pgsync::PgSyncConfig {
    let mut cfg = moai_pgsync::PgSyncConfig::new(cluster.url(), tables.iter().map(|t| t.to_string()).collect());
    cfg.backoff_min = std::time::Duration::from_millis(50);
    cfg.backoff_max = std::time::Duration::from_millis(500);
    cfg.status_interval = std::time::Duration::from_millis(200);
    cfg
}
