//! [`Inventory`] on SQLite: one statement per page on the read pool (one statement reads one
//! consistent snapshot of the database).

use async_trait::async_trait;
use rusqlite::params_from_iter;

use super::SqliteStorage;
use crate::{Inventory, StorageError};

/// A document exists while it has a snapshot or journal entries; both tables are indexed by
/// `doc`, and SQLite compares TEXT in byte order (BINARY), so pages follow byte order.
const DOCS: &str = "SELECT doc FROM doc_snapshots {where} UNION SELECT doc FROM doc_updates {where} \
                    ORDER BY doc LIMIT ?1";
const COVALUES: &str = "SELECT id FROM cojson_covalues {where} ORDER BY id LIMIT ?1";

impl SqliteStorage {
    async fn page(
        &self,
        template: &'static str,
        column: &'static str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.map(str::to_owned);
        let filter = if after.is_some() { format!("WHERE {column} > ?2") } else { String::new() };
        let sql = template.replace("{where}", &filter);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let args: Vec<rusqlite::types::Value> =
                std::iter::once(limit.into()).chain(after.map(Into::into)).collect();
            let ids = stmt.query_map(params_from_iter(args), |r| r.get::<_, String>(0))?.collect();
            ids
        })
        .await
    }
}

#[async_trait]
impl Inventory for SqliteStorage {
    async fn list_docs(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError> {
        self.page(DOCS, "doc", after, limit).await
    }

    async fn list_covalues(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError> {
        self.page(COVALUES, "id", after, limit).await
    }
}
