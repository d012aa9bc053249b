//! Storage behind one narrow interface shaped by the broker's operations, not by any engine's
//! API: apply a batch of writes in one durable commit, and a handful of reads. redb is the only
//! backend today; a distributed one can stand beside it by implementing [`Storage`] without the
//! rest of the core changing. Only `redb_store` names redb.

mod codec;
mod redb_store;

pub(crate) use redb_store::RedbStorage;

use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::{EventId, EventTypeName, OrderingKey, Principal, RoomName};
use crate::model::{
    Event, EventFilter, EventType, EventTypeSpec, EventTypeVersion, NewRoom, Page,
    PutEventTypeOutcome, Receipt, Room, RoomPatch, SweepReport,
};

/// An event that passed every check that needs no storage (size, JSON, schema, key): the writer
/// only has to number it and store it.
#[derive(Debug)]
pub(crate) struct PreparedEvent {
    pub room: RoomName,
    /// The Room incarnation the payload was validated against; a Room deleted and created again
    /// in between gets a new id, and the publish is refused rather than filed under the new one.
    pub room_id: u64,
    pub event_type: EventTypeName,
    pub version: u32,
    pub key: OrderingKey,
    pub payload: Vec<u8>,
    pub publisher: Principal,
    pub event_id: EventId,
    /// True when the publisher chose the id, so a repeat must be looked for.
    pub id_from_publisher: bool,
    pub idempotency: Option<IdempotencyClaim>,
}

/// An idempotency key with the hash of the request it came with.
#[derive(Debug)]
pub(crate) struct IdempotencyClaim {
    pub key: String,
    pub request_hash: [u8; 32],
    pub window_ms: u64,
}

/// One mutation. Each either applies completely or, with a logical error, changes nothing;
/// a storage error fails the whole batch it is in.
#[derive(Debug)]
pub(crate) enum WriteOp {
    CreateRoom {
        room: NewRoom,
        rooms_max: usize,
    },
    UpdateRoom {
        name: RoomName,
        patch: RoomPatch,
    },
    ApproveRoom {
        name: RoomName,
    },
    DeleteRoom {
        name: RoomName,
    },
    PutEventType {
        room: RoomName,
        spec: EventTypeSpec,
        types_max: usize,
        versions_max: u32,
    },
    /// One or more events, each succeeding or failing on its own.
    Publish(Vec<PreparedEvent>),
    Sweep {
        delete_max: usize,
    },
}

impl WriteOp {
    /// Payload bytes the op carries, for the writer's byte bounds.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            WriteOp::Publish(events) => events.iter().map(|e| e.payload.len()).sum(),
            WriteOp::PutEventType { spec, .. } => spec.schema.to_string().len(),
            _ => 0,
        }
    }
}

/// What a successful [`WriteOp`] returns.
#[derive(Debug)]
pub(crate) enum WriteOutput {
    Room(Room),
    Deleted,
    EventType(PutEventTypeOutcome),
    Receipts(Vec<Result<Receipt>>),
    Swept(SweepReport),
}

/// What a publisher needs to know before it validates: which Room incarnation, which schema
/// version and which key pointer apply right now.
#[derive(Debug, Clone)]
pub(crate) struct PublishTarget {
    pub room_id: u64,
    pub version: u32,
    pub key_pointer: Option<String>,
}

/// The storage interface. Writes come only from the writer thread, one batch at a time; reads
/// may come from any thread at any time and see the last committed state.
pub(crate) trait Storage: Send + Sync + 'static {
    /// Applies `ops` in order in one transaction and makes it durable before returning. The outer
    /// error means nothing was committed; the inner results are per operation.
    fn apply(&self, now: Timestamp, ops: Vec<WriteOp>) -> Result<Vec<Result<WriteOutput>>>;

    /// One Room.
    fn room(&self, name: &RoomName) -> Result<Option<Room>>;
    /// Rooms in name order, after `after`.
    fn rooms(&self, after: Option<&RoomName>, limit: usize) -> Result<Vec<Room>>;
    /// The Room status check and current schema version for a publish.
    fn publish_target(&self, room: &RoomName, event_type: &EventTypeName) -> Result<PublishTarget>;
    /// One event type as it stands.
    fn event_type(&self, room: &RoomName, name: &EventTypeName) -> Result<EventType>;
    /// All event types of a Room, in name order.
    fn event_types(&self, room: &RoomName) -> Result<Vec<EventType>>;
    /// One version of an event type, by the Room's incarnation id.
    fn event_type_version(
        &self,
        room_id: u64,
        room: &RoomName,
        name: &EventTypeName,
        version: u32,
    ) -> Result<EventTypeVersion>;
    /// The Room incarnation id for a name.
    fn room_id(&self, room: &RoomName) -> Result<u64>;
    /// One event.
    fn event(&self, id: EventId) -> Result<Option<Event>>;
    /// A page of a Room's events.
    fn events(
        &self,
        room: &RoomName,
        filter: &EventFilter,
        limit: usize,
        scan_max: usize,
    ) -> Result<Page<Event>>;
}
