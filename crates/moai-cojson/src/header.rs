//! CoValue headers: validation and the facts the relay reads from them.
//!
//! A header is kept as the `Value` it arrived as (cojson stores and forwards
//! `JSON.stringify` of the received object), and its ID is the short hash of
//! its canonical JSON. Validation rejects what cojson-core 0.20.19 would not
//! accept, so that the relay never stores or serves a CoValue that honest
//! clients will refuse:
//! * `type` a string, `meta` an object or `null` (present), `createdAt`
//!   absent, `null` or a string;
//! * `ruleset` exactly one of `group {initialAdmin}`, `ownedByGroup {group,
//!   restrictDeletion?}`, `unsafeAllowAll`;
//! * `uniqueness` present: string, boolean, `null`, an integer (`i64`), or an
//!   object of non-empty keys to strings;
//! * no other top-level or ruleset fields: cojson-core hashes its typed
//!   struct, which would drop them, while the creator's `idforHeader` hashes
//!   them — such a header can never match its ID on a real client.

use crate::canonical_json::{js_number_to_string, js_number_value};
use crate::crypto::id_for_header;
use crate::ids::{AgentId, CoId};
use serde_json::{Map, Value};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    #[error("header is not an object")]
    NotAnObject,
    #[error("header field `{0}` is invalid")]
    BadField(&'static str),
    #[error("header has unexpected field `{0}`")]
    UnexpectedField(String),
    #[error("header hashes to {computed}, not to the claimed id {claimed}")]
    IdMismatch { claimed: CoId, computed: CoId },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ruleset {
    /// Groups and accounts. `initial_admin` is an account or agent ID string.
    Group {
        initial_admin: String,
    },
    OwnedByGroup {
        group: CoId,
        restrict_deletion: Option<bool>,
    },
    UnsafeAllowAll,
}

/// A header whose shape and ID have been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub id: CoId,
    /// `comap`, `colist`, `costream`, `coplaintext`.
    pub kind: String,
    pub ruleset: Ruleset,
    /// The header exactly as received.
    pub raw: Value,
}

/// Priorities of content messages (`getPriorityFromHeader`).
pub const PRIORITY_HIGH: u8 = 0;
pub const PRIORITY_MEDIUM: u8 = 3;
pub const PRIORITY_LOW: u8 = 6;

fn check_fields(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), HeaderError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(HeaderError::UnexpectedField(k.clone())),
        None => Ok(()),
    }
}

fn ruleset(v: Option<&Value>) -> Result<Ruleset, HeaderError> {
    let obj = v.and_then(Value::as_object).ok_or(HeaderError::BadField("ruleset"))?;
    match obj.get("type").and_then(Value::as_str) {
        Some("group") => {
            check_fields(obj, &["type", "initialAdmin"])?;
            let admin = obj.get("initialAdmin").and_then(Value::as_str).ok_or(HeaderError::BadField("ruleset"))?;
            Ok(Ruleset::Group { initial_admin: admin.to_string() })
        }
        Some("ownedByGroup") => {
            check_fields(obj, &["type", "group", "restrictDeletion"])?;
            let group = obj
                .get("group")
                .and_then(Value::as_str)
                .and_then(|g| CoId::parse(g).ok())
                .ok_or(HeaderError::BadField("ruleset"))?;
            let restrict_deletion = match obj.get("restrictDeletion") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => return Err(HeaderError::BadField("ruleset")),
            };
            Ok(Ruleset::OwnedByGroup { group, restrict_deletion })
        }
        Some("unsafeAllowAll") => {
            check_fields(obj, &["type"])?;
            Ok(Ruleset::UnsafeAllowAll)
        }
        _ => Err(HeaderError::BadField("ruleset")),
    }
}

fn uniqueness_ok(v: &Value) -> bool {
    match v {
        Value::String(_) | Value::Bool(_) | Value::Null => true,
        // cojson-core parses JS's re-serialization as i64: integral and, as
        // JS prints it, plain digits within range.
        Value::Number(n) => js_number_to_string(js_number_value(n)).parse::<i64>().is_ok(),
        Value::Object(map) => map.iter().all(|(k, v)| !k.is_empty() && v.is_string()),
        Value::Array(_) => false,
    }
}

impl Header {
    /// Validates `raw` as the header of CoValue `id`.
    pub fn validate(id: &CoId, raw: &Value) -> Result<Header, HeaderError> {
        let obj = raw.as_object().ok_or(HeaderError::NotAnObject)?;
        check_fields(obj, &["type", "ruleset", "meta", "createdAt", "uniqueness"])?;
        let kind = obj.get("type").and_then(Value::as_str).ok_or(HeaderError::BadField("type"))?.to_string();
        let ruleset = ruleset(obj.get("ruleset"))?;
        if !matches!(obj.get("meta"), Some(Value::Object(_) | Value::Null)) {
            return Err(HeaderError::BadField("meta"));
        }
        if !matches!(obj.get("createdAt"), None | Some(Value::Null | Value::String(_))) {
            return Err(HeaderError::BadField("createdAt"));
        }
        if !obj.get("uniqueness").is_some_and(uniqueness_ok) {
            return Err(HeaderError::BadField("uniqueness"));
        }
        let computed = id_for_header(raw);
        if &computed != id {
            return Err(HeaderError::IdMismatch { claimed: id.clone(), computed });
        }
        Ok(Header { id: id.clone(), kind, ruleset, raw: raw.clone() })
    }

    fn meta(&self) -> Option<&Map<String, Value>> {
        self.raw.get("meta").and_then(Value::as_object)
    }

    /// `ruleset.type == "group"`: groups and accounts (not deletable).
    pub fn is_group_or_account(&self) -> bool {
        matches!(self.ruleset, Ruleset::Group { .. })
    }

    /// The agent that signs for this account, if this is an account header
    /// (`resolveAccountAgent`: `comap`, group ruleset, `meta.type ==
    /// "account"`, and `initialAdmin` an agent ID).
    pub fn account_agent(&self) -> Option<AgentId> {
        let Ruleset::Group { initial_admin } = &self.ruleset else { return None };
        let is_account =
            self.kind == "comap" && self.meta().and_then(|m| m.get("type")).and_then(Value::as_str) == Some("account");
        if !is_account {
            return None;
        }
        AgentId::parse(initial_admin).ok()
    }

    /// `getPriorityFromHeader`.
    pub fn priority(&self) -> u8 {
        if self.is_group_or_account() {
            return PRIORITY_HIGH;
        }
        let binary = self.kind == "costream"
            && self.meta().and_then(|m| m.get("type")).and_then(Value::as_str) == Some("binary");
        if binary {
            PRIORITY_LOW
        } else {
            PRIORITY_MEDIUM
        }
    }

    /// The group owning this CoValue, if any.
    pub fn owner_group(&self) -> Option<&CoId> {
        match &self.ruleset {
            Ruleset::OwnedByGroup { group, .. } => Some(group),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map_header() -> Value {
        json!({"type":"comap","ruleset":{"type":"ownedByGroup","group":"co_zAAAAAAAAAAAAAAAAAAAAAAAAAA"},
               "meta":null,"createdAt":"2025-01-01T00:00:00.000Z","uniqueness":"zVectorUniqueness1"})
    }

    #[test]
    fn valid_header_and_id_mismatch() {
        let id = CoId::parse("co_z5rocg8RW7QBwyCTr5qKwiZUSyv").unwrap();
        let h = Header::validate(&id, &map_header()).unwrap();
        assert_eq!(h.priority(), PRIORITY_MEDIUM);
        assert_eq!(h.owner_group().map(CoId::as_str), Some("co_zAAAAAAAAAAAAAAAAAAAAAAAAAA"));
        assert_eq!(h.account_agent(), None);
        let other = CoId::parse("co_z59T41o3v8kmKGicaPBnmYXFskT").unwrap();
        assert!(matches!(Header::validate(&other, &map_header()), Err(HeaderError::IdMismatch { .. })));
    }

    #[test]
    fn shape_rules() {
        let check = |mutate: &dyn Fn(&mut Map<String, Value>)| {
            let mut v = map_header();
            mutate(v.as_object_mut().unwrap());
            let id = id_for_header(&v); // so only shape can fail
            Header::validate(&id, &v)
        };
        assert!(check(&|_| {}).is_ok());
        assert!(check(&|o| {
            o.remove("createdAt");
        })
        .is_ok());
        assert!(check(&|o| {
            o.insert("uniqueness".into(), json!(42));
        })
        .is_ok());
        assert!(check(&|o| {
            o.insert("uniqueness".into(), json!({"a":"b"}));
        })
        .is_ok());
        assert!(check(&|o| {
            o.insert("uniqueness".into(), json!(1.5));
        })
        .is_err());
        assert!(check(&|o| {
            o.insert("uniqueness".into(), json!({"":"b"}));
        })
        .is_err());
        assert!(check(&|o| {
            o.insert("uniqueness".into(), json!({"a":1}));
        })
        .is_err());
        assert!(check(&|o| {
            o.remove("uniqueness");
        })
        .is_err());
        assert!(check(&|o| {
            o.remove("meta");
        })
        .is_err());
        assert!(check(&|o| {
            o.insert("extra".into(), json!(1));
        })
        .is_err());
        assert!(check(&|o| {
            o.insert("ruleset".into(), json!({"type":"nope"}));
        })
        .is_err());
        assert!(check(&|o| {
            o.insert("ruleset".into(), json!({"type":"unsafeAllowAll","x":1}));
        })
        .is_err());
        assert!(check(&|o| {
            o.insert("createdAt".into(), json!(5));
        })
        .is_err());
    }

    #[test]
    fn account_and_binary_detection() {
        let agent = "sealer_zA/signer_zB";
        let acct = json!({"type":"comap","ruleset":{"type":"group","initialAdmin":agent},"meta":{"type":"account"},"createdAt":null,"uniqueness":null});
        let h = Header::validate(&id_for_header(&acct), &acct).unwrap();
        assert_eq!(h.account_agent().map(|a| a.as_str().to_string()), Some(agent.to_string()));
        assert_eq!(h.priority(), PRIORITY_HIGH);
        let group =
            json!({"type":"comap","ruleset":{"type":"group","initialAdmin":agent},"meta":null,"uniqueness":"z1"});
        let g = Header::validate(&id_for_header(&group), &group).unwrap();
        assert!(g.is_group_or_account());
        assert_eq!(g.account_agent(), None);
        let bin =
            json!({"type":"costream","ruleset":{"type":"unsafeAllowAll"},"meta":{"type":"binary"},"uniqueness":false});
        assert_eq!(Header::validate(&id_for_header(&bin), &bin).unwrap().priority(), PRIORITY_LOW);
    }
}
