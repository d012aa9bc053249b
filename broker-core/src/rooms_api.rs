//! The Room and event-type half of the [`Broker`] API: Rooms (create, approve, change,
//! delete), event types with their schema versions, and reading events. Split from `broker.rs`,
//! which keeps the handle, its start and its close.

use crate::broker::{unexpected, Broker};
use crate::error::{Error, Result};
use crate::ids::{EventId, EventTypeName, RoomName};
use crate::model::{
    Event, EventFilter, EventType, EventTypeSpec, EventTypeVersion, NewRoom, Page,
    PutEventTypeOutcome, Room, RoomPatch,
};
use crate::schema;
use crate::storage::{RoomQuota, WriteOp, WriteOutput};

/// Default page size of list calls that are given none.
const LIST_ITEMS_DEFAULT: usize = 100;

impl Broker {
    // ----- Rooms -----

    /// Creates a Room: active at once when `room.approved`, otherwise pending. An active Room
    /// counts against [`crate::Limits::rooms_max`]; a pending one (a member's request) only
    /// against [`crate::Limits::pending_rooms_max`] and, per owner,
    /// [`crate::Limits::pending_rooms_per_application_max`], so that requests never use up the
    /// administrators' capacity.
    pub async fn create_room(&self, room: NewRoom) -> Result<Room> {
        self.check_description(&room.description)?;
        let l = &self.config().limits;
        let quota = RoomQuota {
            rooms_max: l.rooms_max,
            pending_max: l.pending_rooms_max,
            pending_per_owner_max: l.pending_rooms_per_application_max,
        };
        match self.write(WriteOp::CreateRoom { room, quota }).await? {
            WriteOutput::Room(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// One Room.
    pub fn room(&self, name: &RoomName) -> Result<Room> {
        self.inner()
            .store
            .room(name)?
            .ok_or_else(|| Error::RoomNotFound {
                room: name.to_string(),
            })
    }

    /// Rooms in name order, a page at a time; pass the last name seen as `after`.
    pub fn rooms(&self, after: Option<&RoomName>, limit: Option<usize>) -> Result<Page<Room>> {
        let limit = self.page_limit(limit);
        let items = self.inner().store.rooms(after, limit + 1)?;
        Ok(page_by_name(items, limit, |r| r.name.to_string()))
    }

    /// Changes a Room's description, status (active/disabled), ordering default or retention.
    pub async fn update_room(&self, name: &RoomName, patch: RoomPatch) -> Result<Room> {
        if let Some(d) = &patch.description {
            self.check_description(d)?;
        }
        match self
            .write(WriteOp::UpdateRoom {
                name: name.clone(),
                patch,
            })
            .await?
        {
            WriteOutput::Room(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Approves a pending Room (an administrator's act). Approving an active Room changes
    /// nothing; a disabled Room cannot be approved (enable it with [`Broker::update_room`]).
    pub async fn approve_room(&self, name: &RoomName) -> Result<Room> {
        match self
            .write(WriteOp::ApproveRoom {
                name: name.clone(),
                rooms_max: self.config().limits.rooms_max,
            })
            .await?
        {
            WriteOutput::Room(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a Room at once; its event types and events are purged by the retention sweep in
    /// bounded batches and are invisible from now on. A Room created later under the same name
    /// starts empty.
    pub async fn delete_room(&self, name: &RoomName) -> Result<()> {
        // Its subscriptions go with it; what the broker keeps in memory for them goes too.
        let subs = self.inner().store.subscriptions(name).unwrap_or_default();
        match self
            .write(WriteOp::DeleteRoom { name: name.clone() })
            .await?
        {
            WriteOutput::Deleted => {}
            other => return Err(unexpected(other)),
        }
        for sub in subs {
            self.inner().signals.forget(sub.id);
            self.inner().stats.forget_subscription(sub.id.0.as_u128());
        }
        // The rights given on this Room no longer apply (they are bound to its incarnation);
        // their records go too.
        self.forget_room_grants(name).await
    }

    // ----- Event types -----

    /// Registers an event type, or a new version of it when the schema or key pointer changed.
    /// The schema is checked against its draft's meta-schema and compiled before anything is
    /// stored; an invalid schema is refused with [`Error::InvalidSchema`].
    pub async fn put_event_type(
        &self,
        room: &RoomName,
        spec: EventTypeSpec,
    ) -> Result<PutEventTypeOutcome> {
        self.store_event_type(room, spec, false).await
    }

    /// Registers a new event type, refusing with [`Error::EventTypeExists`] when one of that name
    /// exists (for APIs whose "create" must not silently add a version).
    pub async fn create_event_type(
        &self,
        room: &RoomName,
        spec: EventTypeSpec,
    ) -> Result<PutEventTypeOutcome> {
        self.store_event_type(room, spec, true).await
    }

    /// Removes an event type: nothing more can be published to it. Events already published stay
    /// in the log and in subscriptions' queues, and its schema versions stay on record, so a type
    /// created again with the same name continues the version numbers.
    pub async fn delete_event_type(&self, room: &RoomName, name: &EventTypeName) -> Result<()> {
        match self
            .write(WriteOp::DeleteEventType {
                room: room.clone(),
                name: name.clone(),
            })
            .await?
        {
            WriteOutput::Deleted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn store_event_type(
        &self,
        room: &RoomName,
        spec: EventTypeSpec,
        create_only: bool,
    ) -> Result<PutEventTypeOutcome> {
        let config = self.config();
        let limits = &config.limits;
        self.check_description(&spec.description)?;
        let schema_bytes = spec.schema.to_string().len();
        if schema_bytes > limits.schema_bytes_max {
            return Err(Error::limit(
                "schema_bytes_max",
                limits.schema_bytes_max as u64,
                schema_bytes as u64,
            ));
        }
        if let Some(p) = &spec.key_pointer {
            schema::check_pointer(p)?;
        }
        let schema_value = spec.schema.clone();
        let formats = self.config().validate_formats;
        // Compiling a large schema can take a while: keep it off the async workers.
        tokio::task::spawn_blocking(move || schema::compile(&schema_value, formats))
            .await
            .map_err(|e| Error::Storage(format!("schema task failed: {e}")))??;
        let op = WriteOp::PutEventType {
            room: room.clone(),
            spec,
            types_max: limits.event_types_per_room_max,
            versions_max: limits.schema_versions_max,
            create_only,
        };
        match self.write(op).await? {
            WriteOutput::EventType(o) => Ok(o),
            other => Err(unexpected(other)),
        }
    }

    /// One event type as it stands.
    pub fn event_type(&self, room: &RoomName, name: &EventTypeName) -> Result<EventType> {
        self.inner().store.event_type(room, name)
    }

    /// All event types of a Room, in name order.
    pub fn event_types(&self, room: &RoomName) -> Result<Vec<EventType>> {
        self.inner().store.event_types(room)
    }

    /// One version of an event type's schema; every version stays readable while the type exists.
    pub fn event_type_version(
        &self,
        room: &RoomName,
        name: &EventTypeName,
        version: u32,
    ) -> Result<EventTypeVersion> {
        let rid = self.inner().store.room_id(room)?;
        self.inner()
            .store
            .event_type_version(rid, room, name, version)
    }

    // ----- Reading events -----

    /// One event with its metadata and payload.
    pub fn event(&self, id: EventId) -> Result<Event> {
        self.inner()
            .store
            .event(id)?
            .ok_or_else(|| Error::EventNotFound { id: id.to_string() })
    }

    /// A page of a Room's events, oldest first (or in sequence order when filtered by key).
    pub async fn events(&self, room: &RoomName, filter: EventFilter) -> Result<Page<Event>> {
        let limit = self.page_limit(filter.limit);
        let scan_max = self.config().limits.list_scan_max;
        let store = self.inner().store.clone();
        let room = room.clone();
        tokio::task::spawn_blocking(move || store.events(&room, &filter, limit, scan_max))
            .await
            .map_err(|e| Error::Storage(format!("list task failed: {e}")))?
    }

    fn page_limit(&self, asked: Option<usize>) -> usize {
        asked
            .unwrap_or(LIST_ITEMS_DEFAULT)
            .clamp(1, self.config().limits.list_items_max)
    }
}

fn page_by_name<T>(mut items: Vec<T>, limit: usize, name: impl Fn(&T) -> String) -> Page<T> {
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(name)
    } else {
        None
    };
    Page { items, next_cursor }
}
