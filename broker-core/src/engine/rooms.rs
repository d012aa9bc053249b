//! Rooms and their event types, the write side: the stored Room record (keyed by name, with the
//! incarnation id that everything inside the Room is keyed by), the approval policy kept beside
//! it, the Room quotas, and event types with every schema version they ever had.

use serde::{Deserialize, Serialize};

use super::Tables;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventTypeName, Principal, RoomName};
use crate::model::{
    EventType, EventTypeSpec, NewRoom, PutEventTypeOutcome, Retention, Room, RoomPatch, RoomStatus,
};
use crate::storage::codec::{decode, encode};
use crate::storage::{RecordKind, RoomQuota};
use crate::subscription::RetryOverrides;

#[derive(Serialize, Deserialize)]
pub(super) struct RoomRecord {
    pub(super) id: u64,
    description: String,
    owner: Principal,
    pub(super) status: RoomStatus,
    pub(super) ordered: bool,
    pub(super) retention: Retention,
    pub(super) retry: RetryOverrides,
    created_at: Timestamp,
    updated_at: Timestamp,
}

/// A Room's counters: (next log offset, events stored, payload bytes stored).
pub(super) type RoomStats = (u64, u64, u64);

#[derive(Serialize, Deserialize)]
pub(super) struct TypeRecord {
    pub(super) description: String,
    pub(super) version: u32,
    pub(super) created_at: Timestamp,
    pub(super) updated_at: Timestamp,
}

#[derive(Serialize, Deserialize)]
pub(super) struct VersionRecord {
    /// The schema as compact JSON text (postcard cannot carry a `serde_json::Value`).
    pub(super) schema_json: String,
    pub(super) key_pointer: Option<String>,
    pub(super) created_at: Timestamp,
}

/// The key of a Room incarnation's policy record; the value is `b"approval"` when subscriptions
/// need approval. Kept out of `RoomRecord` so that stored Rooms keep their layout.
pub(super) fn policy_key(room_id: u64) -> String {
    room_id.to_string()
}

pub(super) const APPROVAL: &[u8] = b"approval";

pub(super) fn room_from(
    name: &str,
    r: RoomRecord,
    stats: (u64, u64, u64),
    subscription_approval: bool,
) -> Result<Room> {
    Ok(Room {
        subscription_approval,
        name: RoomName::new(name).map_err(|e| Error::Storage(format!("stored room name: {e}")))?,
        description: r.description,
        owner: r.owner,
        status: r.status,
        ordered: r.ordered,
        retention: r.retention,
        retry: r.retry,
        created_at: r.created_at,
        updated_at: r.updated_at,
        events_stored: stats.1,
        bytes_stored: stats.2,
    })
}

pub(super) fn parse_schema(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::Storage(format!("stored schema: {e}")))
}

pub(super) fn type_not_found(room: &RoomName, name: &EventTypeName) -> Error {
    Error::EventTypeNotFound {
        room: room.to_string(),
        event_type: name.to_string(),
    }
}

impl<'t> Tables<'t> {
    pub(super) fn room_record(&self, name: &RoomName) -> Result<RoomRecord> {
        match self.rooms.get(name.as_str())? {
            Some(g) => decode(&g),
            None => Err(Error::RoomNotFound {
                room: name.to_string(),
            }),
        }
    }

    pub(super) fn stats(&self, room_id: u64) -> Result<(u64, u64, u64)> {
        Ok(self.room_stats.get(room_id)?.unwrap_or_default())
    }

    fn store_room(&mut self, name: &RoomName, rec: &RoomRecord) -> Result<Room> {
        self.rooms.insert(name.as_str(), encode(rec)?.as_slice())?;
        let stats = self.stats(rec.id)?;
        let approval = self
            .records
            .get((RecordKind::RoomPolicy.as_str(), policy_key(rec.id).as_str()))?
            .is_some_and(|g| g == APPROVAL);
        room_from(name.as_str(), decode(&encode(rec)?)?, stats, approval)
    }

    fn set_approval(&mut self, room_id: u64, on: bool) -> Result<()> {
        let key = policy_key(room_id);
        if on {
            self.records
                .insert((RecordKind::RoomPolicy.as_str(), key.as_str()), APPROVAL)?;
        } else {
            self.records
                .remove((RecordKind::RoomPolicy.as_str(), key.as_str()))?;
        }
        Ok(())
    }

    /// Counts the Rooms: (active or disabled, pending, pending owned by `owner`).
    fn room_counts(&self, owner: &Principal) -> Result<(u64, u64, u64)> {
        let (mut active, mut pending, mut mine) = (0, 0, 0);
        for r in self.rooms.iter()? {
            let (_, v) = r?;
            let rec: RoomRecord = decode(&v)?;
            if rec.status == RoomStatus::Pending {
                pending += 1;
                if rec.owner == *owner {
                    mine += 1;
                }
            } else {
                active += 1;
            }
        }
        Ok((active, pending, mine))
    }

    pub(super) fn create_room(
        &mut self,
        now: Timestamp,
        room: NewRoom,
        quota: RoomQuota,
    ) -> Result<Room> {
        if self.rooms.get(room.name.as_str())?.is_some() {
            return Err(Error::RoomExists {
                room: room.name.to_string(),
            });
        }
        let (active, pending, mine) = self.room_counts(&room.owner)?;
        if room.approved {
            if active >= quota.rooms_max as u64 {
                return Err(Error::limit(
                    "rooms_max",
                    quota.rooms_max as u64,
                    active + 1,
                ));
            }
        } else {
            if mine >= quota.pending_per_owner_max as u64 {
                return Err(Error::limit(
                    "pending_rooms_per_application_max",
                    quota.pending_per_owner_max as u64,
                    mine + 1,
                ));
            }
            if pending >= quota.pending_max as u64 {
                return Err(Error::limit(
                    "pending_rooms_max",
                    quota.pending_max as u64,
                    pending + 1,
                ));
            }
        }
        let id = self.meta.get("next_room_id")?.unwrap_or(1);
        self.meta.insert("next_room_id", id + 1)?;
        self.room_stats.insert(id, (0, 0, 0))?;
        let rec = RoomRecord {
            id,
            description: room.description,
            owner: room.owner,
            status: if room.approved {
                RoomStatus::Active
            } else {
                RoomStatus::Pending
            },
            ordered: room.ordered,
            retention: room.retention,
            retry: room.retry,
            created_at: now,
            updated_at: now,
        };
        self.set_approval(id, room.subscription_approval)?;
        self.store_room(&room.name, &rec)
    }

    pub(super) fn update_room(
        &mut self,
        now: Timestamp,
        name: &RoomName,
        patch: RoomPatch,
    ) -> Result<Room> {
        let mut rec = self.room_record(name)?;
        if let Some(status) = patch.status {
            match (rec.status, status) {
                // Not even to disabled: a disabled Room counts as an active one, and could be
                // enabled again without an administrator's approval.
                (RoomStatus::Pending, _) => {
                    return Err(Error::invalid(
                        "status",
                        "a pending room changes status only by approval (or is deleted)",
                    ))
                }
                (_, RoomStatus::Pending) => {
                    return Err(Error::invalid(
                        "status",
                        "a room cannot be set back to pending",
                    ))
                }
                (_, s) => rec.status = s,
            }
        }
        if let Some(d) = patch.description {
            rec.description = d;
        }
        if let Some(o) = patch.ordered {
            rec.ordered = o;
        }
        if let Some(r) = patch.retention {
            rec.retention = r;
        }
        if let Some(r) = patch.retry {
            rec.retry = r;
        }
        if let Some(a) = patch.subscription_approval {
            self.set_approval(rec.id, a)?;
        }
        rec.updated_at = now;
        self.store_room(name, &rec)
    }

    pub(super) fn approve_room(
        &mut self,
        now: Timestamp,
        name: &RoomName,
        rooms_max: usize,
    ) -> Result<Room> {
        let mut rec = self.room_record(name)?;
        match rec.status {
            RoomStatus::Pending => {
                let (active, _, _) = self.room_counts(&rec.owner)?;
                if active >= rooms_max as u64 {
                    return Err(Error::limit("rooms_max", rooms_max as u64, active + 1));
                }
                rec.status = RoomStatus::Active;
                rec.updated_at = now;
                self.store_room(name, &rec)
            }
            RoomStatus::Active => self.store_room(name, &rec),
            RoomStatus::Disabled => Err(Error::RoomNotActive {
                room: name.to_string(),
                status: "disabled".into(),
            }),
        }
    }

    pub(super) fn delete_room(&mut self, name: &RoomName) -> Result<()> {
        let rec = self.room_record(name)?;
        self.rooms.remove(name.as_str())?;
        self.deleted_rooms.insert(rec.id, ())?;
        self.set_approval(rec.id, false)?;
        // Its subscriptions go with it: their queues point into the Room's log.
        self.delete_room_subscriptions(rec.id)?;
        self.seqs.forget_room(rec.id);
        Ok(())
    }

    pub(super) fn delete_event_type(
        &mut self,
        room: &RoomName,
        name: &EventTypeName,
    ) -> Result<()> {
        let rid = self.room_record(room)?.id;
        match self.event_types.remove((rid, name.as_str()))? {
            Some(_) => Ok(()),
            None => Err(type_not_found(room, name)),
        }
    }

    pub(super) fn put_event_type(
        &mut self,
        now: Timestamp,
        room: &RoomName,
        spec: EventTypeSpec,
        types_max: usize,
        versions_max: u32,
        create_only: bool,
    ) -> Result<PutEventTypeOutcome> {
        let room_rec = self.room_record(room)?;
        let rid = room_rec.id;
        let name = spec.name.as_str();
        let schema_json = spec.schema.to_string();
        let existing: Option<TypeRecord> = match self.event_types.get((rid, name))? {
            Some(g) => Some(decode(&g)?),
            None => None,
        };
        if create_only && existing.is_some() {
            return Err(Error::EventTypeExists {
                room: room.to_string(),
                event_type: name.to_string(),
            });
        }
        let (mut type_rec, created, new_version) = match existing {
            None => {
                let count = self.event_types.range((rid, "")..(rid + 1, ""))?.count();
                if count >= types_max {
                    return Err(Error::limit(
                        "event_types_per_room_max",
                        types_max as u64,
                        count as u64 + 1,
                    ));
                }
                // A type deleted earlier left its versions behind; numbering continues after
                // them so that a (type, version) pair never names two different schemas.
                let last = match self
                    .schemas
                    .range_rev((rid, name, 0)..=(rid, name, u32::MAX))?
                    .next()
                {
                    Some(item) => item?.0 .2,
                    None => 0,
                };
                if last >= versions_max {
                    return Err(Error::limit(
                        "schema_versions_max",
                        versions_max.into(),
                        u64::from(last) + 1,
                    ));
                }
                let rec = TypeRecord {
                    description: spec.description.clone(),
                    version: last + 1,
                    created_at: now,
                    updated_at: now,
                };
                (rec, true, true)
            }
            Some(mut rec) => {
                let current: VersionRecord = match self.schemas.get((rid, name, rec.version))? {
                    Some(g) => decode(&g)?,
                    None => {
                        return Err(Error::Storage(format!(
                            "missing schema version {} of {name}",
                            rec.version
                        )))
                    }
                };
                let changed =
                    current.schema_json != schema_json || current.key_pointer != spec.key_pointer;
                if changed {
                    if rec.version >= versions_max {
                        return Err(Error::limit(
                            "schema_versions_max",
                            versions_max.into(),
                            u64::from(rec.version) + 1,
                        ));
                    }
                    rec.version += 1;
                    rec.updated_at = now;
                }
                if rec.description != spec.description {
                    rec.description = spec.description.clone();
                    rec.updated_at = now;
                }
                (rec, false, changed)
            }
        };
        if new_version {
            let v = VersionRecord {
                schema_json,
                key_pointer: spec.key_pointer.clone(),
                created_at: now,
            };
            self.schemas
                .insert((rid, name, type_rec.version), encode(&v)?.as_slice())?;
        }
        type_rec.description = spec.description;
        self.event_types
            .insert((rid, name), encode(&type_rec)?.as_slice())?;
        let current: VersionRecord = match self.schemas.get((rid, name, type_rec.version))? {
            Some(g) => decode(&g)?,
            None => return Err(Error::Storage("schema version vanished".into())),
        };
        Ok(PutEventTypeOutcome {
            event_type: EventType {
                room: room.clone(),
                name: spec.name,
                description: type_rec.description,
                version: type_rec.version,
                schema: parse_schema(&current.schema_json)?,
                key_pointer: current.key_pointer,
                created_at: type_rec.created_at,
                updated_at: type_rec.updated_at,
            },
            created,
            new_version,
        })
    }
}
