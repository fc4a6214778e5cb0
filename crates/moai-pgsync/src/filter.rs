//! Shape filtering of one change for one session, sans-IO (the rules for clients:
//! docs/pgsync-protocol.md §10 item 5).
//!
//! Why: a shape with a row predicate (the client's `where`, the token's table predicate, or
//! both ANDed) must never tell a client anything about a row outside it, not even its key.
//! Deciding on the new row alone leaked: a delete carried only the key (so every delete of the
//! table went out), and an update whose new row did not match became a delete of its key even
//! when the client never had the row. The decision therefore looks at the row *before* the
//! change too, as ElectricSQL does: moai sets `REPLICA IDENTITY FULL` on the published tables
//! (see `replicator::ensure_publication`), so pgoutput carries the whole old row for UPDATE and
//! DELETE, and `change_history.old` stores it, so catch-up decides exactly as live streaming.
//!
//! For the shapes of the client on the op's table, "before" = some shape matched the old row,
//! "after" = some shape matches the new row:
//!
//! | op     | before | after | sent                                   |
//! |--------|--------|-------|----------------------------------------|
//! | insert |   -    | yes   | insert                                 |
//! | update | yes    | yes   | update                                 |
//! | update | no     | yes   | insert (move-in; update if a patch)    |
//! | update | yes    | no    | delete of the old key (move-out)       |
//! | update | no     | no    | nothing                                |
//! | delete | yes    | -     | delete                                 |
//! | delete | no     | -     | nothing                                |
//!
//! Fail closed: a predicate that cannot be evaluated (`Truth::Unknown`: a column is missing)
//! counts as not matching. Without the old row (the table's replica identity is not FULL, e.g.
//! someone changed it back) the key stands in for it, so a predicate on key columns still
//! decides; any other predicate is unknown, so deletes and move-outs are not sent at all and a
//! warning is logged once: the client may keep a row that left its shape, but it never learns
//! the key of a row it was not allowed to see. Unchanged-TOAST columns missing from the new row
//! are taken from the old row for the evaluation.
//!
//! A shape without predicate and column list takes every op of its table as is (the hot path of
//! catch-up); a shape without predicate always counts as matching, so predicate-less shapes
//! behave as before.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::protocol::{Row, WireOp};
use crate::raw_row::RawRow;
use crate::shape::{Shape, Truth};

static WARNED_NO_OLD_ROW: AtomicBool = AtomicBool::new(false);

fn warn_no_old_row(table: &str) {
    if !WARNED_NO_OLD_ROW.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            table,
            "pgsync: a delete or update of {table} came without its old row (REPLICA IDENTITY is not FULL): \
             shapes with a row predicate cannot tell whether the client had the row, so no delete is sent \
             (the client may keep a row that left its shape); run ALTER TABLE {table} REPLICA IDENTITY FULL \
             (moai does it at start) and restart moai. Logged once."
        );
    }
}

/// `op` as the client with `shapes` must see it, or `None`. `old` is the complete row before
/// an update or delete (`change_history.old`), when the table's replica identity is FULL.
pub fn filter_op(shapes: &[(String, Shape)], op: WireOp, old: Option<&RawRow>) -> Option<WireOp> {
    let table = match &op {
        WireOp::Insert { table, .. }
        | WireOp::Update { table, .. }
        | WireOp::Delete { table, .. }
        | WireOp::Truncate { table, .. } => table,
    };
    let on_table: Vec<&Shape> = shapes.iter().map(|(_, s)| s).filter(|s| &s.table == table).collect();
    if on_table.is_empty() {
        return None;
    }
    // A whole-table shape (no predicate, no projection) takes every op as is: no evaluation,
    // no copies. This is the common case and the hot path of catch-up.
    if on_table.iter().any(|s| s.conditions.is_empty() && s.columns.is_none()) {
        return Some(op);
    }
    // Unknown is not a match: fail closed.
    let matching =
        |row: &Row| -> Vec<&Shape> { on_table.iter().copied().filter(|s| s.evaluate(row) == Truth::True).collect() };
    let project = |shapes: &[&Shape], row: Row| -> RawRow {
        if shapes.iter().any(|s| s.columns.is_none()) {
            return RawRow::from_row(&row);
        }
        let kept: Row = row
            .into_iter()
            .filter(|(k, _)| shapes.iter().any(|s| s.columns.as_ref().is_some_and(|c| c.contains(k))))
            .collect();
        RawRow::from_row(&kept)
    };
    // Only a predicate needs the old row; without it the key is the best (partial) old image.
    let has_predicate = on_table.iter().any(|s| !s.conditions.is_empty());
    let old = old.map(RawRow::to_row);
    match op {
        WireOp::Insert { seq, table, key, row } => {
            let row = row.to_row();
            let p = matching(&row);
            (!p.is_empty()).then(|| WireOp::Insert { seq, row: project(&p, row), table, key })
        }
        WireOp::Update { seq, table, key, old_key, row, unchanged } => {
            let before_key = old_key.clone().unwrap_or_else(|| key.clone());
            let old_image = old.clone().unwrap_or_else(|| before_key.to_row());
            let was_in = !matching(&old_image).is_empty();
            let row = row.to_row();
            // Unchanged-TOAST columns are absent from the patch: evaluate with the old values.
            let mut full = row.clone();
            if let Some(old) = &old {
                for (k, v) in old {
                    full.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            let p = matching(&full);
            if p.is_empty() {
                if was_in {
                    return Some(WireOp::Delete { seq, table, key: before_key });
                }
                if old.is_none() && has_predicate {
                    warn_no_old_row(&table);
                }
                return None;
            }
            // Moved in: the client does not have the row, so it gets all of it as an insert.
            // Without the old row "before" is unknown and the op stays an update (upsert).
            if old.is_some() && !was_in && unchanged.iter().all(|c| full.contains_key(c)) {
                return Some(WireOp::Insert { seq, row: project(&p, full), table, key });
            }
            let unchanged = unchanged
                .into_iter()
                .filter(|c| p.iter().any(|s| s.columns.as_ref().is_none_or(|l| l.contains(c))))
                .collect();
            let row = project(&p, row);
            Some(WireOp::Update { seq, table, key, old_key, row, unchanged })
        }
        WireOp::Delete { seq, table, key } => {
            let old_image = old.clone().unwrap_or_else(|| key.to_row());
            if !matching(&old_image).is_empty() {
                return Some(WireOp::Delete { seq, table, key });
            }
            if old.is_none() && has_predicate {
                warn_no_old_row(&table);
            }
            None
        }
        t @ WireOp::Truncate { .. } => Some(t),
    }
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
