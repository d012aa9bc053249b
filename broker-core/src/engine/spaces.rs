//! The engine's on-disk layout: every key space of Rooms, events and deliveries, declared once as
//! a typed `Def` constant, and the layout version checked at open. Kept in one place so that what
//! is stored where, and under which key, reads as one list; `records.rs` declares its own two
//! spaces (records and audit), which nothing on the publish or delivery path reads.

use crate::storage::kv::Space;
use crate::storage::txn::Def;

// Tables. Rooms are keyed by name; everything inside a Room by the Room's incarnation id, so that
// deleting a Room is one small write and its contents are purged later in bounded batches.
/// Counters: `next_room_id`, `format`.
pub(super) const META: Def<String, u64> = Def::new(Space::Meta);
/// Room name -> RoomRecord.
pub(super) const ROOMS: Def<String, Vec<u8>> = Def::new(Space::Rooms);
/// Room id -> (next log offset, events stored, payload bytes stored).
pub(super) const ROOM_STATS: Def<u64, (u64, u64, u64)> = Def::new(Space::RoomStats);
/// (room id, type name) -> TypeRecord.
pub(super) const EVENT_TYPES: Def<(u64, String), Vec<u8>> = Def::new(Space::EventTypes);
/// (room id, type name, version) -> VersionRecord.
pub(super) const SCHEMAS: Def<(u64, String, u32), Vec<u8>> = Def::new(Space::Schemas);
/// Event id -> EventRecord (metadata and payload).
pub(super) const EVENTS: Def<u128, Vec<u8>> = Def::new(Space::Events);
/// (room id, log offset) -> event id: the Room's events in acceptance order.
pub(super) const ROOM_LOG: Def<(u64, u64), u128> = Def::new(Space::RoomLog);
/// (room id, key) -> last sequence assigned, as of the Room's sequence checkpoint. Never
/// decreases, even when retention removes events, so that a key's sequence never repeats.
pub(super) const KEY_SEQ: Def<(u64, String), u64> = Def::new(Space::KeySeq);
/// Room id -> the log offset up to which KEY_SEQ is complete. Sequences assigned after it are
/// recovered from the Room's log (see `SeqCache`).
pub(super) const SEQ_CHECKPOINT: Def<u64, u64> = Def::new(Space::SeqCheckpoint);
/// (room id, publisher, idempotency key) -> IdempotencyRecord.
pub(super) const IDEMPOTENCY: Def<(u64, String, String), Vec<u8>> = Def::new(Space::Idempotency);
/// (expires at, room id, publisher, idempotency key) -> (): the expiry index the sweep walks.
pub(super) const IDEM_EXPIRY: Def<(u64, u64, String, String), ()> = Def::new(Space::IdemExpiry);
/// (principal, idempotency key) -> ResponseRecord: API responses remembered for replay.
pub(super) const RESPONSES: Def<(String, String), Vec<u8>> = Def::new(Space::Responses);
/// (expires at, principal, idempotency key) -> (): the expiry index of RESPONSES.
pub(super) const RESPONSE_EXPIRY: Def<(u64, String, String), ()> = Def::new(Space::ResponseExpiry);
/// Ids of deleted Rooms whose contents the sweep has not finished purging.
pub(super) const DELETED_ROOMS: Def<u64, ()> = Def::new(Space::DeletedRooms);

// Subscriptions and their queues, keyed by subscription id.
/// Subscription id -> SubRecord.
pub(super) const SUBSCRIPTIONS: Def<u128, Vec<u8>> = Def::new(Space::Subscriptions);
/// (Room id, subscription id) -> (): who to fan out to.
pub(super) const ROOM_SUBS: Def<(u64, u128), ()> = Def::new(Space::RoomSubs);
/// Subscription id -> (backlog, dead letters).
pub(super) const SUB_STATS: Def<u128, (u64, u64)> = Def::new(Space::SubStats);
/// (subscription id, node) -> that node's changes to the counts, as wrapping deltas (shared
/// stores only; see `Space::SubStatsShare`).
pub(super) const SUB_STATS_SHARE: Def<(u128, u128), (u64, u64)> = Def::new(Space::SubStatsShare);
/// (subscription id, key) -> changes to that key's queue (shared stores only; see
/// `Space::KeyVersions`).
pub(super) const KEY_VERSIONS: Def<(u128, String), u64> = Def::new(Space::KeyVersions);
/// (subscription id, Room log offset) -> DeliveryRecord: what is still owed.
pub(super) const DELIVERIES: Def<(u128, u64), Vec<u8>> = Def::new(Space::Deliveries);
/// (subscription id, Room log offset) -> DeadRecord.
pub(super) const DEAD_LETTERS: Def<(u128, u64), Vec<u8>> = Def::new(Space::DeadLetters);
/// (subscription id, Room log offset, attempt) -> AttemptRecord.
pub(super) const ATTEMPTS: Def<(u128, u64, u32), Vec<u8>> = Def::new(Space::Attempts);
/// (subscription id, due time, log position) -> (): what may go out next, by due time.
pub(super) const READY: Def<(u128, u64, u64), ()> = Def::new(Space::Ready);
/// (subscription id, key, log position) -> (): an ordered subscription's deliveries by key.
pub(super) const KEY_QUEUE: Def<(u128, String, u64), ()> = Def::new(Space::KeyQueue);
/// (subscription id, key) -> (due time, log position, held until, held by): a key's entry in
/// READY.
pub(super) const KEY_HEAD: Def<(u128, String), (u64, u64, u64, u64)> = Def::new(Space::KeyHead);
/// Subscription id -> (node, epoch, until): the push lease of a subscription on a store several
/// brokers share (`ownership.rs`); purged with the subscription.
pub(super) const DISPATCH_LEASES: Def<u128, (u128, u64, u64)> = Def::new(Space::DispatchLeases);
/// Ids of deleted subscriptions whose queues the sweep has not finished purging.
pub(super) const DELETED_SUBS: Def<u128, ()> = Def::new(Space::DeletedSubs);
