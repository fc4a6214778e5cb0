//! Writing CoMaps owned by a group: creating one (optionally with initial values in one
//! transaction), `set` and `del`, trusting or private with the owner group's *current* read key
//! (docs/protocols/cojson-participant.md §4, §6); and appending to a CoList owned by a group, the
//! same way (§6.3).
//!
//! A write is refused when this account could not write the map at the `madeAt` it would get:
//! clients would ignore it (§9.4).

use super::changes::{append_at_end_op, del_op, set_op};
use super::clock::iso_timestamp;
use super::entropy::{random_uniqueness, Entropy};
use super::error::ParticipantError;
use super::node::{parse_id, Participant, WritePrivacy};
use super::session_writer::TxPrivacy;
use crate::header::Ruleset;
use crate::ids::CoId;
use serde_json::{json, Value};

impl Participant {
    /// Creates a CoMap owned by `group` (§6) with `meta` in its header and, if `init` is not
    /// empty, one transaction setting every entry; returns its ID. Draws 12 bytes of uniqueness.
    pub fn create_map(
        &mut self,
        group: &str,
        meta: Option<Value>,
        init: &[(&str, Value)],
        privacy: WritePrivacy,
        now: u64,
        entropy: &mut dyn Entropy,
    ) -> Result<String, ParticipantError> {
        let group = parse_id(group)?;
        self.check_can_write(&group, &group, now)?;
        let created_at = iso_timestamp(now)?;
        let uniqueness = random_uniqueness(entropy)?;
        let header = json!({
            "type": "comap",
            "ruleset": {"type": "ownedByGroup", "group": group.as_str()},
            "meta": meta.unwrap_or(Value::Null),
            "createdAt": created_at,
            "uniqueness": uniqueness,
        });
        let map = self.create(header)?;
        if !init.is_empty() {
            let ops: Vec<Value> = init.iter().map(|(k, v)| set_op(k, v.clone())).collect();
            self.write_map(&map, &ops, privacy, now)?;
        }
        Ok(map.to_string())
    }

    /// `set key = value` in a CoMap.
    pub fn set(
        &mut self,
        map: &str,
        key: &str,
        value: Value,
        privacy: WritePrivacy,
        now: u64,
    ) -> Result<(), ParticipantError> {
        self.write_map(&parse_id(map)?, &[set_op(key, value)], privacy, now)
    }

    /// `del key` in a CoMap.
    pub fn delete(&mut self, map: &str, key: &str, privacy: WritePrivacy, now: u64) -> Result<(), ParticipantError> {
        self.write_map(&parse_id(map)?, &[del_op(key)], privacy, now)
    }

    /// Appends `value` at the end of a CoList (`{"op":"pre","before":"end"}`; see
    /// [`append_at_end_op`]), trusting or private with the owner group's current read key.
    pub fn append_to_list(
        &mut self,
        list: &str,
        value: Value,
        privacy: WritePrivacy,
        now: u64,
    ) -> Result<(), ParticipantError> {
        let list = parse_id(list)?;
        let owner = self.owner_of(&list, "colist").map_err(|_| ParticipantError::NotAList(list.to_string()))?;
        self.write_owned(&list, owner, &[append_at_end_op(value)], privacy, now)
    }

    /// The owner group of a CoValue of type `kind` held here.
    fn owner_of(&self, id: &CoId, kind: &str) -> Result<CoId, ParticipantError> {
        let state = self.state(id)?;
        match &state.header.ruleset {
            Ruleset::OwnedByGroup { group, .. } if state.header.kind == kind => Ok(group.clone()),
            _ => Err(ParticipantError::NotAMap(id.to_string())),
        }
    }

    /// Refuses unless this account may write a CoValue owned by `owner` at the stamp `target`
    /// would get now; returns that stamp.
    fn check_can_write(&self, target: &CoId, owner: &CoId, now: u64) -> Result<u64, ParticipantError> {
        let made_at = self.stamp(target, Some(owner), now);
        let reader = self.reader();
        let view = self.group_view(&reader, owner)?;
        if !view.may_write(&reader.groups, reader.account.as_str(), made_at) {
            return Err(ParticipantError::NotPermitted(format!("this account cannot write in {owner} at {made_at}")));
        }
        Ok(made_at)
    }

    fn write_map(
        &mut self,
        map: &CoId,
        ops: &[Value],
        privacy: WritePrivacy,
        now: u64,
    ) -> Result<(), ParticipantError> {
        let owner = self.owner_of(map, "comap")?;
        self.write_owned(map, owner, ops, privacy, now)
    }

    /// Writes `ops` in one transaction into a CoValue owned by `owner`.
    fn write_owned(
        &mut self,
        map: &CoId,
        owner: CoId,
        ops: &[Value],
        privacy: WritePrivacy,
        now: u64,
    ) -> Result<(), ParticipantError> {
        let made_at = self.check_can_write(map, &owner, now)?;
        match privacy {
            WritePrivacy::Trusting => self.append(map, ops, TxPrivacy::Trusting, made_at).map(|_| ()),
            WritePrivacy::Private => {
                let (key_id, key) = self
                    .reader()
                    .current_read_key(&owner)
                    .ok_or_else(|| ParticipantError::NoReadKey(owner.to_string()))?;
                self.append(map, ops, TxPrivacy::Private { key_id: &key_id, key: &key }, made_at).map(|_| ())
            }
        }
    }
}
