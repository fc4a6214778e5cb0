//! What the catalog says about a synced table: its columns (with their types and how their
//! values map to JSON) and its key. Read when a hello names the table and inside each snapshot.

use crate::db::qualified_ident;
use crate::error::Error;
use crate::pgoutput::RelationCache;
use crate::value_mapping;

pub(crate) struct ColumnInfo {
    pub name: String,
    pub type_name: String,
    /// How the column's values map to JSON (domains by their base type, arrays by element).
    pub mapping: value_mapping::Mapping,
}

/// The table's columns in attribute order (dropped ones left out).
pub(crate) async fn table_columns<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    table: &str,
) -> Result<Vec<ColumnInfo>, Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, t.typnamespace::regnamespace::text || '.' || t.typname::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&qualified_ident(table)],
        )
        .await?;
    let empty = RelationCache::new();
    let mut cols = Vec::with_capacity(rows.len());
    for r in &rows {
        let oid: u32 = r.get(1);
        let builtin = value_mapping::type_name(oid, &empty);
        let type_name = if builtin.starts_with("oid:") { r.get(2) } else { builtin };
        let mapping = match value_mapping::builtin_mapping(oid) {
            Some(m) => m,
            None => value_mapping::resolve(client, oid).await?,
        };
        cols.push(ColumnInfo { name: r.get(0), type_name, mapping });
    }
    Ok(cols)
}

/// Primary key columns (else the replica identity index), in index order.
pub(crate) async fn table_key<C: tokio_postgres::GenericClient>(client: &C, table: &str) -> Result<Vec<String>, Error> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indexrelid = ( \
               SELECT i2.indexrelid FROM pg_index i2 WHERE i2.indrelid = $1::text::regclass \
               AND (i2.indisprimary OR i2.indisreplident) ORDER BY i2.indisprimary DESC LIMIT 1) \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&qualified_ident(table)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
