//! Relation (and type) metadata announced by the stream, needed to interpret tuples.
//!
//! pgoutput sends a Relation message before the first change to a table in a session and again
//! whenever its definition changes; tuples carry only positional values. The cache also reports
//! *how* a relation changed, because a changed column list is our DDL signal
//! (docs/pgsync-protocol.md §10 item 4).

use std::collections::HashMap;

use super::message::{Oid, Relation, TypeInfo};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelationUpdate {
    /// First time this session sees the relation (normal after every (re)connect).
    New,
    /// Re-announced with an identical definition (Postgres does this after cache invalidations).
    Unchanged,
    /// Columns, names, key or identity differ from the cached definition.
    Changed { previous: Relation },
}

#[derive(Debug, Default, Clone)]
pub struct RelationCache {
    relations: HashMap<Oid, Relation>,
    types: HashMap<Oid, TypeInfo>,
}

impl RelationCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&mut self, relation: Relation) -> RelationUpdate {
        let mut relation = relation;
        // The stream xid is transport detail; it must not make an identical definition look new.
        relation.xid = None;
        match self.relations.insert(relation.id, relation) {
            None => RelationUpdate::New,
            Some(previous) if Some(&previous) == self.relations.get(&previous.id) => RelationUpdate::Unchanged,
            Some(previous) => RelationUpdate::Changed { previous },
        }
    }

    pub fn apply_type(&mut self, mut info: TypeInfo) {
        info.xid = None;
        self.types.insert(info.id, info);
    }

    pub fn get(&self, id: Oid) -> Option<&Relation> {
        self.relations.get(&id)
    }

    /// Name of a non-builtin type announced by a Type message (enums, domains, ...).
    pub fn type_info(&self, id: Oid) -> Option<&TypeInfo> {
        self.types.get(&id)
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::message::{RelationColumn, ReplicaIdentity};

    fn rel(cols: &[&str]) -> Relation {
        Relation {
            xid: None,
            id: 42,
            namespace: "public".into(),
            name: "todos".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .enumerate()
                .map(|(i, c)| RelationColumn { is_key: i == 0, name: (*c).into(), type_oid: 23, type_modifier: -1 })
                .collect(),
        }
    }

    #[test]
    fn reports_new_unchanged_and_changed() {
        let mut cache = RelationCache::new();
        assert_eq!(cache.apply(rel(&["id", "title"])), RelationUpdate::New);
        let mut streamed = rel(&["id", "title"]);
        streamed.xid = Some(99);
        assert_eq!(cache.apply(streamed), RelationUpdate::Unchanged);
        match cache.apply(rel(&["id", "title", "done"])) {
            RelationUpdate::Changed { previous } => assert_eq!(previous.columns.len(), 2),
            other => panic!("expected Changed, got {other:?}"),
        }
        assert_eq!(cache.get(42).map(|r| r.columns.len()), Some(3));
        assert_eq!(cache.len(), 1);
        assert!(cache.get(7).is_none());
    }
}
