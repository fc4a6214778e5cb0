//! A CoMap's value as one account reads it: only transactions whose author could write at their
//! `madeAt`, private ones decrypted with the key they name (skipped when that key cannot be had),
//! and per key the op that sorts last (docs/protocols/cojson-participant.md §9.4, §9.5).

use super::changes::{map_op, parse_changes, MapOp};
use super::cipher::xsalsa20;
use super::encoding::{decode_u, nonce, tx_nonce_material, ENCRYPTED_PREFIX};
use super::group_view::{ordered_transactions, trusting_changes, OrderedTx};
use super::read_key::Reader;
use crate::covalue::CoValueState;
use crate::header::Ruleset;
use crate::ids::CoId;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Why a CoMap could not be read at all (individual transactions that cannot be read are
/// skipped instead, as clients do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapReadError {
    /// The owner group is not held here (or is not a group).
    OwnerUnavailable(CoId),
    NotAComap,
}

/// The changes of a private transaction, decrypted with the owner group's key it names.
fn private_changes(reader: &Reader<'_>, owner: &CoId, co: &CoId, t: &OrderedTx<'_>) -> Option<Vec<Value>> {
    let key = reader.read_key(owner, t.tx.get("keyUsed")?.as_str()?)?;
    let mut bytes = decode_u(t.tx.get("encryptedChanges")?.as_str()?, ENCRYPTED_PREFIX).ok()?;
    xsalsa20(&key.0, &nonce(&tx_nonce_material(co, t.session, t.index)), &mut bytes);
    parse_changes(&bytes)
}

/// The current value of a CoMap (or, for a group or account, of its valid sets).
pub fn read_value(reader: &Reader<'_>, state: &CoValueState) -> Result<Map<String, Value>, MapReadError> {
    let co = &state.header.id;
    let owner = match &state.header.ruleset {
        Ruleset::Group { .. } => {
            let view = reader.groups.view(co).ok_or(MapReadError::OwnerUnavailable(co.clone()))?;
            return Ok(view.value());
        }
        Ruleset::OwnedByGroup { group, .. } => {
            Some(reader.groups.view(group).ok_or_else(|| MapReadError::OwnerUnavailable(group.clone()))?)
        }
        Ruleset::UnsafeAllowAll => None,
    };
    if state.header.kind != "comap" {
        return Err(MapReadError::NotAComap);
    }
    let mut order: Vec<String> = Vec::new();
    let mut latest: HashMap<String, Option<Value>> = HashMap::new();
    for t in ordered_transactions(state) {
        let changes = match &owner {
            Some(owner) => {
                if !owner.may_write(&reader.groups, t.session.author_str(), t.made_at) {
                    continue;
                }
                match t.tx.get("privacy").and_then(Value::as_str) {
                    Some("private") => private_changes(reader, &owner.id, co, &t),
                    _ => trusting_changes(t.tx),
                }
            }
            None => trusting_changes(t.tx),
        };
        for change in changes.iter().flatten() {
            let (key, value) = match map_op(change) {
                Some(MapOp::Set { key, value }) => (key, Some(value)),
                Some(MapOp::Del { key }) => (key, None),
                None => continue,
            };
            if !latest.contains_key(&key) {
                order.push(key.clone());
            }
            latest.insert(key, value);
        }
    }
    Ok(order.into_iter().filter_map(|k| latest.remove(&k).flatten().map(|v| (k, v))).collect())
}
