//! The read side of Rooms, event types and events, each read over its own snapshot: the bodies of
//! the `Storage` reads (which `mod.rs` runs under `blocking`) and the walk of a Room's log that
//! every event listing shares (`scan_log`). Kept apart from the write side, which works on
//! `Tables` inside the writer's transaction.

use super::events::{decode_event, decode_event_header, event_from, EventRecord, ResponseRecord};
use super::records::RECORDS;
use super::rooms::{
    parse_schema, policy_key, room_from, type_not_found, RoomRecord, RoomStats, TypeRecord,
    VersionRecord, APPROVAL,
};
use super::spaces::{
    DELETED_ROOMS, EVENTS, EVENT_TYPES, RESPONSES, ROOMS, ROOM_LOG, ROOM_STATS, SCHEMAS,
};
use super::Engine;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventId, EventTypeName, Principal, RoomName};
use crate::model::{
    Event, EventFilter, EventType, EventTypeVersion, Page, Room, RoomStatus, StoredResponse,
};
use crate::storage::codec::decode;
use crate::storage::txn::Txn;
use crate::storage::{PublishTarget, RecordKind, Storage};

impl Engine {
    pub(super) fn room_id_of(&self, room: &RoomName) -> Result<u64> {
        self.require_room_id(room)
    }

    fn approval_read(&self, room_id: u64) -> Result<bool> {
        Ok(self
            .record_read(RecordKind::RoomPolicy, &policy_key(room_id))?
            .is_some_and(|v| v == APPROVAL))
    }

    /// [`Engine::approval_read`] within a read already open: a read never takes a second
    /// snapshot while it holds one (on a networked backend each holds a pooled connection, and
    /// readers each waiting for a second one could take them all).
    fn approval_in(txn: &Txn, room_id: u64) -> Result<bool> {
        Ok(txn
            .open_table(RECORDS)?
            .get((
                RecordKind::RoomPolicy.as_str(),
                policy_key(room_id).as_str(),
            ))?
            .is_some_and(|v| v == APPROVAL))
    }

    fn read_room(&self, name: &RoomName) -> Result<Option<(RoomRecord, RoomStats)>> {
        let txn = self.begin_read()?;
        let rooms = txn.open_table(ROOMS)?;
        let Some(rec) = rooms.get(name.as_str())? else {
            return Ok(None);
        };
        let rec: RoomRecord = decode(&rec)?;
        let stats = txn.open_table(ROOM_STATS)?.get(rec.id)?.unwrap_or_default();
        Ok(Some((rec, stats)))
    }

    pub(super) fn require_room_id(&self, name: &RoomName) -> Result<u64> {
        self.read_room(name)?
            .map(|(r, _)| r.id)
            .ok_or_else(|| Error::RoomNotFound {
                room: name.to_string(),
            })
    }

    /// The read of [`Storage::room`].
    pub(super) fn room_read(&self, name: &RoomName) -> Result<Option<Room>> {
        let Some((rec, stats)) = self.read_room(name)? else {
            return Ok(None);
        };
        let approval = self.approval_read(rec.id)?;
        room_from(name.as_str(), rec, stats, approval).map(Some)
    }

    /// The read of [`Storage::rooms`].
    pub(super) fn rooms_read(&self, after: Option<&RoomName>, limit: usize) -> Result<Vec<Room>> {
        let txn = self.begin_read()?;
        let rooms = txn.open_table(ROOMS)?;
        let stats = txn.open_table(ROOM_STATS)?;
        let start = after.map(RoomName::as_str).unwrap_or("");
        let mut out = Vec::new();
        for item in rooms.range(start..)? {
            let (k, v) = item?;
            if after.is_some_and(|a| a.as_str() == k) {
                continue;
            }
            if out.len() >= limit {
                break;
            }
            let rec: RoomRecord = decode(&v)?;
            let s = stats.get(rec.id)?.unwrap_or_default();
            let approval = Self::approval_in(&txn, rec.id)?;
            out.push(room_from(&k, rec, s, approval)?);
        }
        Ok(out)
    }

    /// The read of [`Storage::publish_target`].
    pub(super) fn publish_target_read(
        &self,
        room: &RoomName,
        event_type: &EventTypeName,
    ) -> Result<PublishTarget> {
        let txn = self.begin_read()?;
        let rooms = txn.open_table(ROOMS)?;
        let rec: RoomRecord = match rooms.get(room.as_str())? {
            Some(g) => decode(&g)?,
            None => {
                return Err(Error::RoomNotFound {
                    room: room.to_string(),
                })
            }
        };
        if rec.status != RoomStatus::Active {
            return Err(Error::RoomNotActive {
                room: room.to_string(),
                status: rec.status.as_str().into(),
            });
        }
        let types = txn.open_table(EVENT_TYPES)?;
        let t: TypeRecord = match types.get((rec.id, event_type.as_str()))? {
            Some(g) => decode(&g)?,
            None => return Err(type_not_found(room, event_type)),
        };
        let schemas = txn.open_table(SCHEMAS)?;
        let v: VersionRecord = match schemas.get((rec.id, event_type.as_str(), t.version))? {
            Some(g) => decode(&g)?,
            None => return Err(Error::Storage("missing current schema version".into())),
        };
        Ok(PublishTarget {
            room_id: rec.id,
            version: t.version,
            key_pointer: v.key_pointer,
        })
    }

    /// The read of [`Storage::event_type`].
    pub(super) fn event_type_read(
        &self,
        room: &RoomName,
        name: &EventTypeName,
    ) -> Result<EventType> {
        let rid = self.require_room_id(room)?;
        let txn = self.begin_read()?;
        let types = txn.open_table(EVENT_TYPES)?;
        let t: TypeRecord = match types.get((rid, name.as_str()))? {
            Some(g) => decode(&g)?,
            None => return Err(type_not_found(room, name)),
        };
        let v = self.event_type_version_in(&txn, rid, room, name, t.version)?;
        Ok(EventType {
            room: room.clone(),
            name: name.clone(),
            description: t.description,
            version: t.version,
            schema: v.schema,
            key_pointer: v.key_pointer,
            created_at: t.created_at,
            updated_at: t.updated_at,
        })
    }

    /// The read of [`Storage::event_types`].
    pub(super) fn event_types_read(&self, room: &RoomName) -> Result<Vec<EventType>> {
        let rid = self.require_room_id(room)?;
        let names: Vec<String> = {
            let txn = self.begin_read()?;
            let types = txn.open_table(EVENT_TYPES)?;
            types
                .range((rid, "")..(rid + 1, ""))?
                .map(|r| r.map(|(k, _)| k.1.to_string()))
                .collect::<std::result::Result<_, _>>()?
        };
        names
            .into_iter()
            .map(|n| {
                let name = EventTypeName::new(n)
                    .map_err(|e| Error::Storage(format!("stored type name: {e}")))?;
                self.event_type(room, &name)
            })
            .collect()
    }

    /// The read of [`Storage::event_type_version`].
    pub(super) fn event_type_version_read(
        &self,
        room_id: u64,
        room: &RoomName,
        name: &EventTypeName,
        version: u32,
    ) -> Result<EventTypeVersion> {
        self.event_type_version_in(&self.begin_read()?, room_id, room, name, version)
    }

    /// [`Engine::event_type_version_read`] within a read already open.
    fn event_type_version_in(
        &self,
        txn: &Txn,
        room_id: u64,
        room: &RoomName,
        name: &EventTypeName,
        version: u32,
    ) -> Result<EventTypeVersion> {
        let schemas = txn.open_table(SCHEMAS)?;
        let v: VersionRecord = match schemas.get((room_id, name.as_str(), version))? {
            Some(g) => decode(&g)?,
            None => {
                return Err(Error::EventTypeNotFound {
                    room: room.to_string(),
                    event_type: format!("{name}@{version}"),
                })
            }
        };
        Ok(EventTypeVersion {
            version,
            schema: parse_schema(&v.schema_json)?,
            key_pointer: v.key_pointer,
            created_at: v.created_at,
        })
    }

    /// The read of [`Storage::event`].
    pub(super) fn event_read(&self, id: EventId) -> Result<Option<Event>> {
        let txn = self.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let id = id.0.as_u128();
        let Some(g) = events.get(id)? else {
            return Ok(None);
        };
        let rec: EventRecord = decode_event(&g)?;
        // An event of a deleted Room awaiting purge is no longer visible.
        let deleted = txn.open_table(DELETED_ROOMS)?.get(rec.room_id)?.is_some();
        Ok((!deleted).then(|| event_from(id, rec)))
    }

    /// The read of [`Storage::event_offset`].
    pub(super) fn event_offset_read(&self, id: EventId) -> Result<Option<u64>> {
        let txn = self.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let Some(g) = events.get(id.0.as_u128())? else {
            return Ok(None);
        };
        Ok(Some(decode_event_header(&g)?.offset))
    }

    /// The read of [`Storage::stored_response`].
    pub(super) fn stored_response_read(
        &self,
        principal: &Principal,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<([u8; 32], StoredResponse)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(RESPONSES)?;
        let Some(g) = t.get((principal.as_str(), key))? else {
            return Ok(None);
        };
        let rec: ResponseRecord = decode(&g)?;
        Ok((rec.expires_at > now).then_some((rec.request_hash, rec.response)))
    }

    /// The read of [`Storage::event_log`].
    pub(super) fn event_log_read(
        &self,
        room: &RoomName,
        filter: &EventFilter,
        keep: &(dyn Fn(&Event, &[crate::subscription::EventDelivery]) -> bool + Sync),
        limit: usize,
        scan_max: usize,
        now: Timestamp,
    ) -> Result<Page<crate::storage::LoggedEvent>> {
        let rid = self.require_room_id(room)?;
        self.scan_log(rid, filter, limit, scan_max, |txn, offset, event| {
            // Read in the listing's snapshot (a read never takes a second one while it holds
            // one: see `approval_in`).
            let deliveries = self.event_deliveries_in(txn, rid, offset, now)?;
            Ok(keep(&event, &deliveries).then_some((event, deliveries)))
        })
    }

    /// The read of [`Storage::events`].
    pub(super) fn events_read(
        &self,
        room: &RoomName,
        filter: &EventFilter,
        limit: usize,
        scan_max: usize,
    ) -> Result<Page<Event>> {
        let rid = self.require_room_id(room)?;
        self.scan_log(rid, filter, limit, scan_max, |_, _, event| Ok(Some(event)))
    }

    /// Walks a Room's log from the filter's cursor, keeping events that match the filter and
    /// that `map` turns into items, until `limit` items or `scan_max` positions.
    fn scan_log<T>(
        &self,
        rid: u64,
        filter: &EventFilter,
        limit: usize,
        scan_max: usize,
        mut map: impl FnMut(&Txn, u64, Event) -> Result<Option<T>>,
    ) -> Result<Page<T>> {
        let start = match &filter.cursor {
            None => 0,
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| Error::invalid("cursor", "not a cursor this listing returned"))?,
        };
        let txn = self.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        // Every listing walks the Room's log; the cursor is the next offset to read. There is no
        // per-key index because one would cost a B-tree page per event at a random position on
        // every commit; a key's events are in sequence order in the log anyway, since the
        // writer assigns offset and sequence together.
        let log = txn.open_table(ROOM_LOG)?;
        let positions = log
            .range((rid, start)..=(rid, u64::MAX))?
            .map(|r| r.map(|(k, v)| (k.1, v)));
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (scanned, item) in positions.enumerate() {
            let (pos, id) = item?;
            if items.len() >= limit || scanned >= scan_max {
                next_cursor = Some(pos.to_string());
                break;
            }
            let Some(g) = events.get(id)? else { continue };
            let rec: EventRecord = decode_event(&g)?;
            let keep = filter.key.as_ref().is_none_or(|k| *k == rec.key)
                && filter
                    .event_type
                    .as_ref()
                    .is_none_or(|t| *t == rec.event_type)
                && filter
                    .publisher
                    .as_ref()
                    .is_none_or(|p| *p == rec.publisher)
                && filter.since.is_none_or(|s| rec.received_at >= s)
                && filter.until.is_none_or(|u| rec.received_at < u);
            if keep {
                if let Some(item) = map(&txn, pos, event_from(id, rec))? {
                    items.push(item);
                }
            }
        }
        Ok(Page { items, next_cursor })
    }
}
