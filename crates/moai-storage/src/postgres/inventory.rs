//! [`Inventory`] on PostgreSQL: one statement per page on a pooled connection (one statement
//! reads one snapshot).

use async_trait::async_trait;

use super::PostgresStorage;
use crate::{Inventory, StorageError};

/// A document exists while it has a snapshot or journal entries. Both inputs can come sorted from
/// their indexes (`doc_snapshots`' primary key, `doc_updates_by_doc`), so a page need not read
/// the whole journal. Order and `>` use the column's collation: pages are consistent within this
/// database, which is all the contract promises.
const DOCS: &str = "SELECT doc FROM (SELECT doc FROM {s}.doc_snapshots {where} \
                    UNION ALL SELECT doc FROM {s}.doc_updates {where}) d \
                    GROUP BY doc ORDER BY doc LIMIT $1";
const COVALUES: &str = "SELECT id FROM {s}.cojson_covalues {where} ORDER BY id LIMIT $1";

impl PostgresStorage {
    async fn page(
        &self,
        template: &str,
        column: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let filter = if after.is_some() { format!("WHERE {column} > $2") } else { String::new() };
        // The schema name was validated at open (lower-case letters, digits, `_`).
        let schema = format!("\"{}\"", self.inner.shared.sql.schema);
        let sql = template.replace("{where}", &filter).replace("{s}", &schema);
        let (_open, conn) = self.connection().await?;
        let query = async {
            let stmt = conn.prepare_cached(&sql).await?;
            let rows = match after {
                Some(after) => conn.query(&stmt, &[&limit, &after]).await?,
                None => conn.query(&stmt, &[&limit]).await?,
            };
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        };
        let result = tokio::time::timeout(self.timeout(), query).await;
        self.finish(conn, result)
    }
}

#[async_trait]
impl Inventory for PostgresStorage {
    async fn list_docs(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError> {
        self.page(DOCS, "doc", after, limit).await
    }

    async fn list_covalues(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError> {
        self.page(COVALUES, "id", after, limit).await
    }
}
