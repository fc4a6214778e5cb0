//! SQL-side helpers: connecting (ordinary and replication connections from one URL), the
//! metadata schema, and a shared, self-reconnecting client for short statements.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use tokio::sync::Mutex;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls};

use crate::error::Error;

/// Session settings pinned on every connection (SQL and replication), so values rendered as
/// text by a snapshot query and by the walsender look the same.
/// (`value_mapping` relies on them: ISO dates in UTC, shortest exact floats, hex bytea.)
pub(crate) const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=postgres -c extra_float_digits=3 -c bytea_output=hex";

pub(crate) fn parse_url(url: &str) -> Result<tokio_postgres::Config, Error> {
    let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| Error::Config(format!("pg url: {e}")))?;
    cfg.options(SESSION_OPTIONS);
    cfg.application_name("moai-pgsync");
    Ok(cfg)
}

/// Settings for the connection that serves history pages. A page is `ORDER BY commit_lsn, seq
/// LIMIT n` after a keyset position, and the only good plan for it walks the primary key in
/// order and stops after `n` rows. Right after a large ingest, before autovacuum has analyzed
/// `change_history`, the planner underestimates the remaining rows and picks a bitmap scan of
/// *everything* after the position plus a top-N sort: every page then costs as much as the whole
/// backlog, and a catch-up became quadratic (measured: 50 ms per 5000-row page over a 100k-row
/// backlog, 20 pages for 1 s). This connection runs nothing but page queries, so it is pinned
/// to the ordered index scan by turning the other plans off for it.
pub(crate) fn for_page_queries(mut cfg: tokio_postgres::Config) -> tokio_postgres::Config {
    let options = format!(
        "{} -c enable_bitmapscan=off -c enable_sort=off -c enable_seqscan=off",
        cfg.get_options().unwrap_or(SESSION_OPTIONS)
    );
    cfg.options(&options);
    cfg
}

pub(crate) async fn connect(cfg: &tokio_postgres::Config) -> Result<Client, Error> {
    let (client, connection) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "pgsync sql connection ended");
        }
    });
    Ok(client)
}

/// A pgwire-replication config for the same server/user/database as `cfg`.
pub(crate) fn replication_config(
    cfg: &tokio_postgres::Config,
    slot: &str,
    publication: &str,
    status_interval: std::time::Duration,
) -> Result<pgwire_replication::ReplicationConfig, Error> {
    use tokio_postgres::config::Host;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().ok_or_else(|| Error::Config("pg url has no user".into()))?;
    let password = cfg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let db = cfg.get_dbname().unwrap_or(user);
    Ok(pgwire_replication::ReplicationConfig::new(host, user, password, db, slot, publication)
        .with_port(port)
        .with_options(SESSION_OPTIONS)
        .with_application_name("moai-pgsync-replicator")
        .with_status_interval(status_interval)
        .with_wakeup_interval(std::time::Duration::from_secs(5)))
}

/// The schema and tables of the change feed, created or upgraded in place. One simple-query
/// batch runs as one transaction, and its first statement takes a transaction-scoped advisory
/// lock on the schema's name: `CREATE … IF NOT EXISTS` is not safe against a concurrent
/// creator (both see "absent" and the second fails on the catalog's unique index), and several
/// instances starting at once on a fresh database all run this.
pub(crate) fn schema_ddl(schema: &str) -> String {
    format!(
        r#"
SELECT pg_advisory_xact_lock(hashtext('moai_pgsync_schema'), hashtext({name}));
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.change_history (
  commit_lsn      pg_lsn      NOT NULL,
  seq             int4        NOT NULL,
  xid             xid8        NOT NULL,
  commit_time     timestamptz NOT NULL,
  tbl             text        NOT NULL,
  op              "char"      NOT NULL,
  pk              jsonb,
  old_pk          jsonb,
  data            jsonb,
  old             jsonb,
  toast_unchanged text[],
  PRIMARY KEY (commit_lsn, seq)
);
CREATE INDEX IF NOT EXISTS change_history_xid_idx ON {s}.change_history (xid);
CREATE TABLE IF NOT EXISTS {s}.replication_state (
  id                int PRIMARY KEY CHECK (id = 1),
  generation        int8   NOT NULL,
  system_identifier text   NOT NULL,
  timeline          int4   NOT NULL,
  slot_name         text   NOT NULL,
  watermark         pg_lsn NOT NULL,
  horizon           pg_lsn NOT NULL,
  updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.relations (
  relid      oid PRIMARY KEY,
  tbl        text  NOT NULL,
  definition jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.clients (
  subject    text NOT NULL DEFAULT '',
  client_id  text NOT NULL,
  generation int8 NOT NULL,
  pos_lsn    pg_lsn,
  pos_seq    int8,
  shapes     jsonb NOT NULL,
  last_seen  timestamptz NOT NULL,
  PRIMARY KEY (subject, client_id)
);
-- Upgrade in place from the registry keyed by client_id alone: rows keep their position under
-- the empty subject (what open servers use) and expire as usual if nobody claims them.
ALTER TABLE {s}.clients ADD COLUMN IF NOT EXISTS subject text NOT NULL DEFAULT '';
DO $moai$
DECLARE pk record;
BEGIN
  SELECT conname, array_length(conkey, 1) AS n INTO pk
    FROM pg_constraint WHERE conrelid = '{s}.clients'::regclass AND contype = 'p';
  IF pk.conname IS NULL OR pk.n <> 2 THEN
    IF pk.conname IS NOT NULL THEN
      EXECUTE format('ALTER TABLE {s}.clients DROP CONSTRAINT %I', pk.conname);
    END IF;
    ALTER TABLE {s}.clients ADD PRIMARY KEY (subject, client_id);
  END IF;
END
$moai$;
CREATE INDEX IF NOT EXISTS clients_subject_last_seen_idx ON {s}.clients (subject, last_seen);
-- The value mapping (value_mapping::MAPPING_VERSION) the history was written with. States from
-- before the column existed hold version 1 history; the replicator starts a new generation.
ALTER TABLE {s}.replication_state ADD COLUMN IF NOT EXISTS mapping_version int4 NOT NULL DEFAULT 1;
-- The fencing token of the instance that holds the replication slot: raised by every instance
-- that takes the slot, and every write of history checks it, so an instance that lost the slot
-- (its stream ended while it still had events to write) cannot write after another took over.
ALTER TABLE {s}.replication_state ADD COLUMN IF NOT EXISTS epoch int8 NOT NULL DEFAULT 0;
"#,
        s = ident(schema),
        name = literal(schema)
    )
}

/// Quote a string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Quote an identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table` → `"schema"."table"`.
pub(crate) fn qualified_ident(table: &str) -> String {
    match table.split_once('.') {
        Some((s, t)) => format!("{}.{}", ident(s), ident(t)),
        None => ident(table),
    }
}

/// A 64-bit transaction id for `xid8` columns (binary COPY / parameters).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Xid8(pub u64);

impl ToSql for Xid8 {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.put_u64(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "xid8"
    }

    fn to_sql_checked(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if !Self::accepts(ty) {
            return Err(format!("cannot encode xid8 as {ty}").into());
        }
        self.to_sql(ty, out)
    }
}

/// Extend a 32-bit xid with the epoch of `next_full_xid` (an xid8 read after the transaction
/// finished, e.g. `pg_snapshot_xmax(pg_current_snapshot())`).
pub(crate) fn extend_xid(xid: u32, next_full_xid: u64) -> u64 {
    let epoch = next_full_xid >> 32;
    let low = next_full_xid as u32;
    let epoch = if xid >= low { epoch.saturating_sub(1) } else { epoch };
    (epoch << 32) | u64::from(xid)
}

/// One shared connection for short statements (page queries, position updates). tokio-postgres
/// pipelines concurrent queries on it. Reconnects when the connection is found closed.
pub(crate) struct SharedClient {
    cfg: tokio_postgres::Config,
    client: Mutex<Option<std::sync::Arc<Client>>>,
}

impl SharedClient {
    pub(crate) fn new(cfg: tokio_postgres::Config) -> Self {
        SharedClient { cfg, client: Mutex::new(None) }
    }

    pub(crate) async fn get(&self) -> Result<std::sync::Arc<Client>, Error> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = std::sync::Arc::new(connect(&self.cfg).await?);
        *guard = Some(c.clone());
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xid_epoch_extension() {
        let next = (3u64 << 32) | 100;
        assert_eq!(extend_xid(99, next), (3 << 32) | 99);
        assert_eq!(extend_xid(5, next), (3 << 32) | 5);
        // Wrapped: an xid above the low half of next belongs to the previous epoch.
        assert_eq!(extend_xid(4_000_000_000, next), (2 << 32) | 4_000_000_000);
        assert_eq!(extend_xid(7, 100), 7);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(qualified_ident("public.todos"), r#""public"."todos""#);
        assert_eq!(ident(r#"a"b"#), r#""a""b""#);
    }
}
