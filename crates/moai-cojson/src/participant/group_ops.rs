//! Writing groups: creating one (with its first read key and group sealer), adding a member
//! (role, then the current key sealed to it), removing one (rotating the read key first), and
//! extending one into a parent group (the link, then the key revealed to the parent)
//! (docs/protocols/cojson-participant.md §6, §8).
//!
//! Each operation checks first that the transactions it is about to write will be valid for
//! clients (our role, the target's role, an available read key) and refuses otherwise.

use super::cipher::encrypt_key_secret;
use super::clock::iso_timestamp;
use super::encoding::{tx_nonce_material, KeyId, KeySecret};
use super::entropy::{random_ephemeral, random_key, random_uniqueness, Entropy};
use super::error::ParticipantError;
use super::node::{parse_id, Participant};
use super::seal::{group_sealer_from_read_key, group_sealer_value, seal_for_group, seal_key_secret};
use crate::crypto::SealerId;
use crate::group_roles::Role;
use crate::ids::{AgentId, CoId};
use serde_json::{json, Value};

/// Roles that can read a group's content (`canRead`).
fn can_read(role: Option<&str>) -> bool {
    matches!(role, Some("admin" | "manager" | "writer" | "reader" | "adminInvite" | "writerInvite" | "readerInvite"))
}

impl Participant {
    /// Creates a group with this account as admin (§6); returns its ID. Draws 12 bytes of
    /// uniqueness, then the read key (32 + 12).
    pub fn create_group(
        &mut self,
        name: Option<&str>,
        now: u64,
        entropy: &mut dyn Entropy,
    ) -> Result<String, ParticipantError> {
        let created_at = iso_timestamp(now)?;
        let uniqueness = random_uniqueness(entropy)?;
        let (key_id, key) = random_key(entropy)?;
        let account = self.identity.account().clone();
        let meta = match name {
            Some(n) if !n.is_empty() => json!({"name": n}),
            _ => Value::Null,
        };
        let header = json!({
            "type": "comap",
            "ruleset": {"type": "group", "initialAdmin": account.as_str()},
            "meta": meta,
            "createdAt": created_at,
            "uniqueness": uniqueness,
        });
        let group = self.create(header)?;
        self.append_set(&group, account.as_str(), json!("admin"), now)?;
        let own_sealer = self.identity.secret().sealer.sealer_id();
        self.reveal_key(&group, account.as_str(), &own_sealer, (&key_id, &key), now)?;
        self.append_set(&group, "readKey", json!(key_id.as_str()), now)?;
        let (_, sealer) = group_sealer_from_read_key(&key);
        self.append_set(&group, "groupSealer", json!(group_sealer_value(key_id.as_str(), &sealer)), now)?;
        Ok(group.to_string())
    }

    /// `set key_<id>_for_<member> = seal(…)`, sealed for the index this transaction takes (§7).
    pub(super) fn reveal_key(
        &mut self,
        group: &CoId,
        member: &str,
        member_sealer: &SealerId,
        (key_id, key): (&KeyId, &KeySecret),
        now: u64,
    ) -> Result<(), ParticipantError> {
        let material = tx_nonce_material(group, self.session_for(group), self.next_index(group));
        let sealed = seal_key_secret(key, &self.identity.secret().sealer, member_sealer, &material);
        self.append_set(group, &format!("{key_id}_for_{member}"), Value::String(sealed), now)
    }

    /// The sealer of a member: an agent's own, or the agent of an account held here.
    fn member_sealer(&self, member: &str) -> Result<SealerId, ParticipantError> {
        let agent = if let Ok(agent) = AgentId::parse(member) {
            agent
        } else if CoId::parse(member).is_ok() {
            self.reader().agent_of(member).ok_or_else(|| ParticipantError::UnknownAccount(member.to_string()))?
        } else {
            return Err(ParticipantError::BadMember(member.to_string()));
        };
        SealerId::parse(agent.sealer_part()).map_err(|_| ParticipantError::UnknownAccount(member.to_string()))
    }

    /// Our role in `group` and the group's current read key, or the refusal.
    fn admin_context(&self, group: &CoId) -> Result<(Role, Option<(KeyId, KeySecret)>), ParticipantError> {
        let reader = self.reader();
        let view = self.group_view(&reader, group)?;
        if view.is_account() {
            return Err(ParticipantError::NotPermitted("accounts have no members to manage".into()));
        }
        let role = view.role_at(&reader.groups, reader.account.as_str(), None);
        match role {
            Some(r @ (Role::Admin | Role::Manager)) => Ok((r, reader.current_read_key(group))),
            _ => Err(ParticipantError::NotPermitted(format!(
                "this account is {role:?} of {group}, not admin or manager"
            ))),
        }
    }

    /// `addMember` (§8): `member` is an account ID, an agent ID or `everyone`. Adding a member
    /// with the role it has writes nothing.
    pub fn add_member(&mut self, group: &str, member: &str, role: Role, now: u64) -> Result<(), ParticipantError> {
        let group = parse_id(group)?;
        let (my_role, current_key) = self.admin_context(&group)?;
        let previous = {
            let reader = self.reader();
            let view = self.group_view(&reader, &group)?;
            view.get_str(member).map(str::to_string)
        };
        if previous.as_deref() == Some(role.as_str()) {
            return Ok(());
        }
        if member == "everyone" {
            match role {
                Role::Reader | Role::Writer => {}
                Role::WriteOnly => return Err(ParticipantError::Unsupported("writeOnly members")),
                _ => return Err(ParticipantError::NotPermitted(format!("everyone cannot be {}", role.as_str()))),
            }
            let (key_id, key) = current_key.ok_or_else(|| ParticipantError::NoReadKey(group.to_string()))?;
            self.append_set(&group, "everyone", json!(role.as_str()), now)?;
            return self.append_set(&group, &format!("{key_id}_for_everyone"), json!(key.to_z_string()), now);
        }
        match role {
            Role::Admin | Role::Manager | Role::Writer | Role::Reader => {}
            Role::WriteOnly => return Err(ParticipantError::Unsupported("writeOnly members")),
            _ => return Err(ParticipantError::Unsupported("invites")),
        }
        let sealer = self.member_sealer(member)?;
        let me = self.identity.account_id();
        if previous.as_deref() == Some("admin") && member != me {
            return Err(ParticipantError::NotPermitted("admins cannot demote other admins".into()));
        }
        if my_role == Role::Manager && role == Role::Admin {
            return Err(ParticipantError::NotPermitted("managers cannot make admins".into()));
        }
        let (key_id, key) = current_key.ok_or_else(|| ParticipantError::NoReadKey(group.to_string()))?;
        let write_keys = self.write_only_keys(&group)?;
        self.append_set(&group, member, json!(role.as_str()), now)?;
        self.reveal_key(&group, member, &sealer, (&key_id, &key), now)?;
        for (id, secret) in write_keys {
            self.reveal_key(&group, member, &sealer, (&id, &secret), now)?;
        }
        Ok(())
    }

    /// The `writeKeyFor_*` keys of a group whose secrets we hold (revealed to new members).
    fn write_only_keys(&self, group: &CoId) -> Result<Vec<(KeyId, KeySecret)>, ParticipantError> {
        let reader = self.reader();
        let view = self.group_view(&reader, group)?;
        let ids: Vec<String> = view
            .value()
            .iter()
            .filter(|(k, _)| k.starts_with("writeKeyFor_"))
            .filter_map(|(_, v)| v.as_str().map(str::to_string))
            .collect();
        Ok(ids.iter().filter_map(|id| Some((KeyId::parse(id).ok()?, reader.read_key(group, id)?))).collect())
    }

    /// `removeMember` (§8): as admin or manager, rotates the read key (unless `everyone` can
    /// read), then sets the member `revoked`. Leaving (removing ourselves) needs no role. Draws
    /// the new key (32 + 12 bytes) when it rotates.
    pub fn remove_member(
        &mut self,
        group: &str,
        member: &str,
        now: u64,
        entropy: &mut dyn Entropy,
    ) -> Result<(), ParticipantError> {
        let group = parse_id(group)?;
        let me = self.identity.account_id().to_string();
        if member == me {
            self.group_view(&self.reader(), &group)?;
            return self.append_set(&group, member, json!("revoked"), now);
        }
        // Admin or manager: either may revoke anyone but an admin.
        let (_, current_key) = self.admin_context(&group)?;
        let (readers, parents, everyone_reads, previous) = {
            let reader = self.reader();
            let view = self.group_view(&reader, &group)?;
            let members: Vec<String> = view.member_keys().filter(|k| *k != member).map(str::to_string).collect();
            if members.iter().any(|m| matches!(view.get_str(m), Some("writeOnly" | "writeOnlyInvite"))) {
                return Err(ParticipantError::Unsupported("rotating a group with writeOnly members"));
            }
            let readers: Vec<String> = members.into_iter().filter(|m| can_read(view.get_str(m))).collect();
            let parents: Vec<CoId> = view.parents_at(None).into_iter().map(|(p, _)| p.clone()).collect();
            let parent_keys: Vec<(KeyId, KeySecret)> =
                parents.iter().filter_map(|p| reader.current_read_key(p)).collect();
            (readers, parent_keys, can_read(view.get_str("everyone")), view.get_str(member).map(str::to_string))
        };
        if previous.as_deref() == Some("admin") {
            return Err(ParticipantError::NotPermitted("admins cannot revoke other admins".into()));
        }
        if !everyone_reads {
            let (old_id, old) = current_key.ok_or_else(|| ParticipantError::NoReadKey(group.to_string()))?;
            let sealers = readers
                .iter()
                .map(|r| Ok((r.clone(), self.member_sealer(r)?)))
                .collect::<Result<Vec<_>, ParticipantError>>()?;
            let (new_id, new) = random_key(entropy)?;
            for (reader, sealer) in &sealers {
                self.reveal_key(&group, reader, sealer, (&new_id, &new), now)?;
            }
            let old_for_new = encrypt_key_secret((&old_id, &old), (&new_id, &new));
            self.append_set(&group, &format!("{old_id}_for_{new_id}"), Value::String(old_for_new), now)?;
            self.append_set(&group, "readKey", json!(new_id.as_str()), now)?;
            let (_, sealer) = group_sealer_from_read_key(&new);
            self.append_set(&group, "groupSealer", json!(group_sealer_value(new_id.as_str(), &sealer)), now)?;
            // The new key under each parent's key, so parent members keep reading.
            for (parent_id, parent_key) in &parents {
                let child_for_parent = encrypt_key_secret((&new_id, &new), (parent_id, parent_key));
                self.append_set(&group, &format!("{new_id}_for_{parent_id}"), Value::String(child_for_parent), now)?;
            }
        }
        self.append_set(&group, member, json!("revoked"), now)
    }

    /// `extend` (§8): as admin of `child`, links `parent` so its members count in `child` with
    /// `role` (`None`: `inherit`, stored as `"extend"`: each keeps the parent role), then reveals
    /// the child's current read key (and `writeKeyFor_*` keys) to the parent: under the parent's
    /// current read key when this account is a member of the parent, else sealed to the
    /// parent's group sealer. Extending into itself or into one of its own descendants writes
    /// nothing, as in cojson. Draws 32 bytes per sealed reveal.
    pub fn extend(
        &mut self,
        child: &str,
        parent: &str,
        role: Option<Role>,
        now: u64,
        entropy: &mut dyn Entropy,
    ) -> Result<(), ParticipantError> {
        let child = parse_id(child)?;
        let parent = parse_id(parent)?;
        let value = match role {
            None => "extend",
            Some(r @ (Role::Admin | Role::Manager | Role::Writer | Role::Reader)) => r.as_str(),
            Some(Role::WriteOnly) => return Err(ParticipantError::Unsupported("writeOnly parent links")),
            Some(r) => return Err(ParticipantError::NotPermitted(format!("a parent link cannot be {}", r.as_str()))),
        };
        if self.is_descendant_or_self(&parent, &child)? {
            return Ok(());
        }
        enum Reveal {
            UnderParentKey(KeyId, KeySecret),
            ToGroupSealer(SealerId),
        }
        let (keys, how) = {
            let reader = self.reader();
            let view = self.group_view(&reader, &child)?;
            if view.is_account() {
                return Err(ParticipantError::NotPermitted("an account cannot be extended".into()));
            }
            let me = reader.account.as_str();
            if view.role_at(&reader.groups, me, None) != Some(Role::Admin) {
                return Err(ParticipantError::NotPermitted(format!("this account is not admin of {child}")));
            }
            let current =
                reader.current_read_key(&child).ok_or_else(|| ParticipantError::NoReadKey(child.to_string()))?;
            let parent_view = self.group_view(&reader, &parent)?;
            if parent_view.is_account() {
                return Err(ParticipantError::NotAGroup(parent.to_string()));
            }
            let member = matches!(
                parent_view.role_at(&reader.groups, me, None),
                Some(Role::Admin | Role::Manager | Role::Writer | Role::Reader | Role::WriteOnly)
            );
            let how = if member {
                let (id, key) =
                    reader.current_read_key(&parent).ok_or_else(|| ParticipantError::NoReadKey(parent.to_string()))?;
                Reveal::UnderParentKey(id, key)
            } else {
                // `extractSealerID`: the part after `@` (older values are the sealer alone).
                let sealer = parent_view
                    .get_str("groupSealer")
                    .map(|v| v.rsplit('@').next().unwrap_or(v))
                    .and_then(|v| SealerId::parse(v).ok())
                    .ok_or(ParticipantError::Unsupported(
                        "extending into a group this account is not in and that has no group sealer",
                    ))?;
                Reveal::ToGroupSealer(sealer)
            };
            (current, how)
        };
        let mut reveals = vec![keys];
        reveals.extend(self.write_only_keys(&child)?);
        self.append_set(&child, &format!("parent_{parent}"), json!(value), now)?;
        for (id, secret) in reveals {
            match &how {
                Reveal::UnderParentKey(parent_id, parent_key) => {
                    let encrypted = encrypt_key_secret((&id, &secret), (parent_id, parent_key));
                    self.append_set(&child, &format!("{id}_for_{parent_id}"), Value::String(encrypted), now)?;
                }
                Reveal::ToGroupSealer(sealer) => {
                    let material = tx_nonce_material(&child, self.session_for(&child), self.next_index(&child));
                    let ephemeral = random_ephemeral(entropy)?;
                    let sealed = seal_for_group(&json!(secret.to_z_string()), sealer, &material, &ephemeral);
                    self.append_set(&child, &format!("{id}_sealedFor_{sealer}"), Value::String(sealed), now)?;
                }
            }
        }
        Ok(())
    }

    /// Whether `group` is `ancestor` or reaches it through parent links (groups held here; at
    /// most 64 steps).
    fn is_descendant_or_self(&self, group: &CoId, ancestor: &CoId) -> Result<bool, ParticipantError> {
        let reader = self.reader();
        let mut todo = vec![group.clone()];
        let mut seen = std::collections::HashSet::new();
        while let Some(g) = todo.pop() {
            if g == *ancestor {
                return Ok(true);
            }
            if !seen.insert(g.clone()) || seen.len() > 64 {
                continue;
            }
            if let Ok(view) = self.group_view(&reader, &g) {
                todo.extend(view.parents_at(None).into_iter().map(|(p, _)| p.clone()));
            }
        }
        Ok(false)
    }
}
