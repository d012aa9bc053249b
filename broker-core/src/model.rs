//! The broker's nouns as plain data: what callers send in and what they get back. Nothing here
//! touches storage; the storage module maps these to its own versioned records.

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::ids::{EventId, EventTypeName, OrderingKey, Principal, RoomName, Sequence};
use crate::subscription::RetryOverrides;

/// Whether a Room accepts events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomStatus {
    /// Requested by a member and waiting for an administrator's approval; nothing can be
    /// published.
    Pending,
    /// Open for publishing.
    Active,
    /// Closed by its manager or an administrator; nothing can be published, everything stays
    /// readable.
    Disabled,
}

impl RoomStatus {
    /// The lower-case name used in APIs and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomStatus::Pending => "pending",
            RoomStatus::Active => "active",
            RoomStatus::Disabled => "disabled",
        }
    }
}

/// How long a Room keeps its events. Each bound is optional; an event still owed to a
/// subscriber is kept whatever the bounds say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Events older than this many milliseconds are removed.
    pub age_ms_max: Option<u64>,
    /// The oldest events are removed while the Room's stored payload bytes exceed this.
    pub bytes_max: Option<u64>,
}

/// A Room: a named home for event types, owned by the member that requested it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Room {
    /// The Room's name, unique on the broker.
    pub name: RoomName,
    /// Free text for people.
    pub description: String,
    /// The member that requested the Room.
    pub owner: Principal,
    /// Whether it accepts events.
    pub status: RoomStatus,
    /// Whether subscriptions get per-key FIFO delivery unless they say otherwise.
    pub ordered: bool,
    /// How long events are kept.
    pub retention: Retention,
    /// The Room's retry defaults for its subscriptions, over the broker's.
    pub retry: RetryOverrides,
    /// When the Room was created.
    pub created_at: Timestamp,
    /// When the Room was last changed.
    pub updated_at: Timestamp,
    /// Events currently stored in the Room.
    pub events_stored: u64,
    /// Payload bytes currently stored in the Room.
    pub bytes_stored: u64,
    /// True when new subscriptions (by anyone but a manager) wait for a manager's approval.
    pub subscription_approval: bool,
}

/// A request to create a Room.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRoom {
    /// The name.
    pub name: RoomName,
    /// Free text for people; at most [`crate::Limits::description_bytes_max`] bytes.
    pub description: String,
    /// The member asking for it, who becomes its owner.
    pub owner: Principal,
    /// Per-key FIFO by default for its subscriptions.
    pub ordered: bool,
    /// Retention bounds.
    pub retention: Retention,
    /// Retry defaults for the Room's subscriptions.
    pub retry: RetryOverrides,
    /// True when the requester is an administrator: the Room starts active. Otherwise it starts
    /// pending until [`crate::Broker::approve_room`].
    pub approved: bool,
    /// True when new subscriptions (by anyone but a manager) start pending until a manager
    /// approves them.
    pub subscription_approval: bool,
}

impl NewRoom {
    /// An ordered Room with no retention bounds that starts pending.
    pub fn new(name: RoomName, owner: Principal) -> Self {
        NewRoom {
            name,
            description: String::new(),
            owner,
            ordered: true,
            retention: Retention::default(),
            retry: RetryOverrides::default(),
            approved: false,
            subscription_approval: false,
        }
    }

    /// The same request, approved at once (the requester is an administrator).
    pub fn approved(mut self) -> Self {
        self.approved = true;
        self
    }
}

/// Changes to a Room; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomPatch {
    /// New description.
    pub description: Option<String>,
    /// New status: `active` or `disabled`. A pending Room becomes active only through
    /// [`crate::Broker::approve_room`], so that approval is always an explicit act.
    pub status: Option<RoomStatus>,
    /// New ordering default.
    pub ordered: Option<bool>,
    /// New retention bounds (replacing both).
    pub retention: Option<Retention>,
    /// New retry defaults (replacing the old ones).
    pub retry: Option<RetryOverrides>,
    /// Whether new subscriptions wait for a manager's approval.
    #[serde(default)]
    pub subscription_approval: Option<bool>,
}

/// What a caller registers for an event type.
#[derive(Clone, Debug, PartialEq)]
pub struct EventTypeSpec {
    /// The name within the Room.
    pub name: EventTypeName,
    /// Free text for people.
    pub description: String,
    /// The JSON Schema of the payload (drafts 4, 6, 7, 2019-09, 2020-12; `$schema` picks the
    /// draft, 2020-12 when absent).
    pub schema: serde_json::Value,
    /// Where the ordering key is in the payload, as a JSON Pointer (e.g. `/person_id`).
    pub key_pointer: Option<String>,
}

impl EventTypeSpec {
    /// The checks registering this type would make that need no broker: the key pointer's
    /// syntax and the schema against its draft's meta-schema. Tools that read specs from files
    /// (domain packs) call it so that a bad file is refused before anything is changed; the
    /// broker still makes the same checks, and the limits of its configuration, when the type
    /// is registered.
    pub fn check(&self) -> crate::error::Result<()> {
        if let Some(p) = &self.key_pointer {
            crate::schema::check_pointer(p)?;
        }
        crate::schema::compile(&self.schema, true).map(|_| ())
    }
}

/// An event type as it stands now.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventType {
    /// The Room it belongs to.
    pub room: RoomName,
    /// Its name.
    pub name: EventTypeName,
    /// Free text for people.
    pub description: String,
    /// The version new events are validated against.
    pub version: u32,
    /// The current schema.
    pub schema: serde_json::Value,
    /// The current ordering-key pointer.
    pub key_pointer: Option<String>,
    /// When the first version was registered.
    pub created_at: Timestamp,
    /// When the current version was registered or the description last changed.
    pub updated_at: Timestamp,
}

/// One version of an event type's schema. Versions are never changed or removed while the type
/// exists, so every stored event can name the schema that accepted it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventTypeVersion {
    /// The version number, starting at 1.
    pub version: u32,
    /// The schema of this version.
    pub schema: serde_json::Value,
    /// The ordering-key pointer of this version.
    pub key_pointer: Option<String>,
    /// When this version was registered.
    pub created_at: Timestamp,
}

/// The result of registering an event type.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PutEventTypeOutcome {
    /// The event type after the call.
    pub event_type: EventType,
    /// True when the type did not exist before.
    pub created: bool,
    /// True when the call added a schema version (a new type, or a changed schema or pointer).
    pub new_version: bool,
}

/// A request to publish one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishRequest {
    /// The Room.
    pub room: RoomName,
    /// The event type.
    pub event_type: EventTypeName,
    /// The payload, exactly as received; it is stored and delivered byte for byte.
    pub payload: Vec<u8>,
    /// Who publishes.
    pub publisher: Principal,
    /// The publisher's own event id. The same publisher publishing the same event again (same
    /// Room, type, key and payload bytes) gets the first receipt and stores nothing; any other
    /// use of a known id is [`crate::Error::EventIdConflict`].
    pub event_id: Option<EventId>,
    /// An idempotency key: the same key with the same request within the window returns the first
    /// receipt; with a different request it is a conflict.
    pub idempotency_key: Option<String>,
    /// The ordering key, when the publisher names it. When the event type also has a key pointer
    /// and both are present they must agree.
    pub ordering_key: Option<String>,
    /// When set, the event's ordering key must be one of these, or the publish is refused with
    /// [`crate::Error::KeyNotAllowed`]: the publisher's right is limited to them. A host that
    /// checks rights passes [`crate::Rights::publish_keys`] here, because only the broker
    /// knows the key (it may come from the payload).
    pub keys_allowed: Option<Vec<String>>,
}

impl PublishRequest {
    /// A request with no id, idempotency key or explicit ordering key.
    pub fn new(
        room: RoomName,
        event_type: EventTypeName,
        publisher: Principal,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        PublishRequest {
            room,
            event_type,
            payload: payload.into(),
            publisher,
            event_id: None,
            idempotency_key: None,
            ordering_key: None,
            keys_allowed: None,
        }
    }
}

/// What a publisher gets back once its event is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The event id.
    pub id: EventId,
    /// The Room.
    pub room: RoomName,
    /// The event type.
    pub event_type: EventTypeName,
    /// The schema version that validated the payload.
    pub version: u32,
    /// The ordering key.
    pub key: OrderingKey,
    /// The position in the key's sequence.
    pub sequence: Sequence,
    /// When the broker accepted the event.
    pub received_at: Timestamp,
    /// True when this is the receipt of an earlier publish (same event id or idempotency key):
    /// nothing new was stored.
    pub duplicate: bool,
}

/// A stored event with its metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// The event id.
    pub id: EventId,
    /// The Room.
    pub room: RoomName,
    /// The event type.
    pub event_type: EventTypeName,
    /// The schema version that validated it.
    pub version: u32,
    /// The ordering key.
    pub key: OrderingKey,
    /// The position in the key's sequence.
    pub sequence: Sequence,
    /// Who published it.
    pub publisher: Principal,
    /// When the broker accepted it.
    pub received_at: Timestamp,
    /// The idempotency key it was published with, if any.
    pub idempotency_key: Option<String>,
    /// The payload bytes exactly as published.
    #[serde(skip)]
    pub payload: Vec<u8>,
}

impl Event {
    /// The payload's size in bytes.
    pub fn payload_bytes(&self) -> usize {
        self.payload.len()
    }

    /// The payload parsed as JSON. It was valid JSON when accepted, so an error here means the
    /// stored bytes were damaged.
    pub fn payload_json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.payload)
    }
}

/// Which events of a Room to list. Every filter is optional; results come oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this event type.
    pub event_type: Option<EventTypeName>,
    /// Only this ordering key (results then come in sequence order).
    pub key: Option<OrderingKey>,
    /// Only this publisher.
    pub publisher: Option<Principal>,
    /// Only events received at or after this time.
    pub since: Option<Timestamp>,
    /// Only events received before this time.
    pub until: Option<Timestamp>,
    /// Page size; capped by [`crate::Limits::list_items_max`], 100 when `None`.
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass this back to get the next page; `None` when the listing is complete.
    pub next_cursor: Option<String>,
}

/// What one retention sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    // (Expired remembered API responses are counted with the idempotency records.)
    /// Events removed because of a Room's age or byte bound.
    pub events_removed: u64,
    /// Events kept past their bounds because a subscriber is still owed them.
    pub events_kept_owed: u64,
    /// Expired idempotency records removed.
    pub idempotency_removed: u64,
    /// Records of deleted Rooms removed.
    pub deleted_room_records_removed: u64,
    /// Dead letters removed because they outlived their retention.
    pub dead_letters_expired: u64,
    /// Queue records of deleted subscriptions removed.
    pub deleted_subscription_records_removed: u64,
    /// Audit entries removed because they outlived the audit retention or its count bound.
    pub audit_entries_removed: u64,
    /// True when the sweep stopped at its batch limit and more work remains.
    pub more: bool,
}

/// An API response remembered under an idempotency key, so that a retried request gets the
/// same answer instead of creating something twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// The status code of the first answer.
    pub status: u16,
    /// Its body, byte for byte.
    pub body: Vec<u8>,
}
