//! Password logins for the engine's two kinds of connection (SQL via tokio-postgres, replication
//! via pgwire-replication). PostgreSQL 14+ stores passwords as scram-sha-256 and asks TCP
//! clients for SCRAM; older setups still use md5. Both are exercised against a real cluster
//! whose pg_hba requires a password for the sync role, plus a wrong password, which must fail
//! start-up with an authentication error instead of hanging or retrying forever.

mod support;

use std::time::Duration;

use moai_pgsync::{Error, PgSync, PgSyncConfig};
use support::client::{table_rows, TestClient};
use support::pg::PgCluster;
use tokio_postgres::NoTls;

const ITEMS: &str = "public.items";

/// A cluster where `scram_user` must log in with SCRAM and `md5_user` with md5 (normal and
/// replication connections), and everyone else is trusted (the test's own admin connection).
fn cluster() -> PgCluster {
    PgCluster::start_with_hba(
        &["password_encryption = 'scram-sha-256'"],
        &[
            "host all scram_user 127.0.0.1/32 scram-sha-256",
            "host replication scram_user 127.0.0.1/32 scram-sha-256",
            "host all md5_user 127.0.0.1/32 md5",
            "host replication md5_user 127.0.0.1/32 md5",
        ],
    )
}

/// Create the role with a password hashed as `encryption`, owning the synced table (CREATE
/// PUBLICATION needs ownership) and allowed to create the metadata schema.
async fn setup_role(cluster: &PgCluster, role: &str, password: &str, encryption: &str) {
    let (c, conn) = tokio_postgres::connect(&cluster.url(), NoTls).await.expect("admin connect");
    tokio::spawn(conn);
    c.batch_execute(&format!(
        "SET password_encryption = '{encryption}';
         CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}';
         GRANT CREATE ON DATABASE postgres TO {role};
         CREATE TABLE IF NOT EXISTS public.items (id bigint PRIMARY KEY, val int NOT NULL, note text);
         ALTER TABLE public.items OWNER TO {role};"
    ))
    .await
    .expect("create role");
    let stored: String =
        c.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = $1", &[&role]).await.unwrap().get(0);
    let prefix = if encryption == "md5" { "md5" } else { "SCRAM-SHA-256$" };
    assert!(stored.starts_with(prefix), "password stored as {encryption}: {stored}");
}

fn url(cluster: &PgCluster, role: &str, password: &str) -> String {
    format!("postgres://{role}:{password}@127.0.0.1:{}/postgres", cluster.port)
}

async fn sync_as(cluster: &PgCluster, role: &str, password: &str) {
    let mut cfg = PgSyncConfig::new(url(cluster, role, password), vec![ITEMS.into()]);
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(500);
    cfg.status_interval = Duration::from_millis(200);
    let sync = PgSync::start(cfg).await.expect("start with a password");
    tokio::time::timeout(Duration::from_secs(60), sync.wait_caught_up()).await.expect("caught up").unwrap();

    let (c, conn) = tokio_postgres::connect(&url(cluster, role, password), NoTls).await.expect("role connect");
    tokio::spawn(conn);
    c.batch_execute("INSERT INTO items VALUES (1, 1, 'before')").await.unwrap();
    let mut client = TestClient::connect(&sync, "c-auth");
    client.hello(&[ITEMS], 100, 4).await;
    client.expect_type("up_to_date").await;
    // A change after the snapshot proves the replication connection (not just SQL) logged in.
    c.batch_execute("INSERT INTO items VALUES (2, 2, 'streamed')").await.unwrap();
    let expected = table_rows(&c, ITEMS).await;
    client.until("streamed row", |cl| cl.table(ITEMS) == expected).await;
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_password_login_works_for_sql_and_replication() {
    let cluster = cluster();
    setup_role(&cluster, "scram_user", "s3cret pass", "scram-sha-256").await;
    // The space is percent-encoded in the URL, as libpq URLs require.
    sync_as(&cluster, "scram_user", "s3cret%20pass").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_password_login_works_for_sql_and_replication() {
    let cluster = cluster();
    setup_role(&cluster, "md5_user", "md5pw", "md5").await;
    sync_as(&cluster, "md5_user", "md5pw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_start_with_an_auth_error() {
    let cluster = cluster();
    setup_role(&cluster, "scram_user", "right", "scram-sha-256").await;
    let cfg = PgSyncConfig::new(url(&cluster, "scram_user", "wrong"), vec![ITEMS.into()]);
    let err = match tokio::time::timeout(Duration::from_secs(30), PgSync::start(cfg)).await.expect("fails promptly") {
        Ok(_) => panic!("started with a wrong password"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Sql(_)), "{err:?}");
    assert!(err.to_string().contains("password authentication failed"), "{err}");
}
