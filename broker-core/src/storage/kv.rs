//! The storage interface: an ordered key-value store with named key spaces, one atomic durable
//! batch of writes, and snapshot reads. This is everything a backend implements; every rule of
//! the broker (numbering, FIFO heads, leases, retry, dead letters, seek, retention) is core code
//! over this interface (`storage::engine` and the modules it uses), so a backend decides nothing
//! and a second backend (PostgreSQL, a test double that injects faults) cannot disagree with the
//! first about what a delivery does.
//!
//! Invariants every backend keeps (the conformance suite in `storage::conformance` checks them):
//! - `commit` applies a whole batch or nothing, and returns only once the batch is durable.
//! - A snapshot sees exactly the batches committed before it was taken, never part of one, and
//!   never changes afterwards.
//! - Keys compare as unsigned bytes, lexicographically; `range` returns keys in that order (or
//!   the reverse), never more than its `limit`, and a page ends only at the limit or the range's
//!   end (there is no scan window: a backend does not stop early).
//! - A batch's `expect` conditions are checked atomically with its writes: when any does not
//!   hold, nothing is written and the commit fails with `Error::StorageConflict`, so that a networked
//!   backend with several writers can fence a writer whose view is stale.
//!
//! Every method may block (on disk or on the network). Writes come only from the writer thread;
//! reads of a backend that says [`KvStore::reads_block`] run under `block_in_place` when called
//! from a tokio worker, so that no worker waits on one.

use std::ops::Bound;
use std::sync::Arc;

use crate::error::Result;

/// The storage layout this build reads and writes, stored as `layout_version` in `Space::Meta`.
/// Layout 1 was the previous release's (typed redb tables), which the redb backend migrates in
/// place when it opens such a file. Layout 2 is the key spaces; layout 3 the same spaces with the
/// index of ready work (`Ready`, `KeyQueue`, `KeyHead`) kept by every write: a layout-2 file is
/// upgraded at open by building the index, and a build of layout 2 refuses a layout-3 file
/// rather than write deliveries the index would not know.
pub(crate) const LAYOUT_VERSION: u64 = 3;

/// The key spaces. Each is an independent ordered map; the numbers are stable (a backend may
/// store them), so a new space takes a new number and an old one is never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub(crate) enum Space {
    /// Counters and format markers of the whole store.
    Meta = 1,
    /// Room name -> Room record.
    Rooms = 2,
    /// Room id -> (next log position, events stored, payload bytes stored).
    RoomStats = 3,
    /// (room id, type name) -> event type record.
    EventTypes = 4,
    /// (room id, type name, version) -> schema version record.
    Schemas = 5,
    /// Event id -> event record with its payload.
    Events = 6,
    /// (room id, log position) -> event id: a Room's events in acceptance order.
    RoomLog = 7,
    /// (room id, key) -> last sequence assigned, as of the Room's checkpoint (with a shared
    /// store, always current: see [`KvStore::shared`]).
    KeySeq = 8,
    /// Room id -> the log position up to which `KeySeq` is complete.
    SeqCheckpoint = 9,
    /// (room id, publisher, idempotency key) -> idempotency record.
    Idempotency = 10,
    /// (expires at, room id, publisher, idempotency key) -> (): expiry index.
    IdemExpiry = 11,
    /// (principal, idempotency key) -> remembered API response.
    Responses = 12,
    /// (expires at, principal, idempotency key) -> (): expiry index.
    ResponseExpiry = 13,
    /// Ids of deleted Rooms not yet purged.
    DeletedRooms = 14,
    /// Subscription id -> subscription record.
    Subscriptions = 15,
    /// (room id, subscription id) -> (): a Room's subscriptions.
    RoomSubs = 16,
    /// Subscription id -> (backlog, dead letters) counters.
    SubStats = 17,
    /// (subscription id, log position) -> delivery record: what a subscription still owes.
    Deliveries = 18,
    /// (subscription id, log position) -> dead letter.
    DeadLetters = 19,
    /// (subscription id, log position, attempt) -> attempt record.
    Attempts = 20,
    /// Ids of deleted subscriptions not yet purged.
    DeletedSubs = 21,
    /// (kind, id) -> administrative record (identities, rights, keys).
    Records = 22,
    /// Sequence number -> audit entry.
    Audit = 23,
    /// (subscription id, due time, log position) -> (): the deliveries that may go out next
    /// (each key's head, or every undelivered one without ordering), by when they fall due, so
    /// that finding ready work never walks past blocked work.
    Ready = 24,
    /// (subscription id, key, log position) -> (): an ordered subscription's deliveries of each
    /// key, in order, to find a key's next head.
    KeyQueue = 25,
    /// (subscription id, key) -> (due time, log position, held until, held by): an ordered
    /// subscription's entry in `Ready` for each key with deliveries.
    KeyHead = 26,
    /// Subscription id -> (node, epoch, until): which node pushes it, when several brokers
    /// share the store (see `ownership.rs`).
    DispatchLeases = 27,
    /// (subscription id, node) -> (backlog, dead letters) changes one node made, as wrapping
    /// two's-complement deltas, when several brokers share the store: a subscription's counts are
    /// its `SubStats` row plus every node's share, so that a publish on one node and a push
    /// outcome on another never write the same row (and never lose a race to each other).
    SubStatsShare = 28,
    /// (subscription id, key) -> how many times an ordered subscription's queue of that key
    /// changed, when several brokers share the store: every batch that changes a key's queue
    /// or head bumps it, so that two nodes changing the same key conflict (as they did when
    /// every such batch also wrote the subscription's counts) and one never acts on a key's
    /// queue as it was before the other's change. Kept until the subscription is purged.
    KeyVersions = 29,
}

impl Space {
    /// Every space, in number order.
    pub(crate) const ALL: [Space; 29] = [
        Space::Meta,
        Space::Rooms,
        Space::RoomStats,
        Space::EventTypes,
        Space::Schemas,
        Space::Events,
        Space::RoomLog,
        Space::KeySeq,
        Space::SeqCheckpoint,
        Space::Idempotency,
        Space::IdemExpiry,
        Space::Responses,
        Space::ResponseExpiry,
        Space::DeletedRooms,
        Space::Subscriptions,
        Space::RoomSubs,
        Space::SubStats,
        Space::Deliveries,
        Space::DeadLetters,
        Space::Attempts,
        Space::DeletedSubs,
        Space::Records,
        Space::Audit,
        Space::Ready,
        Space::KeyQueue,
        Space::KeyHead,
        Space::DispatchLeases,
        Space::SubStatsShare,
        Space::KeyVersions,
    ];

    /// A short stable name (a backend's table name).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Space::Meta => "meta",
            Space::Rooms => "rooms",
            Space::RoomStats => "room_stats",
            Space::EventTypes => "event_types",
            Space::Schemas => "schemas",
            Space::Events => "events",
            Space::RoomLog => "room_log",
            Space::KeySeq => "key_seq",
            Space::SeqCheckpoint => "seq_checkpoint",
            Space::Idempotency => "idempotency",
            Space::IdemExpiry => "idempotency_expiry",
            Space::Responses => "responses",
            Space::ResponseExpiry => "response_expiry",
            Space::DeletedRooms => "deleted_rooms",
            Space::Subscriptions => "subscriptions",
            Space::RoomSubs => "room_subs",
            Space::SubStats => "sub_stats",
            Space::Deliveries => "deliveries",
            Space::DeadLetters => "dead_letters",
            Space::Attempts => "attempts",
            Space::DeletedSubs => "deleted_subs",
            Space::Records => "records",
            Space::Audit => "audit",
            Space::Ready => "ready",
            Space::KeyQueue => "key_queue",
            Space::KeyHead => "key_head",
            Space::DispatchLeases => "dispatch_leases",
            Space::SubStatsShare => "sub_stats_share",
            Space::KeyVersions => "key_versions",
        }
    }
}

/// One write of a batch: a value for a key, or `None` to remove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Put {
    pub space: Space,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A condition a batch commits under: the key holds exactly `value` (`None`: is absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expect {
    pub space: Space,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Writes applied together or not at all. A later write to the same key wins.
#[derive(Debug, Default, Clone)]
pub(crate) struct Batch {
    pub writes: Vec<Put>,
    pub expect: Vec<Expect>,
    /// True: the batch may be lost in a crash, together with every later volatile batch, until
    /// a durable batch (false, the default) commits, which makes every batch before it durable
    /// too. What a crash leaves is always every batch up to some point, never a later one
    /// without an earlier. Only for writes that a crash may undo without breaking a promise (a
    /// lease, a consumer's ack: after a crash the message is offered again, at least once); a
    /// backend may treat every batch as durable.
    pub volatile: bool,
    /// A notice for the other processes sharing the store (`remote_wake.rs`), delivered to
    /// them only if the batch commits; a backend no other process shares ignores it.
    pub notify: Option<String>,
}

impl Batch {
    /// True when the batch writes and expects nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.expect.is_empty()
    }
}

/// Which way a range is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Ascending,
    Descending,
}

/// A key-value pair as stored.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// A consistent read view: what was committed when it was taken.
pub(crate) trait Snapshot: Send + Sync {
    /// The value of one key.
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// The values of several keys, in their order: one round trip on a networked backend
    /// (the fence of a shared store's batch reads every key the batch writes).
    fn get_many(&self, keys: &[(Space, Vec<u8>)]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|(s, k)| self.get(*s, k)).collect()
    }
    /// Up to `limit` entries with keys within the bounds, in `order`.
    fn range(
        &self,
        space: Space,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>>;
}

/// A backend.
pub(crate) trait KvStore: Send + Sync + 'static {
    /// A read view of everything committed so far.
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>>;
    /// Applies the batch atomically, and durably unless it is volatile, or fails having written
    /// nothing.
    fn commit(&self, batch: Batch) -> Result<()>;
    /// Makes every volatile batch committed so far durable (an empty durable commit). The
    /// writer calls it when it has been idle for a while after a volatile commit, so that what
    /// a crash can undo is bounded in time as well as in commits.
    fn sync(&self) -> Result<()>;
    /// Gives the backend a chance to recover after failed commits (reopen a file, reconnect).
    /// Called by the writer before it tries again; a backend that cannot fail this way does
    /// nothing.
    fn recover(&self) -> Result<()> {
        Ok(())
    }
    /// True when a read may wait long (on the network): the engine then keeps it off tokio's
    /// workers. A local store answering from memory and its mapped file says false.
    fn reads_block(&self) -> bool {
        false
    }
    /// True when other processes may commit to this store too (a networked database shared by
    /// several brokers). The engine then keeps no number in memory that the store does not
    /// hold (a key's last sequence is read from its row and written with each publish), and
    /// commits every batch under the condition that each key it writes still holds what its
    /// snapshot held: of two writers that read the same counter (a Room's next log position,
    /// a key's sequence), the second to commit is refused with `Error::StorageConflict` and
    /// writes nothing, so no position or sequence is handed out twice. This is write-write
    /// fencing, not serializability: a key a batch only reads is not checked. A store only this
    /// process writes (redb, memory) says false and pays for none of it.
    fn shared(&self) -> bool {
        false
    }
    /// The notices other processes' commits carried (see [`Batch::notify`]), as they arrive;
    /// taken once, by the broker over this store. `None` when no other process shares it.
    /// After a break in listening (a reconnect) the backend delivers a notice that wakes
    /// everything, since notices may have been missed meanwhile.
    fn take_notices(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        None
    }
    /// A name for logs (`redb`, `memory`).
    fn kind(&self) -> &'static str;
}

/// Applies a batch to an ordered map of (space, key) -> value, checking its conditions first:
/// the reference semantics that the in-memory backend uses and the conformance suite compares
/// real backends against.
#[cfg(test)]
pub(crate) fn apply_to_map(
    map: &mut std::collections::BTreeMap<(Space, Vec<u8>), Vec<u8>>,
    batch: Batch,
) -> Result<()> {
    for e in &batch.expect {
        let now = map.get(&(e.space, e.key.clone()));
        if now != e.value.as_ref() {
            return Err(crate::error::Error::StorageConflict {
                detail: format!("{}: a key changed since it was read", e.space.name()),
            });
        }
    }
    for w in batch.writes {
        match w.value {
            Some(v) => {
                map.insert((w.space, w.key), v);
            }
            None => {
                map.remove(&(w.space, w.key));
            }
        }
    }
    Ok(())
}
