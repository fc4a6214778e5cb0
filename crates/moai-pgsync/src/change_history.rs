//! `change_history`: the durable, ordered log of row changes, keyed by `(commit_lsn, seq)`.
//!
//! The replicator is its single writer (binary COPY); sessions read it with keyset pages bounded
//! by the durable watermark (docs/pgsync-protocol.md §5). Retention deletes the oldest
//! transactions (§8).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::pin_mut;
use serde_json::Value;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{FromSql, PgLsn, ToSql, Type};
use tokio_postgres::Client;

use crate::db::{extend_xid, ident, Xid8};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::pg_time;
use crate::pgoutput::PgTimestamp;
use crate::position::Position;
use crate::protocol::{Row, WireOp};
use crate::raw_row::RawRow;
use crate::subscription::{HistoryRow, PageItem, PageQuery};
use crate::transaction_assembler::{Change, ChangeOp};

const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

pub(crate) fn pg_micros_to_system_time(us: PgTimestamp) -> SystemTime {
    let base = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    if us >= 0 {
        base + Duration::from_micros(us as u64)
    } else {
        base - Duration::from_micros(us.unsigned_abs())
    }
}

pub(crate) fn system_time_to_pg_micros(t: SystemTime) -> PgTimestamp {
    let base = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    match t.duration_since(base) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// Changes of one transaction (or one chunk of it) ready to be written.
pub(crate) struct TxnRows<'a> {
    pub xid: u32,
    pub commit_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub changes: &'a [Change],
}

fn obj(row: &Option<Row>) -> Option<Value> {
    row.as_ref().map(|r| Value::Object(r.clone()))
}

/// Append rows with binary COPY inside the caller's transaction. `next_full_xid` extends the
/// 32-bit xids (read in the same transaction, after the decoded transactions committed).
pub(crate) async fn copy_in(
    client: &tokio_postgres::Transaction<'_>,
    schema: &str,
    txns: &[TxnRows<'_>],
    next_full_xid: u64,
) -> Result<u64, Error> {
    let sql = format!(
        "COPY {}.change_history (commit_lsn, seq, xid, commit_time, tbl, op, pk, old_pk, data, old, toast_unchanged) \
         FROM STDIN BINARY",
        ident(schema)
    );
    let sink = client.copy_in(&sql).await?;
    let xid8 = Type::from_oid(5069).unwrap_or(Type::INT8); // xid8
    let types = [
        Type::PG_LSN,
        Type::INT4,
        xid8,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::CHAR,
        Type::JSONB,
        Type::JSONB,
        Type::JSONB,
        Type::JSONB,
        Type::TEXT_ARRAY,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for t in txns {
        let lsn = PgLsn::from(t.commit_lsn.0);
        let xid = Xid8(extend_xid(t.xid, next_full_xid));
        let time = pg_micros_to_system_time(t.commit_time);
        for c in t.changes {
            let seq = i32::try_from(c.seq).map_err(|_| Error::CorruptHistory("seq exceeds int4"))?;
            let op = c.op.code() as u8 as i8;
            let data = match c.op {
                ChangeOp::Schema => c.schema.as_ref().map(|cols| serde_json::json!({ "columns": cols })),
                _ => obj(&c.row),
            };
            let unchanged = (!c.unchanged.is_empty()).then(|| c.unchanged.clone());
            let (pk, old_pk, old) = (obj(&c.key), obj(&c.old_key), obj(&c.old));
            let values: [&(dyn ToSql + Sync); 11] =
                [&lsn, &seq, &xid, &time, &c.table, &op, &pk, &old_pk, &data, &old, &unchanged];
            writer.as_mut().write(&values).await?;
        }
    }
    Ok(writer.finish().await?)
}

/// The statement of a page query (docs/pgsync-protocol.md §5; with the snapshot → stream
/// handoff filter when `stitch` is set). Schema-change rows (`op = 'S'`) are returned only for
/// `tables` (the session's subscribed tables): the caller turns them into
/// `must_refetch{schema_changed}`.
fn page_sql(schema: &str, stitched: bool) -> String {
    let stitch = if stitched {
        " AND (commit_lsn > $5::text::pg_lsn OR xid >= pg_snapshot_xmin($6::text::pg_snapshot)) \
          AND NOT pg_visible_in_snapshot(xid, $6::text::pg_snapshot)"
    } else {
        ""
    };
    format!(
        "SELECT commit_lsn, seq, xid::text, commit_time, tbl, op, pk, old_pk, data, toast_unchanged, old \
         FROM {}.change_history \
         WHERE (commit_lsn, seq) > ($1, $2::int8) AND commit_lsn <= $3 \
           AND (op <> 'S' OR tbl = ANY($7::text[])){stitch} \
         ORDER BY commit_lsn, seq LIMIT $4",
        ident(schema)
    )
}

/// A `jsonb` column as its JSON text, without parsing it: the binary wire form of `jsonb` is a
/// format version byte (1) followed by the text (see [`RawRow`]).
struct JsonbText(String);

impl<'a> FromSql<'a> for JsonbText {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        match raw.split_first() {
            Some((1, text)) => Ok(JsonbText(std::str::from_utf8(text)?.to_owned())),
            Some((v, _)) => Err(format!("unsupported jsonb format version {v}").into()),
            None => Err("empty jsonb value".into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
}

/// NULL → `None`; an object → its text; anything else in a row column is corruption.
fn raw_object(v: Option<JsonbText>) -> Result<Option<RawRow>, Error> {
    v.map(|JsonbText(text)| RawRow::from_json(text).map_err(Error::from)).transpose()
}

pub(crate) async fn load_page(client: &Client, schema: &str, q: &PageQuery) -> Result<Vec<PageItem>, Error> {
    let after = q.after.unwrap_or(Position::new(Lsn::ZERO, 0));
    // (0/0, -1): strictly before every row.
    let after_seq: i64 = if q.after.is_none() { -1 } else { i64::from(after.seq) };
    let after_lsn = PgLsn::from(after.lsn.0);
    let upto = PgLsn::from(q.upto.0);
    let limit = i64::from(q.limit);
    let tables: &Vec<String> = &q.tables;
    let rows = match &q.stitch {
        None => {
            let sql = page_sql(schema, false).replace("$7", "$5");
            let params: [&(dyn ToSql + Sync); 5] = [&after_lsn, &after_seq, &upto, &limit, &tables];
            client.query(&sql, &params).await?
        }
        Some(st) => {
            let sql = page_sql(schema, true);
            let h = st.snapshot_watermark.to_string();
            let params: [&(dyn ToSql + Sync); 7] = [&after_lsn, &after_seq, &upto, &limit, &h, &st.snapshot, &tables];
            client.query(&sql, &params).await?
        }
    };
    let mut out = Vec::with_capacity(rows.len());
    // Rows of one transaction share their commit time: format it once per transaction, not
    // once per row (it showed up in catch-up profiles).
    let mut last_time: Option<(SystemTime, String)> = None;
    for r in rows {
        let lsn = Lsn(u64::from(r.try_get::<_, PgLsn>(0)?));
        let seq = u32::try_from(r.try_get::<_, i32>(1)?).map_err(|_| Error::CorruptHistory("negative seq"))?;
        let position = Position::new(lsn, seq);
        let xid: String = r.try_get(2)?;
        let time: SystemTime = r.try_get(3)?;
        let table: String = r.try_get(4)?;
        let op: i8 = r.try_get(5)?;
        let key = raw_object(r.try_get(6)?)?;
        let old_key = raw_object(r.try_get(7)?)?;
        let data = raw_object(r.try_get(8)?)?;
        let unchanged: Option<Vec<String>> = r.try_get(9)?;
        let old = raw_object(r.try_get(10)?)?;
        let wire = match op as u8 {
            b'I' => WireOp::Insert { seq, table, key: key.unwrap_or_default(), row: data.unwrap_or_default() },
            b'U' => WireOp::Update {
                seq,
                table,
                key: key.unwrap_or_default(),
                old_key,
                row: data.unwrap_or_default(),
                unchanged: unchanged.unwrap_or_default(),
            },
            b'D' => WireOp::Delete { seq, table, key: key.unwrap_or_default() },
            b'T' => WireOp::Truncate { seq, table },
            b'S' => {
                out.push(PageItem::SchemaChanged { table });
                continue;
            }
            other => return Err(Error::UnknownOp(other as char)),
        };
        out.push(PageItem::Row(
            HistoryRow {
                position,
                xid,
                commit_time: match &last_time {
                    Some((t, text)) if *t == time => text.clone(),
                    _ => {
                        let text = pg_time::to_rfc3339(system_time_to_pg_micros(time));
                        last_time = Some((time, text.clone()));
                        text
                    }
                },
                op: Some(wire),
            },
            old,
        ));
    }
    Ok(out)
}

/// Retention: delete transactions older than `max_age`, but never at or above the position of
/// a live (registered, not expired) client of the current generation. Returns the new horizon
/// (the lowest commit LSN still retained), if it moved.
pub(crate) async fn apply_retention(
    client: &mut Client,
    schema: &str,
    generation: u64,
    max_age: Duration,
    client_ttl: Duration,
) -> Result<Option<Lsn>, Error> {
    let s = ident(schema);
    let cutoff = SystemTime::now() - max_age;
    let ttl_cutoff = SystemTime::now() - client_ttl;
    let tx = client.transaction().await?;
    // First retained transaction: the oldest one at or after the cutoff time...
    let by_age: Option<PgLsn> = tx
        .query_opt(
            &format!(
                "SELECT commit_lsn FROM {s}.change_history WHERE commit_time >= $1 ORDER BY commit_lsn, seq LIMIT 1"
            ),
            &[&cutoff],
        )
        .await?
        .map(|r| r.get(0));
    let by_age = match by_age {
        Some(l) => l,
        // Nothing younger than the cutoff: everything up to the watermark may go.
        None => {
            let w: PgLsn =
                tx.query_one(&format!("SELECT watermark FROM {s}.replication_state WHERE id = 1"), &[]).await?.get(0);
            PgLsn::from(u64::from(w) + 1)
        }
    };
    // ...but not past what live clients still need.
    let gen = generation as i64;
    let by_clients: Option<PgLsn> = tx
        .query_one(
            &format!(
                "SELECT min(pos_lsn) FROM {s}.clients WHERE generation = $1 AND pos_lsn IS NOT NULL AND last_seen >= $2"
            ),
            &[&gen, &ttl_cutoff],
        )
        .await?
        .get(0);
    let horizon = match by_clients {
        Some(c) if u64::from(c) < u64::from(by_age) => c,
        _ => by_age,
    };
    let old: PgLsn =
        tx.query_one(&format!("SELECT horizon FROM {s}.replication_state WHERE id = 1"), &[]).await?.get(0);
    if u64::from(horizon) <= u64::from(old) {
        tx.commit().await?;
        return Ok(None);
    }
    tx.execute(&format!("DELETE FROM {s}.change_history WHERE commit_lsn < $1"), &[&horizon]).await?;
    // Never lowered, even by an instance that read an older state.
    tx.execute(&format!("UPDATE {s}.replication_state SET horizon = $1 WHERE id = 1 AND horizon < $1"), &[&horizon])
        .await?;
    tx.commit().await?;
    Ok(Some(Lsn(u64::from(horizon))))
}

/// Expire client registrations not seen within `ttl`.
pub(crate) async fn expire_clients(client: &Client, schema: &str, ttl: Duration) -> Result<u64, Error> {
    let cutoff = SystemTime::now() - ttl;
    Ok(client.execute(&format!("DELETE FROM {}.clients WHERE last_seen < $1", ident(schema)), &[&cutoff]).await?)
}

#[cfg(test)]
#[path = "../tests/support/pg.rs"]
mod pg_cluster;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db;

    /// Several instances starting at once on a fresh database (a docker-compose `up`) all run
    /// the schema setup. `CREATE … IF NOT EXISTS` is not safe against a concurrent creator
    /// (both see "absent", the second fails on the catalog's unique index), so every instance
    /// but one failed its start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_setting_the_schema_up_at_once_all_succeed() {
        let pg = pg_cluster::PgCluster::start();
        let cfg = db::parse_url(&pg.url()).unwrap();
        for round in 0..3 {
            let schema = format!("moai_sync_race_{round}");
            let mut setups = Vec::new();
            for _ in 0..6 {
                let (cfg, schema) = (cfg.clone(), schema.clone());
                setups.push(tokio::spawn(async move {
                    let client = db::connect(&cfg).await.unwrap();
                    client.batch_execute(&db::schema_ddl(&schema)).await
                }));
            }
            for setup in setups {
                if let Err(e) = setup.await.unwrap() {
                    panic!("round {round}: a concurrent schema setup failed: {e:?}");
                }
            }
        }
    }

    /// Catch-up after a large ingest, before autovacuum analyzed the table: every page must
    /// walk the primary key from the position and stop after `limit` rows. Any other plan
    /// (bitmap scan of the whole backlog + top-N sort, or seq scan + sort) makes each page cost
    /// as much as the entire backlog. Checked for both page statements, on the connection
    /// settings the service uses for pages.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn page_queries_walk_the_key_in_order_on_an_unanalyzed_backlog() {
        let pg = pg_cluster::PgCluster::start();
        let cfg = db::parse_url(&pg.url()).unwrap();
        let setup = db::connect(&cfg).await.unwrap();
        setup.batch_execute(&db::schema_ddl("moai_sync")).await.unwrap();
        // 100k rows, 100 per transaction, as a bulk ingest leaves them: no ANALYZE.
        setup
            .batch_execute(
                "INSERT INTO moai_sync.change_history (commit_lsn, seq, xid, commit_time, tbl, op, pk, data) \
                 SELECT ('0/' || to_hex(16777216 + (i / 100) * 256))::pg_lsn, i % 100, (1000 + i / 100)::text::xid8, \
                        now(), 'public.items', 'I', jsonb_build_object('id', i), jsonb_build_object('id', i, 'v', 'x') \
                 FROM generate_series(0, 99999) AS i",
            )
            .await
            .unwrap();
        let pages = db::connect(&db::for_page_queries(cfg)).await.unwrap();
        let after = PgLsn::from(16_777_216u64 + 10 * 256);
        let upto = PgLsn::from(u64::MAX >> 1);
        let tables = vec!["public.items".to_string()];
        let (seq, limit) = (5i64, 5000i64);
        let plans = [
            {
                let sql = format!("EXPLAIN {}", page_sql("moai_sync", false).replace("$7", "$5"));
                let params: [&(dyn ToSql + Sync); 5] = [&after, &seq, &upto, &limit, &tables];
                pages.query(&sql, &params).await.unwrap()
            },
            {
                let sql = format!("EXPLAIN {}", page_sql("moai_sync", true));
                let (h, snap) = ("0/1000A00".to_string(), "1005:1010:1007".to_string());
                let params: [&(dyn ToSql + Sync); 7] = [&after, &seq, &upto, &limit, &h, &snap, &tables];
                pages.query(&sql, &params).await.unwrap()
            },
        ];
        for rows in plans {
            let plan: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
            let plan = plan.join("\n");
            assert!(plan.contains("Index Scan using change_history_pkey"), "page plan:\n{plan}");
            assert!(
                !plan.contains("Sort") && !plan.contains("Bitmap") && !plan.contains("Seq Scan"),
                "page plan:\n{plan}"
            );
        }
    }

    #[test]
    fn pg_time_round_trip() {
        for us in [0i64, 1, -1, 123_456_789_012, -987_654_321] {
            assert_eq!(system_time_to_pg_micros(pg_micros_to_system_time(us)), us);
        }
    }
}
