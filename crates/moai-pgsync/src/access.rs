//! `Access`: what a session's token lets it read from the change feed.
//!
//! Why: without it, any valid token opened every published table, whole. Multi-tenant apps
//! need the server, not the client, to decide which rows a user gets. A token may therefore
//! name the tables it opens, each optionally with a row predicate in the shape syntax
//! ([`crate::shape`]). The predicate is ANDed into every shape the client asks for on that
//! table, so it bounds the snapshot, the live changes and the moves out of the shape alike,
//! whatever `where` the client sends. The edge builds an `Access` from the verified token.

use std::collections::BTreeMap;

use crate::protocol::{Hello, ShapeRequest};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// `None`: every published table, whole. `Some`: only these tables (`schema.table`), each
    /// with an optional row predicate.
    tables: Option<BTreeMap<String, Option<String>>>,
}

impl Access {
    /// Every published table (open servers, tokens without a `tables` claim).
    pub fn all() -> Access {
        Access { tables: None }
    }

    /// Only `tables`; a `Some(predicate)` limits the rows of that table.
    pub fn tables(tables: BTreeMap<String, Option<String>>) -> Access {
        Access { tables: Some(tables) }
    }

    /// The shape as the session must serve it, or why the token does not allow it.
    pub fn restrict(&self, req: &ShapeRequest) -> Result<ShapeRequest, String> {
        let Some(tables) = &self.tables else { return Ok(req.clone()) };
        let Some(forced) = tables.get(&req.table) else {
            return Err(format!("shape {}: the token does not open table {}", req.id, req.table));
        };
        let mut out = req.clone();
        if let Some(forced) = forced.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
            out.where_ = Some(match req.where_.as_deref().map(str::trim).filter(|w| !w.is_empty()) {
                // The shape syntax is a conjunction only, so no parentheses are needed.
                Some(own) => format!("{own} AND {forced}"),
                None => forced.to_owned(),
            });
        }
        Ok(out)
    }

    /// [`Self::restrict`] for every shape of a hello.
    pub fn restrict_hello(&self, mut hello: Hello) -> Result<Hello, String> {
        hello.shapes = hello.shapes.iter().map(|s| self.restrict(s)).collect::<Result<_, _>>()?;
        Ok(hello)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Shape;
    use serde_json::json;

    fn req(table: &str, where_: Option<&str>) -> ShapeRequest {
        ShapeRequest { id: "s".into(), table: table.into(), columns: None, where_: where_.map(str::to_owned) }
    }

    fn row(v: serde_json::Value) -> crate::protocol::Row {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn no_claim_opens_everything_unchanged() {
        let r = req("public.todos", Some("done = false"));
        assert_eq!(Access::all().restrict(&r).unwrap(), r);
    }

    #[test]
    fn only_named_tables_open() {
        let a = Access::tables(BTreeMap::from([("public.todos".to_string(), None)]));
        assert_eq!(a.restrict(&req("public.todos", None)).unwrap(), req("public.todos", None));
        let e = a.restrict(&req("public.secrets", None)).unwrap_err();
        assert!(e.contains("public.secrets"), "{e}");
        let none = Access::tables(BTreeMap::new());
        assert!(none.restrict(&req("public.todos", None)).is_err());
    }

    #[test]
    fn the_token_predicate_bounds_every_shape() {
        let a = Access::tables(BTreeMap::from([("public.todos".to_string(), Some("owner = 'u1'".to_string()))]));
        let whole = Shape::from_request(&a.restrict(&req("public.todos", None)).unwrap()).unwrap();
        let own = Shape::from_request(&a.restrict(&req("public.todos", Some("done = false"))).unwrap()).unwrap();
        // A client asking for someone else's rows gets nothing of them.
        let theirs = Shape::from_request(&a.restrict(&req("public.todos", Some("owner = 'u2'"))).unwrap()).unwrap();
        let mine = row(json!({"owner": "u1", "done": false}));
        let other = row(json!({"owner": "u2", "done": false}));
        use crate::shape::Truth;
        assert_eq!(whole.evaluate(&mine), Truth::True);
        assert_eq!(whole.evaluate(&other), Truth::False);
        assert_eq!(own.evaluate(&mine), Truth::True);
        assert_eq!(own.evaluate(&other), Truth::False);
        assert_eq!(theirs.evaluate(&mine), Truth::False);
        assert_eq!(theirs.evaluate(&other), Truth::False);
    }
}
