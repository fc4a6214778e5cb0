//! Every statement of the backend, written once with its schema name filled in at open, so the
//! tables can live in any schema the operator picks without `search_path` tricks (which a
//! connection pooler in front of PostgreSQL may not carry over).

use crate::StorageError;

pub(super) struct Sql {
    /// The schema name, as given (validated: lower-case letters, digits, `_`).
    pub schema: String,

    // DocJournal
    pub insert_update: String,
    pub load_snapshot: String,
    pub load_updates: String,
    pub insert_first_snapshot: String,
    pub replace_snapshot: String,
    pub delete_folded: String,
    pub delete_snapshot: String,
    pub probe: String,

    // CoValueStore
    pub lock_covalue: String,
    pub insert_covalue: String,
    pub session_counts: String,
    pub mark_deleted: String,
    pub upsert_session: String,
    pub insert_transactions: String,
    pub upsert_signature: String,
    pub find_sessions: String,
    pub erase_transactions: String,
    pub erase_signatures: String,
    pub erase_sessions: String,
    pub load_covalue: String,
    pub load_sessions: String,
    pub load_transactions: String,
    pub load_signatures: String,
    pub known_states: String,
}

impl Sql {
    pub(super) fn new(schema: &str) -> Result<Self, StorageError> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !schema.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(StorageError::PostgresConfig(format!(
                "schema name {schema:?}: use 1 to 63 lower-case letters, digits and '_', not starting with a digit"
            )));
        }
        let q = |text: &str| text.replace("{s}", &format!("\"{schema}\""));
        Ok(Self {
            schema: schema.to_owned(),
            insert_update: q("INSERT INTO {s}.doc_updates (doc, data) VALUES ($1, $2) RETURNING seq"),
            load_snapshot: q("SELECT snapshot, version FROM {s}.doc_snapshots WHERE doc = $1"),
            load_updates: q("SELECT seq, data FROM {s}.doc_updates WHERE doc = $1 ORDER BY seq"),
            // Conditional on there being no snapshot: a concurrent first compaction that commits
            // first makes this insert do nothing (it waits for that transaction's outcome).
            insert_first_snapshot: q("INSERT INTO {s}.doc_snapshots (doc, snapshot, version) VALUES ($1, $2, 1)
                 ON CONFLICT (doc) DO NOTHING RETURNING version"),
            // Conditional on the version the compaction started from. Under READ COMMITTED a
            // concurrent replace that commits first is re-checked against this WHERE, so exactly
            // one of two racing compactions matches.
            replace_snapshot: q("UPDATE {s}.doc_snapshots SET snapshot = $2, version = version + 1, updated_at = now()
                 WHERE doc = $1 AND version = $3 RETURNING version"),
            delete_folded: q("DELETE FROM {s}.doc_updates WHERE doc = $1 AND seq = ANY($2)"),
            delete_snapshot: q("DELETE FROM {s}.doc_snapshots WHERE doc = $1 AND version = $2"),
            probe: q("UPDATE {s}.schema_migrations SET applied_at = applied_at WHERE version = 1"),

            lock_covalue: q("SELECT row_id FROM {s}.cojson_covalues WHERE id = $1 FOR UPDATE"),
            insert_covalue: q("INSERT INTO {s}.cojson_covalues (id, header) VALUES ($1, $2)
                 ON CONFLICT (id) DO NOTHING RETURNING row_id"),
            session_counts: q("SELECT session_id, last_idx FROM {s}.cojson_sessions
                 WHERE covalue = $1 AND session_id = ANY($2)"),
            mark_deleted: q("UPDATE {s}.cojson_covalues SET deleted = true WHERE row_id = $1"),
            upsert_session: q("INSERT INTO {s}.cojson_sessions AS cs
                     (covalue, session_id, last_idx, last_signature, bytes_since_last_signature)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (covalue, session_id) DO UPDATE SET
                     last_idx = excluded.last_idx,
                     last_signature = excluded.last_signature,
                     bytes_since_last_signature = CASE WHEN $6 THEN excluded.bytes_since_last_signature
                         ELSE cs.bytes_since_last_signature + excluded.bytes_since_last_signature END
                 RETURNING row_id"),
            insert_transactions: q("INSERT INTO {s}.cojson_transactions (ses, idx, tx)
                 SELECT $1, $2::bigint + n - 1, tx FROM unnest($3::text[]) WITH ORDINALITY AS t(tx, n)"),
            upsert_signature: q("INSERT INTO {s}.cojson_signature_after (ses, tx_count, signature) VALUES ($1, $2, $3)
                 ON CONFLICT (ses, tx_count) DO UPDATE SET signature = excluded.signature"),
            find_sessions: q("SELECT row_id FROM {s}.cojson_sessions WHERE covalue = $1 AND session_id = ANY($2)"),
            erase_transactions: q("DELETE FROM {s}.cojson_transactions WHERE ses = ANY($1)"),
            erase_signatures: q("DELETE FROM {s}.cojson_signature_after WHERE ses = ANY($1)"),
            erase_sessions: q("DELETE FROM {s}.cojson_sessions WHERE row_id = ANY($1)"),
            load_covalue: q("SELECT row_id, header, deleted FROM {s}.cojson_covalues WHERE id = $1"),
            load_sessions: q("SELECT row_id, session_id, last_signature FROM {s}.cojson_sessions
                 WHERE covalue = $1 ORDER BY row_id"),
            load_transactions: q("SELECT t.ses, t.tx FROM {s}.cojson_transactions t
                 JOIN {s}.cojson_sessions s ON s.row_id = t.ses WHERE s.covalue = $1 ORDER BY t.ses, t.idx"),
            load_signatures: q("SELECT g.ses, g.tx_count, g.signature FROM {s}.cojson_signature_after g
                 JOIN {s}.cojson_sessions s ON s.row_id = g.ses WHERE s.covalue = $1 ORDER BY g.ses, g.tx_count"),
            known_states: q("SELECT c.id, c.deleted, s.session_id, s.last_idx FROM {s}.cojson_covalues c
                 LEFT JOIN {s}.cojson_sessions s ON s.covalue = c.row_id
                 WHERE c.id = ANY($1) ORDER BY c.row_id, s.row_id"),
        })
    }

    /// `text` with `{s}` replaced by the quoted schema name.
    pub(super) fn qualify(&self, text: &str) -> String {
        text.replace("{s}", &format!("\"{}\"", self.schema))
    }
}
