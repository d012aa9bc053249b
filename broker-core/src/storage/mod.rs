//! Storage, in two layers. The backend seam (`kv.rs`) is an ordered key-value store with one
//! atomic durable batch and snapshot reads: all a backend implements, checked by the conformance
//! suite. Above it, [`Storage`] is what the rest of the core asks of the engine (`crate::engine`,
//! where every rule lives): apply a batch of broker operations in one durable commit, and the
//! reads. This module also defines those operations ([`WriteOp`], [`DeliveryOp`]) and their
//! outputs. Only `redb_kv.rs` and its layout migration `redb_migrate.rs` name redb; only `pg_kv.rs` (and
//! the tests' server, `pg_cluster.rs`) names PostgreSQL.

pub(crate) mod codec;
#[cfg(test)]
pub(crate) mod conformance;
mod encoding;
mod faults;
pub(crate) mod kv;
#[cfg(test)]
mod mem_kv;
#[cfg(any(test, feature = "fault-injection"))]
pub mod pg_cluster;
mod pg_config;
pub(crate) mod pg_kv;
mod pg_listen;
mod pg_migrate;
mod redb_kv;
mod redb_migrate;
pub(crate) mod txn;

pub(crate) use crate::engine::{ack_id, parse_ack_id, Engine};
pub(crate) use faults::FaultyKv;
#[cfg(test)]
pub(crate) use mem_kv::MemKv;
pub(crate) use pg_kv::PgKv;
pub use pg_kv::{apply_migrations, pending_migrations, PendingMigration, PostgresConfig};
pub(crate) use redb_kv::RedbKv;

pub use faults::StorageFaults;

use crate::clock::Timestamp;
use crate::error::Result;
use std::collections::HashMap;

use crate::ids::{EventId, EventTypeName, OrderingKey, Principal, RoomName, SubscriptionId};
use crate::model::{
    Event, EventFilter, EventType, EventTypeSpec, EventTypeVersion, NewRoom, Page,
    PutEventTypeOutcome, Receipt, Room, RoomPatch, StoredResponse, SweepReport,
};
use crate::subscription::{
    Attempt, BlockedKey, DeadLetter, EventDelivery, NewSubscription, RetryPolicy, Subscription,
    SubscriptionPatch, SubscriptionStatus,
};
use crate::webhook::PushResponse;

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

/// The bounds on Rooms checked when one is created or approved. Active Rooms (the
/// administrators' and approved requests) count against `rooms_max`; pending requests count
/// only against their own two bounds, so that members' requests never use up the capacity
/// administrators create Rooms in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoomQuota {
    pub rooms_max: usize,
    pub pending_max: usize,
    pub pending_per_owner_max: usize,
}

/// One mutation. Each either applies completely or, with a logical error, changes nothing;
/// a storage error fails the whole batch it is in.
#[derive(Debug)]
pub(crate) enum WriteOp {
    CreateRoom {
        room: NewRoom,
        quota: RoomQuota,
    },
    UpdateRoom {
        name: RoomName,
        patch: RoomPatch,
    },
    ApproveRoom {
        name: RoomName,
        rooms_max: usize,
    },
    DeleteRoom {
        name: RoomName,
    },
    PutEventType {
        room: RoomName,
        spec: EventTypeSpec,
        types_max: usize,
        versions_max: u32,
        /// Refuse with `EventTypeExists` instead of adding a version.
        create_only: bool,
    },
    /// Removes an event type; its schema versions stay, so that events already published keep
    /// naming a schema, and a type created again later continues the version numbers.
    DeleteEventType {
        room: RoomName,
        name: EventTypeName,
    },
    /// Remembers an API response under an idempotency key; an existing record is kept (the
    /// first answer wins).
    RememberResponse {
        principal: Principal,
        key: String,
        request_hash: [u8; 32],
        response: StoredResponse,
        expires_at: Timestamp,
    },
    /// One or more events, each succeeding or failing on its own.
    Publish(Vec<PreparedEvent>),
    Sweep {
        delete_max: usize,
    },
    Delivery(DeliveryOp),
    /// A change to administrative records (identities, rights, the audit log), applied by a
    /// function over a [`RecordTxn`] so that its checks and writes share one transaction.
    Records(RecordOp),
}

/// The kinds of administrative record, each its own key space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecordKind {
    Member,
    Application,
    Client,
    Grant,
    /// Per-Room-incarnation policies kept beside the Room record (keyed by the Room's id), such
    /// as whether subscriptions need approval.
    RoomPolicy,
    /// Random keys the broker keeps for its host (such as a server's token signing key).
    Key,
    /// Settings nodes sharing a store keep in common (the values changed at run time).
    Setting,
}

impl RecordKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RecordKind::Member => "member",
            RecordKind::Application => "application",
            RecordKind::Client => "client",
            RecordKind::Grant => "grant",
            RecordKind::Key => "key",
            RecordKind::RoomPolicy => "room_policy",
            RecordKind::Setting => "setting",
        }
    }
}

/// A transactional view of the administrative records: small, rarely written documents keyed
/// by kind and id, plus the append-only audit log. Identity and rights logic lives in the core
/// (`identity.rs`, `rights.rs`, `audit.rs`) and sees only this view, so another backend needs
/// just these calls.
pub(crate) trait RecordTxn {
    fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>>;
    fn put(&mut self, kind: RecordKind, id: &str, value: &[u8]) -> Result<()>;
    /// True when something was removed.
    fn delete(&mut self, kind: RecordKind, id: &str) -> Result<bool>;
    /// Ids starting with `prefix`, in order.
    fn ids(&self, kind: RecordKind, prefix: &str, limit: usize) -> Result<Vec<String>>;
    /// The current incarnation id of a Room, `None` when there is no such Room.
    fn room_id(&self, room: &RoomName) -> Result<Option<u64>>;
    /// Appends an audit entry and returns its sequence number (from 1, never reused while the
    /// newest entry is kept).
    fn append_audit(&mut self, entry: &[u8]) -> Result<u64>;
    /// The newest audit entry's sequence number.
    fn audit_last(&self) -> Result<Option<u64>>;
    /// Audit entries after sequence `after`, oldest first, at most `limit`.
    fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>>;
    /// Removes one audit entry (retention).
    fn delete_audit(&mut self, seq: u64) -> Result<()>;
}

/// A record change; see [`WriteOp::Records`]. The flag says whether it may change who may do
/// what (an identity or a right); only those move the identity cache on (an audit entry does
/// not, so that a flood of audited requests cannot empty the cache).
pub(crate) struct RecordOp(
    #[allow(clippy::type_complexity)]
    pub  Box<dyn FnOnce(&mut dyn RecordTxn, Timestamp) -> Result<WriteOutput> + Send>,
    pub bool,
);

impl std::fmt::Debug for RecordOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordOp")
    }
}

/// Delivery mutations: subscriptions, leases, outcomes, dead letters, seeking.
#[derive(Debug)]
pub(crate) enum DeliveryOp {
    Create {
        room: RoomName,
        id: SubscriptionId,
        new: NewSubscription,
        secret: Option<String>,
    },
    Update {
        id: SubscriptionId,
        patch: SubscriptionPatch,
    },
    /// Changes the status if it is one of `from` (or already `to`).
    SetStatus {
        id: SubscriptionId,
        to: SubscriptionStatus,
        reason: Option<String>,
        from: &'static [SubscriptionStatus],
    },
    Delete {
        id: SubscriptionId,
    },
    RotateSecret {
        id: SubscriptionId,
        secret: String,
        old_valid_until: Timestamp,
    },
    Lease {
        id: SubscriptionId,
        max: usize,
        lease_ms: u64,
    },
    Settle {
        id: SubscriptionId,
        refs: Vec<LeaseRef>,
        action: AckAction,
    },
    /// What a push's receiver answered (or why there was no answer), for the attempt and the
    /// queueing of the delivery it was handed out for (see `DueDelivery`).
    PushOutcome {
        id: SubscriptionId,
        due: DueDelivery,
        response: PushResponse,
        /// On a store several brokers share: the (node, epoch) of the push lease it was pushed
        /// under; the outcome is refused with `Error::DispatchLeaseLost` unless that lease is
        /// still the current one (see `ownership.rs`). `None` on a store this broker alone
        /// writes.
        lease: Option<(u128, u64)>,
    },
    /// A node asks for (or renews) the push lease of a subscription on a shared store;
    /// answers [`WriteOutput::Dispatch`].
    ClaimDispatch {
        id: SubscriptionId,
        node: u128,
        lease_ms: u64,
    },
    /// A node shutting down ends the push leases it holds among `ids`, so that other nodes
    /// take them at once; answers [`WriteOutput::Count`].
    ReleaseDispatch {
        ids: Vec<SubscriptionId>,
        node: u128,
    },
    Redrive {
        id: SubscriptionId,
        offsets: Option<Vec<u64>>,
        limit: usize,
    },
    PurgeDead {
        id: SubscriptionId,
        limit: usize,
    },
    SeekClear {
        id: SubscriptionId,
        below: u64,
        limit: usize,
    },
    SeekEnqueue {
        id: SubscriptionId,
        from: u64,
        to: u64,
        limit: usize,
    },
    /// Ends a seek: the subscription hands out messages again.
    SeekDone {
        id: SubscriptionId,
    },
    /// Stops delivering one event: every subscription's undelivered copy goes to its dead
    /// letters with reason `stopped`, where an operator can still redrive it.
    StopEvent {
        event: EventId,
    },
}

/// What a puller does with leased messages.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AckAction {
    Ack,
    /// Give back: retry per the policy, or after an explicit delay.
    Nack {
        delay_ms: Option<u64>,
    },
    Extend {
        lease_ms: u64,
    },
    /// Straight to the dead letters.
    Term,
}

/// Broker-wide delivery settings the storage needs inside transactions.
#[derive(Debug, Clone)]
pub(crate) struct DeliveryDefaults {
    pub retry: RetryPolicy,
    pub retry_after_ms_max: u64,
    pub in_flight_max: u32,
    pub queue_depth_max: u64,
    pub dead_letter_retention_ms: u64,
    pub subscriptions_per_room_max: usize,
    /// Whether leases and pullers' settles may be committed volatile (see
    /// [`WriteOp::volatile`]); false when the writer's `volatile_sync_ms` is zero.
    pub volatile_commits: bool,
}

/// A delivery whose attempt is due.
#[derive(Debug, Clone)]
pub(crate) struct DueDelivery {
    pub offset: u64,
    pub event_id: EventId,
    /// The event's ordering key: with ordering, the push holds it until it ends.
    pub key: OrderingKey,
    pub attempt: u32,
    pub published_at: Timestamp,
    /// Which queueing of the delivery this attempt belongs to; its outcome names it.
    pub queueing: u64,
}

/// The pushes under way of one subscription, which `due` skips: their offsets and, with
/// ordering, their keys. A push under way holds its key until it ends, whatever became of its
/// delivery meanwhile (stopped, seeked past, its event removed by retention), so the keys come
/// from the dispatcher, which knows them, not from storage (issue 15, simulation findings F2, F3).
#[derive(Debug, Default, Clone)]
pub(crate) struct Busy {
    offsets: HashMap<u64, OrderingKey>,
    keys: HashMap<OrderingKey, u32>,
}

impl Busy {
    /// A push of `offset` (of `key`) started.
    pub(crate) fn insert(&mut self, offset: u64, key: OrderingKey) {
        if let Some(old) = self.offsets.insert(offset, key.clone()) {
            self.release(&old);
        }
        *self.keys.entry(key).or_default() += 1;
    }

    /// The push of `offset` ended.
    pub(crate) fn remove(&mut self, offset: u64) {
        if let Some(key) = self.offsets.remove(&offset) {
            self.release(&key);
        }
    }

    fn release(&mut self, key: &OrderingKey) {
        if let Some(n) = self.keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(key);
            }
        }
    }

    /// Whether a push of `offset` is under way.
    pub(crate) fn contains(&self, offset: u64) -> bool {
        self.offsets.contains_key(&offset)
    }

    /// Whether a push of an event of `key` is under way.
    pub(crate) fn holds_key(&self, key: &OrderingKey) -> bool {
        self.keys.contains_key(key)
    }

    /// Pushes under way.
    pub(crate) fn len(&self) -> usize {
        self.offsets.len()
    }
}

/// A message leased to a puller.
#[derive(Debug, Clone)]
pub(crate) struct LeaseGrant {
    pub offset: u64,
    pub attempt: u32,
    /// The boot of the engine that granted it (see [`LeaseRef::epoch`]).
    pub epoch: u64,
    pub lease_until: Timestamp,
    pub event_id: EventId,
}

/// The lease an ack, nack or extension names: what an ack id says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseRef {
    /// The delivery's position in its subscription's queue.
    pub offset: u64,
    /// The attempt the lease was granted as.
    pub attempt: u32,
    /// The engine boot that granted the lease (its epoch, counted durably at each open), or
    /// `None` for whichever lease is current (settling by event id). Leases are volatile: a
    /// crash can undo one, and the next lease of the message then has the same attempt number;
    /// the epoch keeps an ack id issued before the crash from settling the new lease.
    pub epoch: Option<u64>,
}

/// A page of the attempt log: ((offset, attempt), attempt) and whether more follow.
pub(crate) type AttemptPage = (Vec<((u64, u32), Attempt)>, bool);

/// A subscription's queue as it stands, for operators.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueueHealth {
    /// Deliveries leased to a puller now.
    pub in_flight: u64,
    /// Keys whose head delivery has failed.
    pub blocked_keys: u64,
    /// When the oldest undelivered event was published.
    pub oldest_published_at: Option<Timestamp>,
    /// False when the scan stopped at its bound, so the counts are lower bounds.
    pub complete: bool,
}

/// An event with its state for each subscription that owes or owed it.
pub(crate) type LoggedEvent = (Event, Vec<EventDelivery>);

/// What a committed batch did.
#[derive(Debug)]
pub(crate) struct Applied {
    pub results: Vec<Result<WriteOutput>>,
    /// Whether a crash may still undo this batch or an earlier one (committed volatile, and no
    /// durable commit since): the writer then calls [`Storage::sync`] when idle.
    pub unsynced: bool,
    /// Subscriptions whose queues changed, so their dispatchers can look again.
    pub touched: Vec<SubscriptionId>,
    /// What the batch did that operators count, reported only once it is committed so that
    /// a failed commit counts nothing.
    pub observed: Vec<Observation>,
}

/// Something a committed batch did that metrics and statistics count.
#[derive(Debug, Clone)]
pub(crate) enum Observation {
    /// An attempt was logged; `published_at` is the event's, for the delivery latency.
    Attempt {
        sub: u128,
        event: u128,
        outcome: crate::subscription::AttemptOutcome,
        published_at: Timestamp,
        at: Timestamp,
    },
    /// A delivery moved to the dead letters, for one of the core's fixed reasons.
    DeadLettered { sub: u128, reason: &'static str },
}

impl WriteOp {
    /// Whether the op may change who may do what (an identity, a right, a Room a right is
    /// bound to): anything but a publish, a delivery outcome, a retention sweep or an audit
    /// entry. The writer moves the identity cache on after committing one.
    pub(crate) fn may_change_rights(&self) -> bool {
        !matches!(
            self,
            WriteOp::Publish(_)
                | WriteOp::Delivery(_)
                | WriteOp::Sweep { .. }
                | WriteOp::Records(RecordOp(_, false))
        )
    }

    /// Whether a crash may undo the op's writes without breaking a promise, so that a commit of
    /// such ops alone need not wait for the disk: a lease (after a crash its message is simply
    /// offered again, as when a lease runs out; an expired lease noticed on the way is noticed
    /// again) and a puller's settle (ack, nack, extension, termination: after a crash the
    /// message is offered again, which at-least-once delivery allows). A batch that hands out
    /// the next delivery of an ordered key whose settle is still volatile is made durable, so
    /// a crash never brings back a delivery after its successor went out. A publish, a push
    /// outcome (the attempt log of a webhook that was sent) and every administrative change
    /// are never volatile.
    pub(crate) fn volatile(&self) -> bool {
        matches!(
            self,
            WriteOp::Delivery(
                DeliveryOp::Lease { .. }
                    | DeliveryOp::Settle { .. }
                    | DeliveryOp::ClaimDispatch { .. }
                    | DeliveryOp::ReleaseDispatch { .. }
            )
        )
    }

    /// Payload bytes the op carries, for the writer's byte bounds.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            WriteOp::Publish(events) => events.iter().map(|e| e.payload.len()).sum(),
            WriteOp::RememberResponse { response, .. } => response.body.len(),
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
    Subscription(Subscription, Option<String>),
    /// What a lease handed out, and, when it handed out nothing, the earliest later time it saw
    /// at which one of the messages it looked at falls due (a retry delay or a lease runs out),
    /// so that a long-poll knows when to look again without a write to wake it.
    Leased {
        grants: Vec<LeaseGrant>,
        next_due: Option<Timestamp>,
    },
    Settled(Vec<Result<()>>),
    Count {
        n: u64,
        more: bool,
    },
    /// An administrative record change's answer, encoded by the caller.
    Record(Vec<u8>),
    Seeked {
        n: u64,
        next: Option<u64>,
    },
    /// What a push lease claim decided.
    Dispatch(crate::ownership::Claim),
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
    /// True when other brokers commit to the same store (see `KvStore::shared`): what this
    /// broker keeps in memory from storage may then go stale without its writer knowing.
    fn shared(&self) -> bool {
        false
    }

    /// This store handle's id among the processes sharing the store: the node id of its push
    /// leases and the sender named in its notices (`remote_wake.rs`).
    fn origin(&self) -> u128;

    /// The notices of other processes' commits (see `KvStore::take_notices`); taken once.
    fn take_notices(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        None
    }

    /// Applies `ops` in order in one transaction and makes it durable before returning. The outer
    /// error means nothing was committed; the inner results are per operation.
    fn apply(&self, now: Timestamp, ops: Vec<WriteOp>) -> Result<Applied>;

    /// Makes every volatile commit so far durable (nothing when there is none). The writer
    /// calls it when idle after a volatile commit.
    fn sync(&self) -> Result<()>;

    /// After failed commits: lets the backend recover (reopen its file, reconnect) and rebuilds
    /// what the engine keeps in memory from what is committed. The writer calls it before
    /// trying again.
    fn recover(&self) -> Result<()>;

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
    /// One subscription.
    fn subscription(&self, id: SubscriptionId) -> Result<Subscription>;
    /// A Room's subscriptions.
    fn subscriptions(&self, room: &RoomName) -> Result<Vec<Subscription>>;
    /// Every push subscription, for starting dispatchers.
    fn push_subscriptions(&self) -> Result<Vec<SubscriptionId>>;
    /// The stored push lease of a subscription on a shared store (see `ownership.rs`).
    fn dispatch_lease(&self, id: SubscriptionId)
        -> Result<Option<crate::ownership::DispatchLease>>;
    /// The signing secrets valid now (newest last).
    fn signing_secrets(&self, id: SubscriptionId, now: Timestamp) -> Result<Vec<String>>;
    /// Deliveries due now, skipping `busy` offsets and, with ordering, keys whose head is not
    /// due or has a push under way; and the earliest later due time. Read from the front of the
    /// ready index: no window hides due work behind blocked work.
    fn due(
        &self,
        id: SubscriptionId,
        now: Timestamp,
        busy: &Busy,
        limit: usize,
    ) -> Result<(Vec<DueDelivery>, Option<Timestamp>)>;
    /// Dead letters after a position.
    fn dead_letters(
        &self,
        id: SubscriptionId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<(u64, DeadLetter)>, bool)>;
    /// The attempt log after a position.
    fn attempts(
        &self,
        id: SubscriptionId,
        after: Option<(u64, u32)>,
        limit: usize,
    ) -> Result<AttemptPage>;
    /// Keys whose head has failed.
    fn blocked_keys(
        &self,
        id: SubscriptionId,
        now: Timestamp,
        limit: usize,
        scan_max: usize,
    ) -> Result<Vec<BlockedKey>>;
    /// An event's state for each subscription of its Room.
    fn event_deliveries(&self, id: EventId, now: Timestamp) -> Result<Vec<EventDelivery>>;
    /// The log offset to seek to and the Room's next offset.
    fn seek_offsets(&self, room: &RoomName, at: Option<Timestamp>) -> Result<(u64, u64)>;
    /// One administrative record.
    fn record(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>>;
    /// Administrative records whose id starts with `prefix`, after `after`, in id order.
    fn records(
        &self,
        kind: RecordKind,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>>;
    /// Audit entries after sequence `after`, oldest first, at most `limit`.
    fn audit(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>>;
    /// A remembered API response that has not expired: the request hash and the response.
    fn stored_response(
        &self,
        principal: &Principal,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<([u8; 32], StoredResponse)>>;
    /// Room log offset of an event (for dead-letter redrive by id).
    fn event_offset(&self, id: EventId) -> Result<Option<u64>>;
    /// A subscription's undelivered copy of `event` at `offset`: its attempt number and
    /// whether it is leased now; `None` when it is not in the queue.
    fn queued(
        &self,
        id: SubscriptionId,
        offset: u64,
        event: EventId,
        now: Timestamp,
    ) -> Result<Option<(u32, bool)>>;
    /// Total undelivered deliveries, for tests and metrics.
    fn deliveries_total(&self) -> Result<u64>;
    /// Replaces the broker-wide delivery defaults (a runtime reconfiguration).
    fn set_delivery_defaults(&self, defaults: DeliveryDefaults);
    /// A subscription's queue health, scanning at most `scan_max` deliveries.
    fn queue_health(
        &self,
        id: SubscriptionId,
        now: Timestamp,
        scan_max: usize,
    ) -> Result<QueueHealth>;
    /// A page of a Room's events with each one's deliveries, keeping the events the filter and
    /// `keep` accept; scans at most `scan_max` events.
    fn event_log(
        &self,
        room: &RoomName,
        filter: &EventFilter,
        keep: &(dyn Fn(&Event, &[EventDelivery]) -> bool + Sync),
        limit: usize,
        scan_max: usize,
        now: Timestamp,
    ) -> Result<Page<LoggedEvent>>;
    /// A page of a Room's events.
    fn events(
        &self,
        room: &RoomName,
        filter: &EventFilter,
        limit: usize,
        scan_max: usize,
    ) -> Result<Page<Event>>;
}
